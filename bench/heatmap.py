"""Attribution maps side by side: cost as a ratio to one forward pass, pointing game, deletion AUC
and the lung-field baseline, for every method tried, on the same phantoms in one run.

Methods (``--methods``):

* ``default``, ``fast``: the bundle's presets (``configs/inference.json``), as the worker runs
  them;
* ``paper``: the default preset with the paper's objective (the softmax probability), which
  saturates;
* ``mp40``: the former fast preset, 40 Adam steps (lr 0.25) from ``m = 1``;
* ``fast-2``: the fast preset's start and two Adam steps, without stopping at an informative
  mask;
* ``gradient``: the fast preset's gradient start alone (no Adam step);
* ``gradcam3``, ``gradcam4``: Grad-CAM (Selvaraju et al. 2017) of the ResNet-18 on the residual
  tensor, at layer 3 and layer 4, of the same class score.

Each map is scored as :mod:`monai_bundle.scripts.pointing_game` does: a hit when its peak lies
in the lesion (grown by 1.5 % of the side) and the map is informative, i.e. deleting it lowers
the class's calibrated probability by at least half (the perturbation methods' own mask; for
Grad-CAM ``m = 1 - map`` at the mask's 28 x 28 cells).  The deletion AUC is
:mod:`monai_bundle.scripts.deletion`'s (lower is better).  The lung-field baseline is the hit
rate of a random point inside the lungs.  The forward pass is ``CoroNet(x)`` under
``inference_mode``, timed between the maps so background load hits both.

    python -m bench.heatmap --n 20 --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import Tensor, nn
from tqdm import tqdm

from bench.common import median
from monai_bundle.scripts.attribution import (
    Explainer,
    PerturbationConfig,
    blur,
    class_score,
    load_presets,
)
from monai_bundle.scripts.classes import CLASS_NAMES, LESION_CLASSES
from monai_bundle.scripts.deletion import deletion_auc
from monai_bundle.scripts.networks import CoroNet, load_coronet_weights
from monai_bundle.scripts.pointing_game import (
    DEFAULT_SEED_OFFSET,
    DEFAULT_TOLERANCE_FRACTION,
    grow,
    heatmap_peak,
    lung_baseline,
    model_phantom,
)
from monai_bundle.scripts.trust import load_trust_model

PRESETS = load_presets()
BUNDLE = Path("monai_bundle")
#: A method: (image, target) -> (heatmap, informative), ``None`` when the method has no mask of
#: its own (its map is then deleted as a mask, see :func:`probability_after`).
Map = Callable[[Tensor, int], tuple[NDArray[np.float32], bool | None]]


def _mp(explainer: Explainer, config: PerturbationConfig) -> Map:
    def run(image: Tensor, target: int) -> tuple[NDArray[np.float32], bool | None]:
        explanation = explainer.explain(image, target, config)
        return explanation.heatmap, explanation.informative

    return run


def _gradcam(network: CoroNet, layer: str, objective: str) -> Map:
    """Grad-CAM of the residual ResNet at ``layer``, upsampled and scaled to [0, 1]."""
    module = getattr(network.classifier, layer)

    def run(image: Tensor, target: int) -> tuple[NDArray[np.float32], bool | None]:
        captured: list[Tensor] = []
        hook = module.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            with torch.enable_grad():
                logits = network(image[None].clone().requires_grad_(True))
                activations = captured[0]
                score = class_score(logits, torch.tensor([target]), objective).sum()
                (gradient,) = torch.autograd.grad(score, [activations])
        finally:
            hook.remove()
        weights = gradient.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * activations).sum(dim=1, keepdim=True)).detach()
        cam = F.interpolate(cam, size=image.shape[-2:], mode="bilinear", align_corners=False)
        cam = cam / cam.amax().clamp_min(torch.finfo(cam.dtype).tiny)
        return cam[0, 0].numpy().astype(np.float32), None

    return run


def methods(network: CoroNet, explainer: Explainer) -> dict[str, Map]:
    default, fast = PRESETS["default"], PRESETS["fast"]
    return {
        "default": _mp(explainer, default),
        "fast": _mp(explainer, fast),
        "paper": _mp(explainer, dataclasses.replace(default, objective="probability")),
        "mp40": _mp(
            explainer, dataclasses.replace(default, iterations=40, lr=0.25, warm_start="none")
        ),
        "fast-2": _mp(
            explainer,
            dataclasses.replace(fast, iterations=2, min_iterations=0, stop_when_informative=False),
        ),
        "gradient": _mp(
            explainer,
            dataclasses.replace(fast, iterations=0, min_iterations=0, stop_when_informative=False),
        ),
        "gradcam3": _gradcam(network, "layer3", default.objective),
        "gradcam4": _gradcam(network, "layer4", default.objective),
    }


@torch.no_grad()
def probability_after(
    network: nn.Module, image: Tensor, heatmap: NDArray[np.float32], target: int, temperature: float
) -> float:
    """The class's probability once the map is deleted: ``m = 1 - map`` at the mask's cells,
    upsampled, blending the image with its blur as the perturbation does."""
    cells = PRESETS["default"].mask_size
    heat = torch.from_numpy(heatmap)[None, None]
    mask = 1.0 - F.adaptive_avg_pool2d(heat, cells)
    mask = F.interpolate(mask, size=image.shape[-2:], mode="bilinear", align_corners=False)
    x = image[None]
    baseline = blur(x)
    logits = network(x * mask + baseline * (1.0 - mask)).float()
    return float(F.softmax(logits / temperature, dim=1)[0, target])


@dataclass
class Score:
    seconds: list[float] = field(default_factory=list)
    hits: list[bool] = field(default_factory=list)
    informative: list[bool] = field(default_factory=list)
    deletion: list[float] = field(default_factory=list)
    blank: int = 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="phantoms per lesion class")
    parser.add_argument("--size", type=int, default=None, help="model input (default: bundle)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--methods", default=None, help="comma-separated (default: all)")
    parser.add_argument("--bundle", type=Path, default=BUNDLE)
    parser.add_argument("--seed-offset", type=int, default=DEFAULT_SEED_OFFSET)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = json.loads((args.bundle / "configs" / "inference.json").read_text())
    size = args.size or int(config["image_size"])
    tolerance = round(DEFAULT_TOLERANCE_FRACTION * size)
    network = CoroNet()
    load_coronet_weights(network, args.bundle / "models" / "model.pt")
    network.eval().requires_grad_(False)
    temperature = load_trust_model(args.bundle / "models" / "trust.pt").temperature
    explainer = Explainer(network, temperature)
    available = methods(network, explainer)
    chosen = args.methods.split(",") if args.methods else list(available)
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {sorted(available)}")
    min_drop = PRESETS["default"].min_drop
    scores = {name: Score() for name in chosen}
    forward_s: list[float] = []
    baselines: list[float] = []
    jobs = [(label, args.seed_offset + i) for label in LESION_CLASSES for i in range(args.n)]
    warm = torch.from_numpy(model_phantom("normal", size, 1).image)[None]
    for name in chosen:  # oneDNN builds its kernels on the first call of each shape
        available[name](warm, 1)
    for label, seed in tqdm(jobs, desc="phantoms", unit="img"):
        phantom = model_phantom(label, size, seed)
        image = torch.from_numpy(phantom.image)[None]
        target = CLASS_NAMES.index(label)
        lesion = grow(phantom.lesion_mask, tolerance)
        baselines.append(lung_baseline(phantom, lesion))
        for name in chosen:
            start = time.perf_counter()
            with torch.inference_mode():
                network(image[None])
            forward_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            heatmap, informative = available[name](image, target)
            score = scores[name]
            score.seconds.append(time.perf_counter() - start)
            with torch.inference_mode():
                before = float(
                    F.softmax(network(image[None]).float() / temperature, dim=1)[0, target]
                )
            if informative is None:
                after = probability_after(network, image, heatmap, target, temperature)
                informative = after <= (1.0 - min_drop) * before
            score.informative.append(informative)
            score.hits.append(bool(lesion[heatmap_peak(heatmap)]) and informative)
            score.deletion.append(
                deletion_auc(network, phantom.image, heatmap, target, temperature=temperature)
            )
            score.blank += int(float(heatmap.max() - heatmap.min()) < 1e-6)
    forward = median(forward_s)
    lung = float(np.mean(baselines))
    print(
        f"{len(jobs)} lesion phantoms at {size} px, {args.threads} threads; one forward pass "
        f"{1000 * forward:.1f} ms; hit = peak in the lesion (tolerance {tolerance} px) and the "
        f"map informative (deleting it removes >= {min_drop:.0%} of the class probability)"
    )
    header = f"{'method':10} {'ms/map':>8} {'x forward':>9} {'hit %':>6} {'vs lung':>8} " + (
        f"{'del AUC':>8} {'inform %':>9} {'blank':>6}"
    )
    print(header)
    print("-" * len(header))
    figures = {}
    for name in chosen:
        score = scores[name]
        seconds = median(score.seconds)
        hit = float(np.mean(score.hits))
        figures[name] = {
            "ms_per_map": 1000 * seconds,
            "ratio_to_forward": seconds / forward,
            "pointing_game": hit,
            "deletion_auc": float(np.mean(score.deletion)),
            "informative": float(np.mean(score.informative)),
            "blank": score.blank,
        }
        print(
            f"{name:10} {1000 * seconds:8.0f} {seconds / forward:9.1f} {100 * hit:6.1f} "
            f"{hit / lung:7.1f}x {np.mean(score.deletion):8.3f} "
            f"{100 * np.mean(score.informative):9.1f} {score.blank:6d}"
        )
    print(f"{'lung field':10} {'':8} {'':9} {100 * lung:6.1f} {'1.0x':>8}  (random point in lungs)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "size": size,
            "threads": args.threads,
            "phantoms": len(jobs),
            "forward_ms": 1000 * forward,
            "lung_field_baseline": lung,
            "methods": figures,
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
