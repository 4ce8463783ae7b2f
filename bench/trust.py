"""What the trust model does: the gate on held-out phantoms and on images the model never saw,
and the calibration, against the same model without them (the reference).

In distribution: phantoms of every class from a seed no training, fitting or test uses
(``--seed``), drawn at 256 px and resized by the bundle's pre-processing as the worker does.
Out of distribution: the set of ``tests/support/ood.py``, written as CR frontal chest DICOM
files and decoded by the bundle's DICOM reader: pydicom-data's real adult PA chest RG1 in both
polarities, CT_small, MR_small and the knee RG3 re-tagged CR/CHEST/PA, uniform noise, a step
image and phantoms at the wrong polarity.  Nothing in either set was used to fit the gate.

It prints the share of held-out phantoms assessed and the accuracy on them, the share of the
out-of-distribution set refused (each image with its gate score), the AUROC of the gate score
between the two sets, the expected calibration error before and after temperature scaling, and
the cost of the gate: :meth:`Engine.assess` against a plain forward pass.  Targets: at least
95 % of held-out phantoms assessed with an accuracy of at least 90 %, and all of the
out-of-distribution set refused.

    python -m bench.trust --n 100 --png docs/images/trust.png
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from bench.common import median
from monai_bundle.scripts.calibration import reliability_bins, save_reliability_diagram
from monai_bundle.scripts.classes import CLASS_NAMES
from monai_bundle.scripts.dicom_image import load_dicom_image
from monai_bundle.scripts.phantoms import make_phantom
from monai_bundle.scripts.trust import batched_outputs
from tests.support.ood import write_ood_set
from worker.engine import Engine, load_engine

DEFAULT_SEED = 31_000
BUNDLE = Path("monai_bundle")
TARGET_ASSESSED = 0.95
TARGET_ACCURACY = 0.90


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="held-out phantoms per class")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="first phantom seed")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--bundle", type=Path, default=BUNDLE)
    parser.add_argument("--png", type=Path, default=None, help="write a reliability diagram")
    return parser.parse_args(argv)


def held_out(engine: Engine, n: int, seed: int) -> tuple[list[torch.Tensor], np.ndarray]:
    images, labels = [], []
    jobs = [(label, seed + i) for label in CLASS_NAMES for i in range(n)]
    for label, phantom_seed in tqdm(jobs, desc="held-out phantoms", unit="img"):
        images.append(engine.prepare(make_phantom(label, 256, phantom_seed).image))
        labels.append(CLASS_NAMES.index(label))
    return images, np.array(labels)


def out_of_distribution(engine: Engine, folder: Path) -> dict[str, torch.Tensor]:
    files = write_ood_set(folder)
    return {
        name: engine.prepare(load_dicom_image(path, fallback_window=engine.fallback_window))
        for name, path in files.items()
    }


def gate_cost(engine: Engine, image: torch.Tensor, repeats: int = 20) -> tuple[float, float]:
    """Median seconds of ``engine.assess`` and of a plain forward pass, interleaved."""
    ours, plain = [], []
    with torch.inference_mode():
        engine.network(image[None])  # warm up
        for _ in range(repeats):
            start = time.perf_counter()
            engine.assess(image)
            ours.append(time.perf_counter() - start)
            start = time.perf_counter()
            engine.network(image[None])
            plain.append(time.perf_counter() - start)
    return median(ours), median(plain)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = load_engine(args.bundle, "cpu")
    trust = engine.trust
    images, labels = held_out(engine, args.n, args.seed)
    with tempfile.TemporaryDirectory(prefix="coronet-ood-") as folder:
        ood = out_of_distribution(engine, Path(folder))

    inside = batched_outputs(engine.network, images, 32, progress=False)
    outside = batched_outputs(engine.network, list(ood.values()), 32, progress=False)
    inside_verdicts, outside_verdicts = trust.verdicts(inside), trust.verdicts(outside)
    accepted = np.array([v.accepted for v in inside_verdicts])
    refused = np.array([not v.accepted for v in outside_verdicts])
    raw = F.softmax(inside.logits, dim=1).numpy()
    calibrated = trust.probabilities(inside.logits).numpy()
    correct = calibrated.argmax(axis=1) == labels
    scores = [v.score for v in inside_verdicts] + [v.score for v in outside_verdicts]
    truth = [0] * len(inside_verdicts) + [1] * len(outside_verdicts)
    before, after = reliability_bins(raw, labels), reliability_bins(calibrated, labels)
    ours_s, plain_s = gate_cost(engine, images[0])

    assessed, accuracy = float(accepted.mean()), float(correct[accepted].mean())
    print(f"trust model: T = {trust.temperature:.3f}, stated acceptance {trust.acceptance:.1%}")
    print(f"{'':34} {'with the trust model':>22} {'reference (none)':>18}")
    print(f"{'held-out phantoms assessed':34} {assessed:22.1%} {1.0:18.1%}")
    print(f"{'accuracy on the assessed':34} {accuracy:22.1%} {float(correct.mean()):18.1%}")
    print(f"{'out-of-distribution refused':34} {float(refused.mean()):22.1%} {0.0:18.1%}")
    print(f"{'AUROC of the gate score':34} {roc_auc_score(truth, scores):22.3f} {'-':>18}")
    print(f"{'expected calibration error':34} {after.ece:22.2%} {before.ece:18.2%}")
    print(f"{'median top probability':34} {np.median(calibrated.max(1)):22.4f} "
          f"{np.median(raw.max(1)):18.4f}")  # fmt: skip
    print(f"{'ms per image (assess / forward)':34} {1000 * ours_s:22.1f} {1000 * plain_s:18.1f}"
          f"   ratio {ours_s / plain_s:.2f}")  # fmt: skip
    print(f"held-out: {len(labels)} phantoms (seeds {args.seed}..{args.seed + args.n - 1} per "
          "class); out of distribution, each with its gate score (refused above 1):")  # fmt: skip
    for name, verdict in zip(ood, outside_verdicts, strict=True):
        state = "refused" if not verdict.accepted else "ACCEPTED"
        print(f"  {name:34} {state:9} score {verdict.score:7.2f}  {', '.join(verdict.exceeded)}")
    if args.png is not None:
        save_reliability_diagram(
            {"before calibration": before, "after calibration": after},
            args.png,
            f"Reliability on {len(labels)} held-out phantoms",
        )
        print(f"reliability diagram: {args.png}")
    met = assessed >= TARGET_ASSESSED and accuracy >= TARGET_ACCURACY and bool(refused.all())
    print(f"targets (>= {TARGET_ASSESSED:.0%} assessed, accuracy >= {TARGET_ACCURACY:.0%}, "
          f"all out-of-distribution refused): {'met' if met else 'NOT met'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
