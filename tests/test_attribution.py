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
from monai_bundle.scripts.classes import CLASS_NAMES
from monai_bundle.scripts.networks import CoroNet, load_coronet_weights
from monai_bundle.scripts.pointing_game import grow, heatmap_peak, model_phantom, run, summarise

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
    assert result.probability_before > 0.99
    assert result.probability_after < 0.5 * result.probability_before
    peak = heatmap_peak(result.heatmap, config.mask_size)
    assert max(abs(peak[0] - SPOT[0]), abs(peak[1] - SPOT[1])) <= 4, peak
    # Minimal deletion: most of the image is kept.
    assert float(result.heatmap.mean()) < 0.25


class SaturatedSpotDetector(SpotDetector):
    """A spot detector so sure of class 1 (logit margin 200) that its float32 softmax is 1."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(400.0))


@pytest.mark.parametrize("objective", ["probability", "log_probability"])
def test_probability_objectives_give_a_blank_map_where_the_float32_softmax_saturates(
    objective: str,
) -> None:
    """Past a margin of about 17 the float32 softmax is 1: its gradient, and that of its log,
    is exactly 0, the mask never moves and the map is blank and powerless."""
    config = dataclasses.replace(SPOT_CONFIG, objective=objective)
    result = explain(SaturatedSpotDetector(), _spot_image(), 1, config)
    assert result.probability_before == 1.0
    assert float(result.heatmap.max()) == 0.0 and not result.informative


def test_the_logit_margin_keeps_a_gradient_where_the_softmax_saturates() -> None:
    """The bundle's objective finds the spot, and its map is informative."""
    assert SPOT_CONFIG.objective == "logit_margin"
    ours = explain(SaturatedSpotDetector(), _spot_image(), 1, SPOT_CONFIG)
    assert ours.informative and ours.probability_after < 0.01
    peak = heatmap_peak(ours.heatmap, SPOT_CONFIG.mask_size)
    assert max(abs(peak[0] - SPOT[0]), abs(peak[1] - SPOT[1])) <= 4, peak


class Blind(nn.Module):
    """Logits that do not depend on the image: no map can be informative."""

    def __init__(self) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.tensor([[0.0, 3.0]]))

    def forward(self, x: Tensor) -> Tensor:
        return self.logits.expand(x.shape[0], -1) + 0.0 * x.mean()


def test_a_map_whose_deletion_changes_nothing_is_not_informative() -> None:
    result = explain(Blind(), _spot_image(), 1, dataclasses.replace(SPOT_CONFIG, iterations=5))
    assert result.probability_after == pytest.approx(result.probability_before)
    assert not result.informative


def test_the_reported_probabilities_use_the_calibration_temperature() -> None:
    config = dataclasses.replace(SPOT_CONFIG, iterations=2)
    plain = Explainer(Blind()).explain(_spot_image(), 1, config)
    calibrated = Explainer(Blind(), temperature=2.0).explain(_spot_image(), 1, config)
    assert plain.probability_before == pytest.approx(float(torch.sigmoid(torch.tensor(3.0))))
    assert calibrated.probability_before == pytest.approx(float(torch.sigmoid(torch.tensor(1.5))))
    np.testing.assert_array_equal(plain.heatmap, calibrated.heatmap)


def test_the_gradient_warm_start_begins_at_the_evidence() -> None:
    config = dataclasses.replace(SPOT_CONFIG, iterations=1, lr=1e-6, warm_start="gradient")
    result = explain(SpotDetector(), _spot_image(), 1, config)
    peak = heatmap_peak(result.heatmap, config.mask_size)
    assert max(abs(peak[0] - SPOT[0]), abs(peak[1] - SPOT[1])) <= 4, peak
    assert float(result.mask.min()) == pytest.approx(0.0, abs=1e-4)  # the strongest cell


def test_a_batch_gives_each_image_the_map_it_gets_alone() -> None:
    images = [_spot_image(), torch.flip(_spot_image(), dims=[-1])]
    config = dataclasses.replace(SPOT_CONFIG, iterations=10, restarts=2, noise_std=0.01)
    explainer = Explainer(SpotDetector())
    together = explainer.explain_batch(images, [1, None], config)
    for image, batched in zip(images, together, strict=True):
        alone = explainer.explain(image, 1, config)
        np.testing.assert_allclose(batched.heatmap, alone.heatmap, atol=1e-4)
        assert batched.target == alone.target == 1
        assert batched.probability_after == pytest.approx(alone.probability_after, abs=1e-5)


