"""Meaningful-perturbation attribution maps: objective, determinism, shapes, bad input, and the
pointing-game helpers.

Most tests use :class:`SpotDetector`, a tiny designed network whose class-1 logit grows with the
brightest 3 x 3 patch of the image: blurring that patch away is the only way to lower it, so the
right answer is known.  The whole-CoroNet path (gradients through both FPAEs into the mask) is
exercised at 64 px with a randomly initialised CoroNet and a few iterations.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from monai_bundle.scripts.attribution import (
    MAX_IMAGE_SIZE,
    Explainer,
    PerturbationConfig,
    blur,
    explain,
    load_presets,
    total_variation,
)
from monai_bundle.scripts.networks import CoroNet, load_coronet_weights
from monai_bundle.scripts.pointing_game import grow, heatmap_peak, run, summarise

SIZE = 64
CORONET_SIZE = 48  # small: each CoroNet iteration is a forward and backward pass of 3 networks
SPOT = (40, 20)  # row, column of the bright spot's centre
#: Strong blur, so a 3 x 3 spot really disappears at 64 px.
SPOT_CONFIG = PerturbationConfig(iterations=40, blur_kernel=31, blur_sigma=12.0)
WEIGHTS = Path(__file__).resolve().parents[1] / "monai_bundle" / "models" / "model.pt"
#: The paper's setting: the ``default`` preset and the dataclass defaults.
PAPER = PerturbationConfig()


class SpotDetector(nn.Module):
    """Class 0: constant logit 0.  Class 1: ``12 * (max 3x3 local mean - 0.5)``."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(12.0))

    def forward(self, x: Tensor) -> Tensor:
        peak = F.avg_pool2d(x, 3, stride=1).amax(dim=(-2, -1))
        return torch.cat([torch.zeros_like(peak), self.scale * (peak - 0.5)], dim=1)


def _spot_image(height: int = SIZE, width: int = SIZE) -> Tensor:
    generator = torch.Generator().manual_seed(0)
    image = 0.2 + 0.02 * torch.rand(1, height, width, generator=generator)
    row, col = SPOT
    image[:, row - 1 : row + 2, col - 1 : col + 2] = 1.0
    return image


@pytest.fixture(scope="module")
def coronet() -> Iterator[CoroNet]:
    """A randomly initialised CoroNet (local seed; global RNG state untouched)."""
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        net = CoroNet()
    yield net.eval()


# --------------------------------------------------------------------------------------------
# The objective does its job
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [SPOT_CONFIG, dataclasses.replace(SPOT_CONFIG, work_size=48, noise_std=0.01, restarts=2)],
    ids=["full-size", "reduced-size-noise-restarts"],
)
def test_mask_lowers_target_probability_and_points_at_the_evidence(
    config: PerturbationConfig,
) -> None:
    result = explain(SpotDetector(), _spot_image(), target=1, config=config)
    assert result.initial_probability > 0.99
    assert result.final_probability < 0.5 * result.initial_probability
    peak = heatmap_peak(result.heatmap, config.mask_size)
    assert max(abs(peak[0] - SPOT[0]), abs(peak[1] - SPOT[1])) <= 4, peak
    # Minimal deletion: most of the image is kept.
    assert float(result.heatmap.mean()) < 0.25


def test_target_defaults_to_predicted_class() -> None:
    result = explain(
        SpotDetector(), _spot_image(), config=dataclasses.replace(SPOT_CONFIG, iterations=2)
    )
    assert result.target == 1


def test_whole_coronet_pipeline_gets_a_gradient(coronet: CoroNet) -> None:
    """The mask moves through both FPAEs and the classifier; the caller's model is untouched."""
    coronet.train()
    before = {k: v.clone() for k, v in coronet.state_dict().items()}
    config = dataclasses.replace(PAPER, iterations=3, lr=0.2)
    image = torch.rand(1, CORONET_SIZE, CORONET_SIZE, generator=torch.Generator().manual_seed(3))
    result = explain(coronet, image, target=2, config=config)
    assert coronet.training and not coronet.fpae_healthy.training
    assert all(p.grad is None for p in coronet.parameters())
    assert all(torch.equal(before[k], v) for k, v in coronet.state_dict().items())
    coronet.eval()
    assert result.mask.min() < 1.0  # the optimiser moved the mask
    assert result.final_probability <= result.initial_probability + 1e-6
    assert result.iterations == 3 and result.seconds > 0


