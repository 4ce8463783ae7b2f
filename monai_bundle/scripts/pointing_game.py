"""Pointing game (Zhang et al. 2016) for CoroNet's attribution maps, on phantoms with known lesions.

For each pneumonia and COVID-19 phantom (``phantoms.make_phantom``; synthetic, not clinical) the
map of the TRUE class is computed, and a hit is scored when the map's maximum lies inside the
lesion mask grown by ``tolerance`` pixels (Chebyshev distance; 0 = strictly inside) AND the map
is informative (deleting it lowers the class's probability by the stated share,
:mod:`.attribution`): a blank or powerless map is a miss.  Plateaus of equal maxima (a saturated
mask) are resolved by the highest local mean over a window of three mask cells.

The reference is a random point inside the lung fields: its expected hit rate is the share of
the lung fields inside the grown lesion (the lesions lie in the lungs, so this is the rate a
map that only knows where the lungs are would reach).  The deletion AUC (:mod:`.deletion`,
lower is better) of every map is reported beside it.

    python -m monai_bundle.scripts.pointing_game --weights monai_bundle/models/model.pt \\
        --n 20 --size 128 --mode both --json pointing.json --png pointing.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from tqdm.auto import tqdm

from .attribution import Explainer, PerturbationConfig, load_presets
from .classes import CLASS_NAMES, LESION_CLASSES
from .deletion import deletion_auc
from .networks import CoroNet, load_coronet_weights
from .phantoms import Phantom, make_phantom
from .preprocessing import resize_image

logger = logging.getLogger(__name__)

MODES: dict[str, PerturbationConfig] = load_presets()
#: Phantom seeds start here, well away from the seeds a training run is likely to use.
DEFAULT_SEED_OFFSET = 100_000
#: Default tolerance: 1.5 % of the image side (2 px at 128 px, 4 px at 256 px).
DEFAULT_TOLERANCE_FRACTION = 0.015
#: Phantoms are drawn at this size and resized to the model input like the demo training data
#: (``train_demo.sh`` draws 256 px phantoms; ``preprocessing`` resizes them).
DEFAULT_PHANTOM_SIZE = 256
_PLATEAU = 1e-6
_GRID_EXAMPLES = 3


def heatmap_peak(heatmap: NDArray[np.floating], mask_size: int = 28) -> tuple[int, int]:
    """(row, column) of the maximum of ``heatmap``; ties go to the highest local mean over a
    window of about three mask cells."""
    values = torch.from_numpy(np.ascontiguousarray(heatmap, dtype=np.float32))[None, None]
    top = float(values.max())
    cell = max(1, round(3 * max(values.shape[-2:]) / mask_size)) | 1  # odd window
    local = F.avg_pool2d(values, cell, stride=1, padding=cell // 2, count_include_pad=False)
    local = local[..., : values.shape[-2], : values.shape[-1]]
    score = torch.where(values >= top - _PLATEAU, local, torch.full_like(local, -1.0))
    index = int(score.flatten().argmax())
    return divmod(index, values.shape[-1])


def model_phantom(
    label: str, size: int, seed: int, phantom_size: int = DEFAULT_PHANTOM_SIZE
) -> Phantom:
    """A phantom drawn at ``phantom_size`` and resized to ``size`` as the model sees it; the
    lesion mask is resized the same way and thresholded at one half."""
    phantom = make_phantom(label, phantom_size, seed)
    if phantom_size == size:
        return phantom
    image = resize_image(phantom.image, size)
    mask = resize_image(phantom.lesion_mask.astype(np.float32), size) >= 0.5
    lungs = resize_image(phantom.lung_mask.astype(np.float32), size) >= 0.5
    return dataclasses.replace(phantom, image=image, lesion_mask=mask, lung_mask=lungs)


def grow(mask: NDArray[np.bool_], tolerance: int) -> NDArray[np.bool_]:
    """``mask`` dilated by ``tolerance`` pixels (square structuring element)."""
    if tolerance <= 0:
        return mask.copy()
    tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
    grown = F.max_pool2d(tensor, 2 * tolerance + 1, stride=1, padding=tolerance)
    return grown[0, 0].numpy() > 0.5


@dataclass
class Trial:
    """One phantom explained in one mode."""

    label: str
    seed: int
    mode: str
    hit: bool  # the peak is in the grown lesion and the map is informative
    peak_in_lesion: bool
    informative: bool
    lung_baseline: float  # hit rate of a random point in the lung fields
    deletion_auc: float
    peak: tuple[int, int]
    predicted: str
    probability_before: float
    probability_after: float
    seconds: float


@dataclass
class Summary:
    """Hit rates of one mode over all lesion phantoms (and per class)."""

    mode: str
    n: int
    hit_rate: float
    lung_baseline: float
    deletion_auc: float
    informative_rate: float
    per_class: dict[str, float] = field(default_factory=dict)
    mean_seconds: float = 0.0
    accuracy: float = 0.0


def summarise(trials: Sequence[Trial], mode: str) -> Summary:
    """Aggregate the trials of ``mode``."""
    rows = [t for t in trials if t.mode == mode]
    if not rows:
        raise ValueError(f"no trials for mode {mode!r}")
    per_class = {
        label: float(np.mean([t.hit for t in rows if t.label == label]))
        for label in LESION_CLASSES
        if any(t.label == label for t in rows)
    }
    return Summary(
        mode=mode,
        n=len(rows),
        hit_rate=float(np.mean([t.hit for t in rows])),
        lung_baseline=float(np.mean([t.lung_baseline for t in rows])),
        deletion_auc=float(np.mean([t.deletion_auc for t in rows])),
        informative_rate=float(np.mean([t.informative for t in rows])),
        per_class=per_class,
        mean_seconds=float(np.mean([t.seconds for t in rows])),
        accuracy=float(np.mean([t.predicted == t.label for t in rows])),
    )


def lung_baseline(phantom: Phantom, lesion: NDArray[np.bool_]) -> float:
    """Hit rate of a uniformly random point inside the lung fields: the share of the lung
    fields that lies in ``lesion`` (the grown lesion mask)."""
    lungs = phantom.lung_mask
    if not lungs.any():
        raise ValueError(f"phantom {phantom.seed} has no lung fields")
    return float((lesion & lungs).sum() / lungs.sum())


def play(
    explainer: Explainer,
    phantom: Phantom,
    mode: str,
    config: PerturbationConfig,
    tolerance: int,
) -> tuple[Trial, NDArray[np.float32]]:
    """Explain one phantom's true class and score the map; returns the trial and the heatmap."""
    network = explainer.network
    image = torch.from_numpy(phantom.image)[None]
    target = CLASS_NAMES.index(phantom.label)
    explanation = explainer.explain(image, target=target, config=config)
    with torch.no_grad():
        predicted = CLASS_NAMES[int(network(image[None].to(explainer.device)).argmax())]
    lesion = grow(phantom.lesion_mask, tolerance)
    peak = heatmap_peak(explanation.heatmap, config.mask_size)
    trial = Trial(
        label=phantom.label,
        seed=phantom.seed,
        mode=mode,
        hit=bool(lesion[peak]) and explanation.informative,
        peak_in_lesion=bool(lesion[peak]),
        informative=explanation.informative,
        lung_baseline=lung_baseline(phantom, lesion),
        deletion_auc=deletion_auc(
            network, phantom.image, explanation.heatmap, target, temperature=explainer.temperature
        ),
        peak=peak,
        predicted=predicted,
        probability_before=explanation.probability_before,
        probability_after=explanation.probability_after,
        seconds=explanation.seconds,
    )
    return trial, explanation.heatmap