def test_stopping_when_informative_keeps_the_first_informative_mask_of_each_image() -> None:
    """A batch with one easy and one saturated image: each stops on its own, as alone."""
    config = dataclasses.replace(
        SPOT_CONFIG, iterations=30, min_iterations=2, stop_when_informative=True
    )
    explainer = Explainer(SpotDetector())
    images = [_spot_image(), torch.flip(_spot_image(), dims=[-1])]
    together = explainer.explain_batch(images, [1, 1], config)
    for image, batched in zip(images, together, strict=True):
        alone = explainer.explain(image, 1, config)
        assert batched.informative and alone.informative
        np.testing.assert_allclose(batched.heatmap, alone.heatmap, atol=1e-4)
        assert 2 <= batched.iterations == alone.iterations < 30


@pytest.mark.parametrize("change", [{"restarts": 2}, {"noise_std": 0.1}, {"work_size": 48}])
def test_stopping_when_informative_needs_one_noiseless_mask_at_full_size(
    change: dict[str, Any],
) -> None:
    with pytest.raises(ValueError, match="stop_when_informative"):
        dataclasses.replace(SPOT_CONFIG, stop_when_informative=True, **change)


def test_a_batch_of_mixed_sizes_is_refused() -> None:
    with pytest.raises(ValueError, match="one size"):
        Explainer(SpotDetector()).explain_batch([_spot_image(), _spot_image(48, 48)])


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
    assert result.probability_after <= result.probability_before + 1e-6
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
        assert first.probability_after == again.probability_after
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


def test_the_bundle_presets_are_the_papers_method_and_a_warm_started_fast_one() -> None:
    presets = load_presets()
    assert set(presets) == {"default", "fast"}
    default, fast = presets["default"], presets["fast"]
    assert default == PerturbationConfig()  # the paper's setting, with the margin objective
    assert default.iterations == 300 and default.lr == 0.1 and default.tv_beta == 3.0
    assert default.warm_start == "none" and fast.warm_start == "gradient"
    assert default.objective == fast.objective == "logit_margin"
    assert fast.stop_when_informative and fast.min_iterations == 2 and fast.iterations <= 10
    assert (fast.l1_coeff, fast.tv_coeff, fast.tv_beta) == (0.01, 0.2, 3.0)
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
        ("iterations", -1),
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
        ("objective", "margin"),
        ("warm_start", "cam"),
        ("min_drop", 1.0),
        ("min_drop", 0.0),
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
# The shipped demo weights on phantoms
# --------------------------------------------------------------------------------------------


def _bundle_image_size() -> int:
    config = json.loads((WEIGHTS.parents[1] / "configs" / "inference.json").read_text())
    return int(config["image_size"])


@pytest.fixture(scope="module")
def demo_network() -> CoroNet:
    net = CoroNet()
    load_coronet_weights(net, WEIGHTS)
    return net.eval()


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["default", "fast"])
def test_a_saturated_phantom_gets_an_informative_map(demo_network: CoroNet, preset: str) -> None:
    """Pneumonia phantom 100000: the demo weights give it p = 0.9999974 (logit margin 12.9),
    where the paper's objective left the map blank."""
    phantom = model_phantom("pneumonia", _bundle_image_size(), 100_000)
    image = torch.from_numpy(phantom.image)[None]
    target = CLASS_NAMES.index("pneumonia")
    config = load_presets()[preset]
    result = Explainer(demo_network).explain(image, target, config)
    assert result.probability_before > 0.99999
    assert result.informative and result.probability_after < 0.5 * result.probability_before
    assert float(result.heatmap.max() - result.heatmap.min()) > 0.5
    paper = dataclasses.replace(config, objective="probability")
    blank = Explainer(demo_network).explain(image, target, paper)
    assert not blank.informative  # what the objective change fixed


@pytest.mark.slow
def test_fast_maps_point_at_phantom_lesions_more_often_than_a_random_lung_point(
    demo_network: CoroNet,
) -> None:
    """Three phantoms per lesion class at the bundle's input size; the full measurement is
    ``python -m bench.heatmap`` (docs/benchmarks.md)."""
    size = _bundle_image_size()
    trials, _ = run(demo_network, n=3, size=size, modes=["fast"], tolerance=2, progress=False)
    summary = summarise(trials, "fast")
    assert summary.informative_rate == 1.0, [t.probability_after for t in trials]
    assert summary.hit_rate > summary.lung_baseline
    assert summary.deletion_auc < 0.5