# --------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------


def test_same_seed_same_heatmap_different_seed_differs(coronet: CoroNet) -> None:
    config = dataclasses.replace(PAPER, iterations=2, noise_std=0.05, lr=0.2)
    image = torch.rand(1, CORONET_SIZE, CORONET_SIZE, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(99)  # global state must not matter
    first = explain(coronet, image, target=0, config=config)
    torch.manual_seed(7)
    second = explain(coronet, image, target=0, config=config)
    other = explain(coronet, image, target=0, config=dataclasses.replace(config, seed=1))
    reused = Explainer(coronet)
    third, fourth = (reused.explain(image, target=0, config=config) for _ in range(2))
    for again in (second, third, fourth):
        np.testing.assert_array_equal(first.heatmap, again.heatmap)
        assert first.final_probability == again.final_probability
    assert not np.array_equal(first.heatmap, other.heatmap)


# --------------------------------------------------------------------------------------------
# Heatmap = 1 - upsampled mask, in [0, 1], at the requested size
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "output_size", "expected"),
    [
        ((1, SIZE, SIZE), None, (SIZE, SIZE)),
        ((1, 1, SIZE, SIZE), None, (SIZE, SIZE)),
        ((1, SIZE, 80), None, (SIZE, 80)),
        ((1, SIZE, SIZE), (100, 120), (100, 120)),
        ((SIZE, SIZE), (32, 32), (32, 32)),
    ],
)
def test_heatmap_is_one_minus_mask_at_requested_size(
    shape: tuple[int, ...], output_size: tuple[int, int] | None, expected: tuple[int, int]
) -> None:
    image = _spot_image(shape[-2], shape[-1]).reshape(shape)
    config = dataclasses.replace(SPOT_CONFIG, iterations=10)
    result = explain(SpotDetector(), image, target=1, config=config, output_size=output_size)
    assert result.heatmap.shape == expected and result.heatmap.dtype == np.float32
    assert result.mask.shape == (config.mask_size, config.mask_size)
    assert result.heatmap.min() >= 0.0 and result.heatmap.max() <= 1.0
    assert result.mask.min() >= 0.0 and result.mask.max() <= 1.0
    upsampled = F.interpolate(
        torch.from_numpy(result.mask)[None, None],
        size=expected,
        mode="bilinear",
        align_corners=False,
    )[0, 0].numpy()
    np.testing.assert_allclose(result.heatmap, 1.0 - upsampled, atol=1e-6)


def test_numpy_image_is_accepted() -> None:
    image = _spot_image()[0].numpy()
    config = dataclasses.replace(SPOT_CONFIG, iterations=2)
    assert explain(SpotDetector(), image, target=1, config=config).heatmap.shape == image.shape


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 128, 256])
def test_blur_preserves_mean_and_smooths(size: int) -> None:
    image = torch.rand(1, 1, size, size, generator=torch.Generator().manual_seed(size))
    blurred = blur(image, PAPER)
    assert blurred.shape == image.shape
    assert abs(float(blurred.mean() - image.mean())) < 0.01
    assert float(blurred.std()) < 0.5 * float(image.std())


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        (torch.ones(1, 1, 4, 4), 0.0),
        (torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]]), 1.0),  # |1-0|^3 on each row, mean 1
        (torch.tensor([[[[0.0, 0.5], [0.0, 0.5]]]]), 0.125),
    ],
)
def test_total_variation(mask: Tensor, expected: float) -> None:
    assert float(total_variation(mask, 3.0)[0]) == pytest.approx(expected)


def test_the_bundle_presets_are_the_papers_method_and_a_cheaper_fast_one() -> None:
    presets = load_presets()
    assert set(presets) == {"default", "fast"}
    default, fast = presets["default"], presets["fast"]
    assert default == PerturbationConfig()  # the paper's setting
    assert default.iterations == 300 and default.lr == 0.1 and default.tv_beta == 3.0
    assert fast.iterations * 7 <= default.iterations
    # Same working resolution: below the model's input size the maps lose the lesion.
    assert fast.work_size == default.work_size is None
    assert fast.mask_size == default.mask_size == 28


def test_a_preset_with_an_unknown_field_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "inference.json"
    config.write_text('{"attribution": {"fast": {"iterations": 40, "step": 1}}}')
    with pytest.raises(ValueError, match="unknown fields"):
        load_presets(config)


