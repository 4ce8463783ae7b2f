"""Attribution maps by meaningful perturbation (Fong & Vedaldi 2017; CoroNet paper section 3.4).

A small mask ``m`` (28 x 28) is upsampled bilinearly to the image size and blends the radiograph
with a blurred copy of itself, ``x * m + blur(x) * (1 - m)``.  The perturbed image goes through
the WHOLE CoroNet pipeline (both FPAEs, the residual tensor and the classifier), and Adam
minimises::

    l1_coeff * mean|1 - m|  +  tv_coeff * TV_beta(m)  +  softmax(net(perturbed))[target]

with ``m`` clamped to [0, 1] after every step, starting from ``m = 1`` (nothing deleted).  The
heatmap shown to the reader is ``1 - m``: the regions whose deletion lowers the target
probability most.

Two presets, bundle config data (``attribution`` in ``configs/inference.json``, read by
:func:`load_presets`), measured with ``bench/heatmap.py`` and ``pointing_game.py`` (figures in
``docs/benchmarks.md`` at the repository root): ``default`` takes the paper's 300 Adam steps,
``fast`` 40 larger ones (lr 0.25), 7.5x fewer passes through the network. On 40 phantoms with
the demo weights at 128 px the fast maps point into the lesion 57.5% of the time and the default
ones 67.5% (the image centre 0%); 25 steps gave 52.5% and 35 steps 55%. Both optimise at the
model's input size: a lower working resolution is cheaper per step but feeds the network images
it was not trained at, and the maps then lose the lesion (at 64 px for the 128 px demo model, 1
hit in 20).

Results are deterministic for a fixed ``seed``: all randomness comes from a local
``torch.Generator``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_IMAGE_SIZE",
    "MIN_IMAGE_SIZE",
    "Explainer",
    "Explanation",
    "PerturbationConfig",
    "blur",
    "explain",
    "load_presets",
    "total_variation",
]

#: The bundle config that holds the presets (``<bundle>/configs/inference.json``).
PRESETS_FILE = Path(__file__).resolve().parent.parent / "configs" / "inference.json"
PRESETS_KEY = "attribution"
TARGET_KEY = "_target_"

#: Smallest image side accepted: CoroNet's FPAE pyramid (/8) and ResNet stem (/32) need room.
MIN_IMAGE_SIZE = 32
#: Largest image side accepted: hundreds of backward passes through two full-resolution FPAEs
#: need memory that grows with the pixel count (about 4 GiB at 1024 x 1024).
MAX_IMAGE_SIZE = 1024


@dataclass(frozen=True)
class PerturbationConfig:
    """Settings of the mask optimisation.

    - ``iterations``, ``lr``: Adam steps and learning rate on the mask.
    - ``l1_coeff``: weight of ``mean|1 - m|`` (delete as little as possible).
    - ``tv_coeff``, ``tv_beta``: weight and exponent of the total variation of the mask
      (``mean |dm/dx|**beta + mean |dm/dy|**beta`` over the 28 x 28 mask; beta 3 as in the paper).
    - ``mask_size``: side of the square mask (28 in the paper).
    - ``blur_kernel``, ``blur_sigma``: Gaussian deletion baseline in pixels at
      ``blur_reference_size``; both scale with the size the blur is applied at, so the same
      anatomy is blurred whatever the working resolution.
    - ``work_size``: side the optimisation runs at (the image is resized, the mask is upsampled
      back); ``None`` means the image's own size.
    - ``noise_std``: standard deviation of Gaussian noise added to the perturbed image at every
      step (in [0, 1] intensity units), which discourages adversarial masks; 0 disables it.
    - ``restarts``: masks optimised together in one batch, each with its own noise; restart 0
      starts at ``m = 1``, the others at random masks in [0.5, 1].  The restart with the lowest
      objective at full size is kept.
    - ``seed``: seeds the local generator of the noise and the random starts.
    """

    iterations: int = 300
    lr: float = 0.1
    l1_coeff: float = 0.01
    tv_coeff: float = 0.2
    tv_beta: float = 3.0
    mask_size: int = 28
    blur_kernel: int = 11
    blur_sigma: float = 5.0
    blur_reference_size: int = 224
    work_size: int | None = None
    noise_std: float = 0.0
    restarts: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        positive_ints = {
            "iterations": self.iterations,
            "mask_size": self.mask_size,
            "blur_kernel": self.blur_kernel,
            "blur_reference_size": self.blur_reference_size,
            "restarts": self.restarts,
        }
        for name, value in positive_ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        if self.blur_kernel % 2 == 0:
            raise ValueError(f"blur_kernel must be odd, not {self.blur_kernel}")
        for name, number in {
            "lr": self.lr,
            "blur_sigma": self.blur_sigma,
            "tv_beta": self.tv_beta,
        }.items():
            if not math.isfinite(number) or number <= 0:
                raise ValueError(f"{name} must be a positive number, not {number!r}")
        for name, number in {
            "l1_coeff": self.l1_coeff,
            "tv_coeff": self.tv_coeff,
            "noise_std": self.noise_std,
        }.items():
            if not math.isfinite(number) or number < 0:
                raise ValueError(f"{name} must be a non-negative number, not {number!r}")
        if self.work_size is not None and not MIN_IMAGE_SIZE <= self.work_size <= MAX_IMAGE_SIZE:
            raise ValueError(
                f"work_size must be None or in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], "
                f"not {self.work_size!r}"
            )


def presets_from(data: Mapping[str, Mapping[str, Any]]) -> dict[str, PerturbationConfig]:
    """Presets from config data ``{name: {field: value, ...}}`` (``_target_`` is ignored)."""
    known = {f.name for f in fields(PerturbationConfig)}
    presets = {}
    for name, values in data.items():
        settings = {k: v for k, v in values.items() if k != TARGET_KEY}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"attribution preset {name!r}: unknown fields {unknown}")
        presets[name] = PerturbationConfig(**settings)
    return presets


def load_presets(path: str | Path = PRESETS_FILE) -> dict[str, PerturbationConfig]:
    """The attribution presets of a bundle config (default: this bundle's), by name."""
    config = json.loads(Path(path).read_text(encoding="utf-8"))
    data = config.get(PRESETS_KEY)
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: no {PRESETS_KEY!r} presets")
    return presets_from(data)


@dataclass(frozen=True)
class Explanation:
    """One attribution map.

    ``heatmap`` is ``1 - mask`` upsampled to the output size (float32 in [0, 1], high = salient);
    ``mask`` the optimised ``mask_size x mask_size`` mask; the probabilities are the softmax
    probability of ``target`` for the unperturbed and the finally perturbed image, both at the
    image's own size; ``seconds`` is the wall time of :func:`explain`.
    """

    heatmap: NDArray[np.float32]
    mask: NDArray[np.float32]
    target: int
    initial_probability: float
    final_probability: float
    iterations: int
    seconds: float


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def _gaussian_kernel(kernel: int, sigma: float) -> Tensor:
    radius = kernel // 2
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    weights = torch.exp(-(offsets**2) / (2.0 * sigma**2))
    return weights / weights.sum()


def blur(image: Tensor, config: PerturbationConfig | None = None) -> Tensor:
    """Gaussian blur of ``image`` (``B x 1 x H x W``), the deletion baseline.

    Kernel and sigma are ``config.blur_kernel`` / ``config.blur_sigma`` (the paper's unless
    given) scaled by ``min(H, W) / config.blur_reference_size``; borders are reflected.
    """
    config = config or PerturbationConfig()
    scale = min(image.shape[-2:]) / config.blur_reference_size
    sigma = config.blur_sigma * scale
    radius = max(1, round((config.blur_kernel // 2) * scale))
    radius = min(radius, min(image.shape[-2:]) - 1)  # reflect padding needs radius < size
    weights = _gaussian_kernel(2 * radius + 1, sigma).to(image)
    padded = F.pad(image, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(padded, weights.view(1, 1, 1, -1))
    return F.conv2d(out, weights.view(1, 1, -1, 1))


def total_variation(mask: Tensor, beta: float) -> Tensor:
    """``mean |m[i+1, j] - m[i, j]|**beta + mean |m[i, j+1] - m[i, j]|**beta`` per batch item."""
    dy = (mask[..., 1:, :] - mask[..., :-1, :]).abs().pow(beta).flatten(1).mean(dim=1)
    dx = (mask[..., :, 1:] - mask[..., :, :-1]).abs().pow(beta).flatten(1).mean(dim=1)
    return dy + dx


def _upsample(mask: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(mask, size=size, mode="bilinear", align_corners=False)


def _as_batch(image: Tensor | NDArray[np.floating]) -> Tensor:
    """Validate ``image`` (``1 x H x W`` or ``1 x 1 x H x W``, or ``H x W``) as a 1x1xHxW tensor."""
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.asarray(image, dtype=np.float32))
    if not isinstance(image, Tensor):
        raise TypeError(f"image must be a torch Tensor or numpy array, not {type(image).__name__}")
    shape = tuple(image.shape)
    if image.ndim == 2:
        image = image[None, None]
    elif image.ndim == 3 and shape[0] == 1:
        image = image[None]
    elif image.ndim == 4 and shape[:2] == (1, 1):
        pass
    elif (image.ndim == 3 and shape[0] in (3, 4)) or (image.ndim == 4 and shape[1] in (3, 4)):
        raise ValueError(f"image must be grayscale (one channel), got shape {shape} (colour?)")
    else:
        raise ValueError(f"image must be 1 x H x W or 1 x 1 x H x W, got shape {shape}")
    height, width = image.shape[-2:]
    if min(height, width) < MIN_IMAGE_SIZE:
        raise ValueError(
            f"image {height}x{width} is too small: each side must be >= {MIN_IMAGE_SIZE}"
        )
    if max(height, width) > MAX_IMAGE_SIZE:
        raise ValueError(
            f"image {height}x{width} is too large: each side must be <= {MAX_IMAGE_SIZE}; "
            "explain the image at the model's input size"
        )
    if not image.is_floating_point():
        raise ValueError(f"image must be floating point in [0, 1], got dtype {image.dtype}")
    image = image.detach().to(torch.float32).clone()  # also turns an inference tensor normal
    if not bool(torch.isfinite(image).all()):
        raise ValueError("image contains NaN or infinite values")
    low, high = float(image.min()), float(image.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(f"image values must lie in [0, 1], got [{low:.4g}, {high:.4g}]")
    return image


def _resize(image: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(image.shape[-2:]) == size:
        return image
    return F.interpolate(image, size=size, mode="area" if size[0] < image.shape[-2] else "bilinear")


def _work_shape(shape: tuple[int, int], work_size: int | None) -> tuple[int, int]:
    """Scale ``shape`` so its longer side is ``work_size`` (keeps the aspect ratio)."""
    if work_size is None:
        return shape
    scale = work_size / max(shape)
    return (
        max(MIN_IMAGE_SIZE, round(shape[0] * scale)),
        max(MIN_IMAGE_SIZE, round(shape[1] * scale)),
    )


class _Objective:
    """The perturbed-image objective for one image at one size; blurred baseline precomputed."""

    def __init__(self, network: nn.Module, image: Tensor, target: int, config: PerturbationConfig):
        self.network = network
        self.target = target
        self.config = config
        self.size = (int(image.shape[-2]), int(image.shape[-1]))
        self.baseline = blur(image, config)
        self.difference = image - self.baseline  # perturbed = baseline + difference * m

    def perturb(self, mask: Tensor) -> Tensor:
        perturbed = torch.addcmul(self.baseline, self.difference, _upsample(mask, self.size))
        return perturbed.contiguous(memory_format=torch.channels_last)

    def terms(self, mask: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per-restart ``(objective, target probability)`` for masks ``B x 1 x m x m``."""
        perturbed = self.perturb(mask)
        if noise is not None:
            perturbed = (perturbed + noise).clamp(0.0, 1.0)
        probability = F.softmax(self.network(perturbed), dim=1)[:, self.target]
        cfg = self.config
        l1 = (1.0 - mask).abs().flatten(1).mean(dim=1)
        tv = total_variation(mask, cfg.tv_beta)
        return cfg.l1_coeff * l1 + cfg.tv_coeff * tv + probability, probability


def _network_device(network: nn.Module) -> torch.device:
    first = next(network.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _to_channels_last(module: nn.Module) -> None:
    """Put every 4-D parameter and buffer of ``module`` in channels-last layout (values kept)."""
    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.ndim == 4:
                tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)


class Explainer:
    """Meaningful-perturbation maps for one network; build once, call :meth:`explain` per image.

    Holds a private copy of ``network`` (a snapshot: later changes to ``network`` are not seen)
    in eval mode, without parameter gradients, with 4-D weights in channels-last layout, which
    makes the gradient passes through the FPAEs' thin full-resolution convolutions about 20 %
    cheaper on CPU.  The caller's network is never modified.
    """

    def __init__(self, network: nn.Module) -> None:
        if not isinstance(network, nn.Module):
            raise TypeError(f"network must be a torch nn.Module, not {type(network).__name__}")
        self.network = copy.deepcopy(network).eval().requires_grad_(False)
        self.device = _network_device(self.network)
        if self.device.type == "cpu":
            _to_channels_last(self.network)

    def explain(
        self,
        image: Tensor | NDArray[np.floating],
        target: int | None = None,
        config: PerturbationConfig | None = None,
        *,
        output_size: tuple[int, int] | None = None,
    ) -> Explanation:
        """Attribution map of the ``target`` class for ``image``; see :func:`explain`."""
        start = time.perf_counter()
        config = PerturbationConfig() if config is None else config
        if not isinstance(config, PerturbationConfig):
            raise TypeError(f"config must be a PerturbationConfig, not {type(config).__name__}")
        batch = _as_batch(image).to(self.device)
        out_hw = tuple(batch.shape[-2:]) if output_size is None else tuple(output_size)
        if len(out_hw) != 2 or min(out_hw) < 1:
            raise ValueError(f"output_size must be (height, width) > 0, not {output_size!r}")
        with torch.inference_mode(False), torch.enable_grad():
            mask, chosen, initial, final = _optimise(self.network, batch, target, config)
        with torch.no_grad():
            heatmap = 1.0 - _upsample(mask, (int(out_hw[0]), int(out_hw[1])))
        seconds = time.perf_counter() - start
        logger.debug(
            "explained class %d: p %.4f -> %.4f in %d iterations, %.2f s",
            chosen, initial, final, config.iterations, seconds,
        )  # fmt: skip
        return Explanation(
            heatmap=heatmap[0, 0].clamp(0.0, 1.0).cpu().numpy().astype(np.float32),
            mask=mask[0, 0].cpu().numpy().astype(np.float32),
            target=chosen,
            initial_probability=initial,
            final_probability=final,
            iterations=config.iterations,
            seconds=seconds,
        )


def explain(
    network: nn.Module,
    image: Tensor | NDArray[np.floating],
    target: int | None = None,
    config: PerturbationConfig | None = None,
    *,
    output_size: tuple[int, int] | None = None,
) -> Explanation:
    """Attribution map of ``network``'s ``target`` class for ``image`` (meaningful perturbation).

    ``image`` is the model input, ``1 x H x W`` or ``1 x 1 x H x W`` in [0, 1];
    ``target`` defaults to the predicted class; ``config`` to the paper's setting (the
    ``default`` preset); ``output_size`` (H, W) of the heatmap defaults to the image's.
    ``network`` is not modified (a private copy runs, in eval mode).  For many images build one
    :class:`Explainer` instead.  Raises ``ValueError``/``TypeError`` on bad input.
    """
    return Explainer(network).explain(image, target, config, output_size=output_size)


def _optimise(
    network: nn.Module, image: Tensor, target: int | None, config: PerturbationConfig
) -> tuple[Tensor, int, float, float]:
    """Run the mask optimisation; returns ``(best mask 1x1xmxm, target, p before, p after)``."""
    with torch.no_grad():
        probabilities = F.softmax(network(image), dim=1)[0]
    classes = int(probabilities.numel())
    if target is None:
        target = int(probabilities.argmax())
    elif isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < classes:
        raise ValueError(f"target must be a class index in [0, {classes}), not {target!r}")
    initial = float(probabilities[target])

    full_hw = (int(image.shape[-2]), int(image.shape[-1]))
    work_hw = _work_shape(full_hw, config.work_size)
    work = _Objective(network, _resize(image, work_hw), target, config)
    generator = torch.Generator(device=image.device).manual_seed(config.seed)
    side = config.mask_size
    mask = torch.ones(config.restarts, 1, side, side, device=image.device)
    if config.restarts > 1:
        start = torch.rand(
            config.restarts - 1, 1, side, side, generator=generator, device=image.device
        )
        mask[1:] = 0.5 + 0.5 * start
    mask.requires_grad_(True)
    optimizer = torch.optim.Adam([mask], lr=config.lr)
    noise_shape = (config.restarts, 1, *work_hw)
    for _ in range(config.iterations):
        noise = None
        if config.noise_std > 0:
            noise = torch.randn(noise_shape, generator=generator, device=image.device)
            noise.mul_(config.noise_std)
        objective, _ = work.terms(mask, noise)
        (mask.grad,) = torch.autograd.grad(objective.sum(), [mask])
        optimizer.step()
        with torch.no_grad():
            mask.clamp_(0.0, 1.0)

    # Judge the restarts, and report the probability, at the image's own size without noise.
    with torch.no_grad():
        full = work if work_hw == full_hw else _Objective(network, image, target, config)
        objective, probability = full.terms(mask.detach())
        best = int(objective.argmin())
    return mask.detach()[best : best + 1], target, initial, float(probability[best])
