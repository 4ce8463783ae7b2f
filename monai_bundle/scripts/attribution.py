"""Attribution maps by meaningful perturbation (Fong & Vedaldi 2017; CoroNet paper section 3.4).

A small mask ``m`` (28 x 28) is upsampled bilinearly to the image size and blends the radiograph
with a blurred copy of itself, ``x * m + blur(x) * (1 - m)``.  The perturbed image goes through
the WHOLE CoroNet pipeline (both FPAEs, the residual tensor and the classifier), and Adam
minimises::

    l1_coeff * mean|1 - m|  +  tv_coeff * TV_beta(m)  +  score(net(perturbed))[target]

with ``m`` clamped to [0, 1] after every step.  The heatmap shown to the reader is ``1 - m``:
the regions whose deletion lowers the target class most.

The score (``objective``) is the target class's log-probability, computed with
``log_softmax``.  The paper's softmax probability saturates: past a logit margin of about 17
the float32 softmax is exactly 1, its gradient exactly 0, the mask never moves and the map is
blank (21 of 40 phantoms with the demo weights).  ``log_softmax`` keeps a gradient at any
margin.  ``objective: "probability"`` keeps the paper's score for comparison.

Every map reports the target probability before and after its deletion, with the caller's
calibration ``temperature``; a map is *informative* when deleting it lowers that probability by
at least ``min_drop`` of its value (half, by default).  A map that is not must say so.

``warm_start: "gradient"`` starts the mask from a gradient map instead of ``m = 1``: the
positive part of ``d log p / dx * (x - blur(x))`` (the first-order change of the log-probability
when the image is blurred), averaged over the mask's cells, as ``m = 1 - map / max(map)``.  A
few Adam steps then refine it against the same objective.

Two presets, bundle config data (``attribution`` in ``configs/inference.json``, read by
:func:`load_presets`), measured with ``bench/heatmap.py`` (figures in ``docs/benchmarks.md`` at
the repository root): ``default`` is the paper's method, 300 Adam steps from ``m = 1``; ``fast``
warm-starts from the gradient map and takes Adam steps until the mask is informative (at least
two, at most ten; ``stop_when_informative``).  Both optimise at the model's input
size: a lower working resolution feeds the network images it was not trained at, and the maps
then lose the lesion.

Several images are explained together by :meth:`Explainer.explain_batch`: their masks go
through the network as one batch (the terms are per image and Adam is elementwise, so each
mask follows exactly the path it would alone).  Results are deterministic for a fixed
``seed``: all randomness comes from a local ``torch.Generator``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
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
OBJECTIVES = ("logit_margin", "log_probability", "probability")
WARM_STARTS = ("none", "gradient")

#: Largest image side accepted: hundreds of backward passes through two full-resolution FPAEs
#: need memory that grows with the pixel count (about 4 GiB at 1024 x 1024).
MAX_IMAGE_SIZE = 1024


@dataclass(frozen=True)
class PerturbationConfig:
    """Settings of the mask optimisation.

    - ``iterations``, ``lr``: Adam steps and learning rate on the mask (0: the start mask).
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
    - ``objective``: ``log_probability`` (the target's ``log_softmax``) or ``probability`` (the
      paper's softmax probability, which saturates).
    - ``warm_start``: ``none`` (``m = 1``, the paper's) or ``gradient`` (see the module text).
    - ``min_drop``: the share of the target probability deleting the map must remove for the
      map to be informative.
    - ``stop_when_informative``, ``min_iterations``: stop an image's optimisation at the first
      informative mask after at least ``min_iterations`` steps (``iterations`` is then the
      most); the paper's method runs all its steps.
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
    objective: str = "logit_margin"
    warm_start: str = "none"
    min_drop: float = 0.5
    stop_when_informative: bool = False
    min_iterations: int = 0

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, not {self.objective!r}")
        if self.warm_start not in WARM_STARTS:
            raise ValueError(f"warm_start must be one of {WARM_STARTS}, not {self.warm_start!r}")
        if not (isinstance(self.min_drop, int | float) and 0.0 < self.min_drop < 1.0):
            raise ValueError(f"min_drop must be in (0, 1), not {self.min_drop!r}")
        if (
            isinstance(self.iterations, bool)
            or not isinstance(self.iterations, int)
            or self.iterations < 0
        ):
            raise ValueError(f"iterations must be a non-negative integer, not {self.iterations!r}")
        positive_ints = {
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
        if not isinstance(self.stop_when_informative, bool):
            raise ValueError(
                f"stop_when_informative must be true or false, not {self.stop_when_informative!r}"
            )
        if (
            isinstance(self.min_iterations, bool)
            or not isinstance(self.min_iterations, int)
            or not 0 <= self.min_iterations <= self.iterations
        ):
            raise ValueError(
                f"min_iterations must be in [0, iterations], not {self.min_iterations!r}"
            )
        if self.stop_when_informative and (
            self.restarts != 1 or self.noise_std > 0 or self.work_size is not None
        ):
            raise ValueError(
                "stop_when_informative needs one restart, no noise and no work_size: each step "
                "then judges the mask it is given"
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
    ``mask`` the optimised ``mask_size x mask_size`` mask; the probabilities are those of
    ``target`` (softmax of the logits over the explainer's temperature) for the image and for
    the image with the map deleted, both at the image's own size; ``informative`` says whether
    the deletion removed at least ``min_drop`` of it; ``iterations`` the Adam steps taken
    (fewer than the config's when it stops at an informative mask); ``seconds`` is the wall
    time of the call (of the whole batch for :meth:`Explainer.explain_batch`).
    """

    heatmap: NDArray[np.float32]
    mask: NDArray[np.float32]
    target: int
    probability_before: float
    probability_after: float
    informative: bool
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


def class_score(logits: Tensor, targets: Tensor, objective: str) -> Tensor:
    """Per row, the score of class ``targets`` that the mask optimisation lowers:

    * ``logit_margin``: ``softplus(z_t - max_{j != t} z_j)``, whose gradient tends to that of
      the margin itself while the class leads (it never vanishes with confidence) and to 0
      once another class leads by far (the mask stops deleting);
    * ``log_probability``: ``log_softmax(z)_t``;
    * ``probability``: ``softmax(z)_t``, the paper's.
    """
    logits = logits.float()
    own = logits.gather(1, targets[:, None])[:, 0]
    if objective == "logit_margin":
        others = logits.scatter(1, targets[:, None], float("-inf"))
        return F.softplus(own - others.amax(dim=1))
    log_p = F.log_softmax(logits, dim=1).gather(1, targets[:, None])[:, 0]
    return log_p.exp() if objective == "probability" else log_p


class _Objective:
    """The perturbed-image objective for a batch of images at one size, each with its target
    and ``restarts`` masks (rows ``i * restarts + r``); blurred baselines precomputed."""

    def __init__(
        self, network: nn.Module, images: Tensor, targets: Tensor, config: PerturbationConfig
    ) -> None:
        self.network = network
        self.config = config
        self.size = (int(images.shape[-2]), int(images.shape[-1]))
        repeat = config.restarts
        self.targets = targets.repeat_interleave(repeat)
        baseline = blur(images, config)
        self.baseline = baseline.repeat_interleave(repeat, dim=0)
        # perturbed = baseline + difference * m
        self.difference = (images - baseline).repeat_interleave(repeat, dim=0)

    def perturb(self, mask: Tensor) -> Tensor:
        perturbed = torch.addcmul(self.baseline, self.difference, _upsample(mask, self.size))
        return perturbed.contiguous(memory_format=torch.channels_last)

    def score(self, logits: Tensor) -> Tensor:
        """The objective's class score per row (see ``PerturbationConfig.objective``)."""
        return class_score(logits, self.targets, self.config.objective)

    def terms(self, mask: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per-row ``(objective, logits)`` for masks ``N x 1 x m x m``."""
        perturbed = self.perturb(mask)
        if noise is not None:
            perturbed = (perturbed + noise).clamp(0.0, 1.0)
        logits = self.network(perturbed)
        cfg = self.config
        l1 = (1.0 - mask).abs().flatten(1).mean(dim=1)
        tv = total_variation(mask, cfg.tv_beta)
        return cfg.l1_coeff * l1 + cfg.tv_coeff * tv + self.score(logits), logits


def _gradient_start(
    network: nn.Module, images: Tensor, wanted: Sequence[int | None], config: PerturbationConfig
) -> tuple[Tensor, Tensor, list[int]]:
    """Start masks ``m = 1 - map / max(map)`` from each image's gradient map (see the module
    text), one per image (``m = 1`` where the map is zero), with the logits of the same forward
    pass and the targets they give."""
    x = images.detach().requires_grad_(True)
    logits = network(x.contiguous(memory_format=torch.channels_last)).float()
    targets = _targets(logits.detach(), wanted)
    chosen = torch.tensor(targets, device=images.device)
    (gradient,) = torch.autograd.grad(class_score(logits, chosen, config.objective).sum(), [x])
    with torch.no_grad():
        difference = images - blur(images, config)
        change = F.relu(gradient * difference)  # first-order gain of deleting each pixel
        cells = F.adaptive_avg_pool2d(change, config.mask_size)
        top = cells.flatten(1).amax(dim=1).clamp_min(torch.finfo(cells.dtype).tiny)
        return 1.0 - cells / top.view(-1, 1, 1, 1), logits.detach(), targets


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
    """Meaningful-perturbation maps for one network; build once, call :meth:`explain` per image
    or :meth:`explain_batch` for several.

    Holds a private copy of ``network`` (a snapshot: later changes to ``network`` are not seen)
    in eval mode, without parameter gradients, with 4-D weights in channels-last layout, which
    makes the gradient passes through the FPAEs' thin full-resolution convolutions about 20 %
    cheaper on CPU.  The caller's network is never modified.  ``temperature`` is the
    calibration of the reported probabilities (``softmax(logits / T)``); it does not change
    the maps.
    """

    def __init__(self, network: nn.Module, temperature: float = 1.0) -> None:
        if not isinstance(network, nn.Module):
            raise TypeError(f"network must be a torch nn.Module, not {type(network).__name__}")
        if not (isinstance(temperature, int | float) and math.isfinite(temperature)):
            raise TypeError(f"temperature must be a number, not {temperature!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, not {temperature}")
        self.network = copy.deepcopy(network).eval().requires_grad_(False)
        self.device = _network_device(self.network)
        self.temperature = float(temperature)
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
        return self.explain_batch([image], [target], config, output_size=output_size)[0]

    def explain_batch(
        self,
        images: Sequence[Tensor | NDArray[np.floating]],
        targets: Sequence[int | None] | None = None,
        config: PerturbationConfig | None = None,
        *,
        output_size: tuple[int, int] | None = None,
    ) -> list[Explanation]:
        """Attribution maps of several images of one size, optimised together in batches; each
        map is the one :meth:`explain` gives for its image alone."""
        start = time.perf_counter()
        config = PerturbationConfig() if config is None else config
        if not isinstance(config, PerturbationConfig):
            raise TypeError(f"config must be a PerturbationConfig, not {type(config).__name__}")
        if not len(images):
            raise ValueError("no images to explain")
        wanted = [None] * len(images) if targets is None else list(targets)
        if len(wanted) != len(images):
            raise ValueError(f"{len(images)} images but {len(wanted)} targets")
        checked = [_as_batch(image) for image in images]
        sizes = sorted({tuple(image.shape[-2:]) for image in checked})
        if len(sizes) > 1:
            raise ValueError(f"explain_batch needs images of one size, got {sizes}")
        batch = torch.cat(checked).to(self.device)
        out_hw = tuple(batch.shape[-2:]) if output_size is None else tuple(output_size)
        if len(out_hw) != 2 or min(out_hw) < 1:
            raise ValueError(f"output_size must be (height, width) > 0, not {output_size!r}")
        with torch.inference_mode(False), torch.enable_grad():
            found = _optimise(self.network, batch, wanted, config, self.temperature)
        masks, chosen, before, after, steps = found
        with torch.no_grad():
            heatmaps = 1.0 - _upsample(masks, (int(out_hw[0]), int(out_hw[1])))
            p_before = F.softmax(before / self.temperature, dim=1)
            p_after = F.softmax(after / self.temperature, dim=1)
        seconds = time.perf_counter() - start
        explanations = []
        for row, target in enumerate(chosen):
            probability_before = float(p_before[row, target])
            probability_after = float(p_after[row, target])
            informative = probability_after <= (1.0 - config.min_drop) * probability_before
            logger.debug(
                "explained class %d: p %.4f -> %.4f (%s) in %d iterations",
                target, probability_before, probability_after,
                "informative" if informative else "not informative", config.iterations,
            )  # fmt: skip
            explanations.append(
                Explanation(
                    heatmap=heatmaps[row, 0].clamp(0.0, 1.0).cpu().numpy().astype(np.float32),
                    mask=masks[row, 0].cpu().numpy().astype(np.float32),
                    target=target,
                    probability_before=probability_before,
                    probability_after=probability_after,
                    informative=informative,
                    iterations=steps[row],
                    seconds=seconds,
                )
            )
        return explanations


def explain(
    network: nn.Module,
    image: Tensor | NDArray[np.floating],
    target: int | None = None,
    config: PerturbationConfig | None = None,
    *,
    output_size: tuple[int, int] | None = None,
    temperature: float = 1.0,
) -> Explanation:
    """Attribution map of ``network``'s ``target`` class for ``image`` (meaningful perturbation).

    ``image`` is the model input, ``1 x H x W`` or ``1 x 1 x H x W`` in [0, 1];
    ``target`` defaults to the predicted class; ``config`` to the paper's setting (the
    ``default`` preset); ``output_size`` (H, W) of the heatmap defaults to the image's;
    ``temperature`` calibrates the reported probabilities.  ``network`` is not modified (a
    private copy runs, in eval mode).  For many images build one :class:`Explainer` instead.
    Raises ``ValueError``/``TypeError`` on bad input.
    """
    return Explainer(network, temperature).explain(image, target, config, output_size=output_size)


def _targets(logits: Tensor, wanted: Sequence[int | None]) -> list[int]:
    """The class to explain per image: as given, or the predicted one."""
    classes = int(logits.shape[1])
    chosen = []
    for row, target in enumerate(wanted):
        if target is None:
            chosen.append(int(logits[row].argmax()))
        elif isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < classes:
            raise ValueError(f"target must be a class index in [0, {classes}), not {target!r}")
        else:
            chosen.append(target)
    return chosen


def _optimise(
    network: nn.Module,
    images: Tensor,
    wanted: Sequence[int | None],
    config: PerturbationConfig,
    temperature: float = 1.0,
) -> tuple[Tensor, list[int], Tensor, Tensor, list[int]]:
    """Run the mask optimisation for a batch; returns ``(best masks B x 1 x m x m, targets,
    logits before, logits after, Adam steps taken)``, both logits at the images' own size."""
    full_hw = (int(images.shape[-2]), int(images.shape[-1]))
    work_hw = _work_shape(full_hw, config.work_size)
    work_images = _resize(images, work_hw)
    side, repeat, count = config.mask_size, config.restarts, int(images.shape[0])
    start: Tensor | None = None
    if config.warm_start == "gradient" and work_hw == full_hw:  # one forward pass for both
        start, before, targets = _gradient_start(network, images, wanted, config)
    else:
        with torch.no_grad():
            before = network(images).float()
        targets = _targets(before, wanted)
        if config.warm_start == "gradient":
            start, _, _ = _gradient_start(network, work_images, targets, config)
    target_tensor = torch.tensor(targets, device=images.device)
    work = _Objective(network, work_images, target_tensor, config)
    # One generator per image, all seeded alike: an image draws the same noise and random
    # starts in a batch as alone.
    generators = [
        torch.Generator(device=images.device).manual_seed(config.seed) for _ in range(count)
    ]

    def draw(shape: tuple[int, ...], uniform: bool) -> Tensor:
        sample = torch.rand if uniform else torch.randn
        parts = [sample(shape, generator=g, device=images.device) for g in generators]
        return torch.cat(parts)

    mask = torch.ones(count * repeat, 1, side, side, device=images.device)
    if start is not None:
        mask = start.repeat_interleave(repeat, dim=0)
    if repeat > 1:  # restart 0 of each image keeps its start, the others start at random
        randoms = draw((1, repeat - 1, side, side), uniform=True)
        mask.view(count, repeat, side, side)[:, 1:] = 0.5 + 0.5 * randoms
    mask = mask.detach().requires_grad_(True)
    optimizer = torch.optim.Adam([mask], lr=config.lr)
    if config.stop_when_informative:
        return _optimise_until_informative(work, mask, optimizer, before, config, temperature)
    for _ in range(config.iterations):
        noise = None
        if config.noise_std > 0:
            noise = draw((repeat, 1, *work_hw), uniform=False).mul_(config.noise_std)
        objective, _ = work.terms(mask, noise)
        (mask.grad,) = torch.autograd.grad(objective.sum(), [mask])
        optimizer.step()
        with torch.no_grad():
            mask.clamp_(0.0, 1.0)

    # Judge the restarts, and report the probability, at the images' own size without noise.
    with torch.no_grad():
        full = work if work_hw == full_hw else _Objective(network, images, target_tensor, config)
        objective, logits = full.terms(mask.detach())
        rows = torch.arange(count, device=images.device) * repeat
        best = objective.view(count, repeat).argmin(dim=1) + rows
    return mask.detach()[best], targets, before, logits.float()[best], [config.iterations] * count


def _optimise_until_informative(
    work: _Objective,
    mask: Tensor,
    optimizer: torch.optim.Optimizer,
    before: Tensor,
    config: PerturbationConfig,
    temperature: float,
) -> tuple[Tensor, list[int], Tensor, Tensor, list[int]]:
    """Adam steps until each image's mask is informative (after at least ``min_iterations``
    steps) or ``iterations`` steps were taken; each image keeps the first informative mask.
    The forward pass of each step judges the mask it is given, so no pass is spent on the end.
    (One mask per image, no noise, the images' own size: checked by the config.)"""
    targets = work.targets
    rows = torch.arange(len(targets), device=mask.device)
    wanted = F.softmax(before / temperature, dim=1)[rows, targets] * (1.0 - config.min_drop)
    kept, kept_logits = mask.detach().clone(), before.clone()
    steps = torch.zeros(len(targets), dtype=torch.long, device=mask.device)
    done = torch.zeros(len(targets), dtype=torch.bool, device=mask.device)
    for step in range(config.iterations + 1):
        objective, logits = work.terms(mask)
        logits = logits.detach().float()
        informative = F.softmax(logits / temperature, dim=1)[rows, targets] <= wanted
        last = step == config.iterations
        take = ~done & ((informative & (step >= config.min_iterations)) | last)
        kept[take], kept_logits[take], steps[take] = mask.detach()[take], logits[take], step
        done |= take
        if bool(done.all()):
            break
        (mask.grad,) = torch.autograd.grad(objective.sum(), [mask])
        optimizer.step()
        with torch.no_grad():
            mask.clamp_(0.0, 1.0)
    return kept, targets.tolist(), before, kept_logits, steps.tolist()