# --------------------------------------------------------------------------------------------
# Bad input gives clear errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "error", "message"),
    [
        (torch.rand(3, SIZE, SIZE), ValueError, "grayscale"),
        (torch.rand(1, 3, SIZE, SIZE), ValueError, "grayscale"),
        (torch.rand(1, 16, 16), ValueError, "too small"),
        (torch.rand(1, 8, SIZE), ValueError, "too small"),
        (torch.zeros(1, MAX_IMAGE_SIZE + 8, SIZE), ValueError, "too large"),
        (torch.rand(2, 1, SIZE, SIZE), ValueError, "1 x H x W"),
        (torch.rand(SIZE), ValueError, "1 x H x W"),
        (torch.full((1, SIZE, SIZE), 2.0), ValueError, r"\[0, 1\]"),
        (torch.full((1, SIZE, SIZE), float("nan")), ValueError, "NaN"),
        (torch.zeros(1, SIZE, SIZE, dtype=torch.uint8), ValueError, "floating"),
        ([[0.0]], TypeError, "Tensor"),
    ],
    ids=[
        "rgb-chw",
        "rgb-bchw",
        "tiny",
        "thin",
        "huge",
        "batch",
        "1d",
        "range",
        "nan",
        "integer",
        "list",
    ],
)
def test_explain_rejects_bad_images(image: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        explain(SpotDetector(), image, config=SPOT_CONFIG)  # type: ignore[arg-type]


@pytest.mark.parametrize("target", [-1, 2, 1.5, True])
def test_explain_rejects_bad_targets(target: object) -> None:
    with pytest.raises(ValueError, match="target"):
        explain(SpotDetector(), _spot_image(), target=target, config=SPOT_CONFIG)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("iterations", 0),
        ("lr", 0.0),
        ("lr", float("nan")),
        ("l1_coeff", -1.0),
        ("tv_beta", 0.0),
        ("mask_size", 0),
        ("blur_kernel", 10),
        ("blur_sigma", -1.0),
        ("work_size", 8),
        ("noise_std", -0.1),
        ("restarts", 0),
        ("iterations", True),
    ],
)
def test_config_rejects_bad_values(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(PAPER, **{field: value})


# --------------------------------------------------------------------------------------------
# Pointing-game helpers
# --------------------------------------------------------------------------------------------


def test_peak_breaks_plateau_ties_at_the_plateau_centre() -> None:
    heatmap = np.zeros((56, 56), dtype=np.float32)
    heatmap[0, 0] = 1.0  # an isolated saturated pixel ...
    heatmap[30:40, 10:20] = 1.0  # ... loses to a saturated region
    row, col = heatmap_peak(heatmap)
    assert 30 <= row < 40 and 10 <= col < 20


@pytest.mark.parametrize(("tolerance", "hit_at"), [(0, (10, 10)), (2, (12, 8)), (3, (13, 13))])
def test_grow_adds_tolerance(tolerance: int, hit_at: tuple[int, int]) -> None:
    mask = np.zeros((32, 32), dtype=bool)
    mask[10, 10] = True
    grown = grow(mask, tolerance)
    assert grown[hit_at] and grown.sum() == (2 * tolerance + 1) ** 2


# --------------------------------------------------------------------------------------------
# Pointing game with the shipped demo weights (skipped when they are absent)
# --------------------------------------------------------------------------------------------


def _bundle_image_size() -> int:
    config = json.loads((WEIGHTS.parents[1] / "configs" / "inference.json").read_text())
    return int(config["image_size"])


@pytest.mark.slow
@pytest.mark.skipif(
    not WEIGHTS.is_file(), reason="demo weights monai_bundle/models/model.pt absent"
)
def test_fast_mode_points_at_phantom_lesions_more_often_than_the_centre() -> None:
    """Two phantoms per lesion class at the bundle's input size; the full measurement is
    ``python -m monai_bundle.scripts.pointing_game``."""
    net = CoroNet()
    load_coronet_weights(net, WEIGHTS)
    size = _bundle_image_size()
    trials, _ = run(net.eval(), n=2, size=size, modes=["fast"], tolerance=2, progress=False)
    summary = summarise(trials, "fast")
    assert summary.hit_rate > summary.centre_rate
