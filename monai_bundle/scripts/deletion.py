"""Deletion metric of an attribution map (Petsiuk et al. 2018, RISE), with the paper's blur.

The pixels are deleted (replaced by the blurred image, the baseline of the maps themselves) in
order of decreasing map value, in ``steps`` equal parts; the target class's probability is
read after each part, and the area under that curve over the deleted fraction [0, 1] is the
score.  Lower is better: a faithful map names first what the model needs most.  Ties (a
saturated plateau) are deleted in raster order.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn

from .attribution import PerturbationConfig, blur

DEFAULT_STEPS = 20


@torch.no_grad()
def deletion_curve(
    network: nn.Module,
    image: NDArray[np.floating],
    heatmap: NDArray[np.floating],
    target: int,
    steps: int = DEFAULT_STEPS,
    temperature: float = 1.0,
    config: PerturbationConfig | None = None,
) -> NDArray[np.float64]:
    """The target probability after deleting 0, 1/steps, ..., all of the pixels (steps + 1)."""
    if image.shape != heatmap.shape or image.ndim != 2:
        raise ValueError(f"image {image.shape} and heatmap {heatmap.shape} must be one H x W")
    if steps < 1:
        raise ValueError(f"steps must be positive, not {steps}")
    device = next(network.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(device)
    baseline = blur(x, config)
    order = torch.from_numpy(np.ascontiguousarray(heatmap, dtype=np.float32)).flatten()
    order = order.argsort(descending=True, stable=True).to(device)
    count = order.numel()
    keep = torch.ones(steps + 1, count, device=device)
    for part in range(1, steps + 1):
        keep[part, order[: round(count * part / steps)]] = 0.0
    keep = keep.view(steps + 1, *x.shape[1:])
    logits = network(x * keep + baseline * (1.0 - keep)).float()  # one batch, steps + 1 images
    probabilities = F.softmax(logits / temperature, dim=1)[:, target]
    return probabilities.cpu().numpy().astype(np.float64)


def deletion_auc(
    network: nn.Module,
    image: NDArray[np.floating],
    heatmap: NDArray[np.floating],
    target: int,
    steps: int = DEFAULT_STEPS,
    temperature: float = 1.0,
) -> float:
    """Area under :func:`deletion_curve` (trapezoids over the deleted fraction), in [0, 1]."""
    curve = deletion_curve(network, image, heatmap, target, steps, temperature)
    return float(np.trapezoid(curve, dx=1.0 / steps))