def format_table(summaries: Sequence[Summary], tolerance: int, size: int) -> str:
    """Hit rates (%) per mode and class, with the lung-field reference and the deletion AUC."""
    header = (
        f"{'mode':<8} {'n':>4} {'hit %':>6} "
        + " ".join(f"{label + ' %':>12}" for label in LESION_CLASSES)
        + f" {'lung %':>7} {'del AUC':>8} {'inform %':>9} {'s/image':>8} {'acc %':>6}"
    )
    lines = [f"pointing game, {size} px, tolerance {tolerance} px", header, "-" * len(header)]
    for s in summaries:
        per_class = " ".join(
            f"{100 * s.per_class[c]:12.1f}" if c in s.per_class else f"{'-':>12}"
            for c in LESION_CLASSES
        )
        lines.append(
            f"{s.mode:<8} {s.n:>4} {100 * s.hit_rate:6.1f} {per_class} "
            f"{100 * s.lung_baseline:7.1f} {s.deletion_auc:8.3f} {100 * s.informative_rate:9.1f} "
            f"{s.mean_seconds:8.2f} {100 * s.accuracy:6.1f}"
        )
    return "\n".join(lines)


def save_grid(
    examples: Sequence[tuple[Phantom, dict[str, tuple[Trial, NDArray[np.float32]]]]],
    path: Path,
) -> None:
    """PNG grid: each row a phantom (lesion outlined), then each mode's map with its peak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(examples[0][1]) if examples else []
    columns = 1 + len(modes)
    fig, axes = plt.subplots(
        len(examples), columns, figsize=(3.2 * columns, 3.2 * len(examples)), squeeze=False
    )
    for row, (phantom, maps) in enumerate(examples):
        ax = axes[row][0]
        ax.imshow(phantom.image, cmap="gray", vmin=0, vmax=1)
        ax.contour(phantom.lesion_mask, levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(f"{phantom.label} (seed {phantom.seed})", fontsize=8)
        for column, mode in enumerate(modes, start=1):
            trial, heatmap = maps[mode]
            ax = axes[row][column]
            ax.imshow(phantom.image, cmap="gray", vmin=0, vmax=1)
            ax.imshow(heatmap, cmap="viridis", vmin=0, vmax=1, alpha=0.5)
            ax.contour(phantom.lesion_mask, levels=[0.5], colors="red", linewidths=0.8)
            ax.plot(trial.peak[1], trial.peak[0], marker="+", color="white", markersize=12)
            verdict = "hit" if trial.hit else "miss"
            ax.set_title(
                f"{mode}: {verdict}, p {trial.probability_before:.2f}->"
                f"{trial.probability_after:.2f}, {trial.seconds:.1f} s",
                fontsize=8,
            )
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("Synthetic phantoms - lesion in red, map maximum +", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(
    network: CoroNet,
    n: int,
    size: int,
    modes: Sequence[str],
    tolerance: int,
    seed_offset: int = DEFAULT_SEED_OFFSET,
    progress: bool = True,
    phantom_size: int = DEFAULT_PHANTOM_SIZE,
) -> tuple[list[Trial], list[tuple[Phantom, dict[str, tuple[Trial, NDArray[np.float32]]]]]]:
    """Play ``n`` phantoms per lesion class in every mode; returns trials and grid examples."""
    trials: list[Trial] = []
    examples: list[tuple[Phantom, dict[str, tuple[Trial, NDArray[np.float32]]]]] = []
    jobs = [(label, seed_offset + i) for label in LESION_CLASSES for i in range(n)]
    explainer = Explainer(network)
    bar = tqdm(total=len(jobs) * len(modes), desc="pointing game", disable=not progress)
    for label, seed in jobs:
        phantom = model_phantom(label, size, seed, phantom_size)
        maps: dict[str, tuple[Trial, NDArray[np.float32]]] = {}
        for mode in modes:
            trial, heatmap = play(explainer, phantom, mode, MODES[mode], tolerance)
            trials.append(trial)
            maps[mode] = (trial, heatmap)
            bar.set_postfix(mode=mode, hit=trial.hit, s=f"{trial.seconds:.1f}")
            bar.update()
        if seed - seed_offset < _GRID_EXAMPLES:
            examples.append((phantom, maps))
    bar.close()
    return trials, examples


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, required=True, help="whole-CoroNet state_dict")
    parser.add_argument("--n", type=int, default=20, help="phantoms per lesion class")
    parser.add_argument("--size", type=int, default=128, help="model input size")
    parser.add_argument(
        "--phantom-size",
        type=int,
        default=DEFAULT_PHANTOM_SIZE,
        help="size the phantoms are drawn at before resizing to --size",
    )
    parser.add_argument("--mode", choices=[*MODES, "both"], default="both")
    parser.add_argument(
        "--tolerance",
        type=int,
        default=None,
        help="hit tolerance in px (default: 1.5%% of --size, 2 px at 128)",
    )
    parser.add_argument("--seed-offset", type=int, default=DEFAULT_SEED_OFFSET)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--json", type=Path, default=None, help="write trials and summary here")
    parser.add_argument("--png", type=Path, default=None, help="write a grid of examples here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.n < 1:
        raise SystemExit("--n must be at least 1")
    torch.set_num_threads(args.threads)
    tolerance = (
        args.tolerance
        if args.tolerance is not None
        else round(DEFAULT_TOLERANCE_FRACTION * args.size)
    )
    network = CoroNet()
    load_coronet_weights(network, args.weights)
    network.eval()
    modes = list(MODES) if args.mode == "both" else [args.mode]
    start = time.perf_counter()
    trials, examples = run(
        network, args.n, args.size, modes, tolerance, args.seed_offset, True, args.phantom_size
    )
    summaries = [summarise(trials, mode) for mode in modes]
    print(format_table(summaries, tolerance, args.size))
    logger.info("pointing game took %.0f s", time.perf_counter() - start)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "size": args.size,
            "tolerance_px": tolerance,
            "configs": {mode: asdict(MODES[mode]) for mode in modes},
            "summary": [asdict(s) for s in summaries],
            "trials": [asdict(t) for t in trials],
        }
        args.json.write_text(json.dumps(payload, indent=2))
    if args.png is not None and examples:
        save_grid(examples, args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
