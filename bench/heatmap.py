"""CPU time of one attribution map (meaningful perturbation), default and fast mode side by side,
as seconds per image and as a ratio to one CoroNet pipeline forward pass at the same size.

The forward pass is ``CoroNet(x)`` under ``inference_mode`` (the folded FPAE path inference
uses), median of ``--forward-iters`` calls.  Each map is ``attribution.explain`` on a phantom
(pneumonia and COVID-19 alternating), wall time including its own initial and final forward
passes; modes are interleaved image by image so background load hits both alike.

    python -m bench.heatmap --n 3 --size 256 --threads 2
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from bench.common import median, time_interleaved
from monai_bundle.scripts.attribution import PerturbationConfig, explain, load_presets
from monai_bundle.scripts.classes import LESION_CLASSES
from monai_bundle.scripts.networks import CoroNet, load_coronet_weights
from monai_bundle.scripts.phantoms import make_phantom

logger = logging.getLogger(__name__)

MODES: dict[str, PerturbationConfig] = load_presets()
LABELS = LESION_CLASSES
DEFAULT_WEIGHTS = Path("monai_bundle/models/model.pt")


@dataclass(frozen=True)
class ModeTiming:
    """Median seconds per map of one mode over the benchmark images."""

    mode: str
    config: PerturbationConfig
    seconds: list[float]

    @property
    def median_s(self) -> float:
        return median(self.seconds)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3, help="images per mode")
    parser.add_argument("--size", type=int, default=256, help="model input height and width")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--forward-iters", type=int, default=10, help="timed forward passes")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help=f"CoroNet state_dict (default: {DEFAULT_WEIGHTS} if present, else random weights; "
        "timing does not depend on the weights)",
    )
    return parser.parse_args(argv)


def load_network(weights: Path | None) -> tuple[CoroNet, str]:
    net = CoroNet()
    path = (
        weights if weights is not None else (DEFAULT_WEIGHTS if DEFAULT_WEIGHTS.is_file() else None)
    )
    if path is not None:
        load_coronet_weights(net, path)
    return net.eval(), str(path) if path is not None else "random initialisation"


def time_forward(net: CoroNet, size: int, iters: int) -> float:
    x = make_phantom("normal", size, 0).image
    batch = torch.from_numpy(x)[None, None]

    def forward() -> None:
        with torch.inference_mode():
            net(batch)

    return median(time_interleaved({"forward": forward}, iters, desc="forward")["forward"])


def time_maps(net: CoroNet, size: int, n: int, modes: Sequence[str]) -> list[ModeTiming]:
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    # Warm-up: oneDNN builds its kernels on the first calls for each shape.
    for mode in modes:
        warm = torch.from_numpy(make_phantom(LABELS[0], size, 999).image)[None]
        explain(net, warm, config=_shortened(MODES[mode]))
    for index in tqdm(range(n), desc="maps"):
        image = torch.from_numpy(make_phantom(LABELS[index % 2], size, index).image)[None]
        for mode in modes:
            start = time.perf_counter()
            explain(net, image, config=MODES[mode])
            seconds[mode].append(time.perf_counter() - start)
    return [ModeTiming(mode, MODES[mode], seconds[mode]) for mode in modes]


def _shortened(config: PerturbationConfig) -> PerturbationConfig:
    from dataclasses import replace

    return replace(config, iterations=2)


def format_table(timings: Sequence[ModeTiming], forward_s: float, size: int) -> str:
    header = (
        f"{'mode':<8} {'iters':>5} {'work px':>7} {'s/map':>7} {'ms/iter':>8} "
        f"{'x forward':>9} {'min s':>6} {'max s':>6}"
    )
    lines = [
        f"heatmap cost at {size} px; one forward pass = {forward_s * 1e3:.1f} ms",
        header,
        "-" * len(header),
    ]
    for t in timings:
        work = t.config.work_size if t.config.work_size is not None else size
        lines.append(
            f"{t.mode:<8} {t.config.iterations:>5} {work:>7} {t.median_s:7.2f} "
            f"{t.median_s / t.config.iterations * 1e3:8.1f} {t.median_s / forward_s:9.1f} "
            f"{min(t.seconds):6.2f} {max(t.seconds):6.2f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    net, source = load_network(args.weights)
    logger.info("weights: %s; threads: %d", source, torch.get_num_threads())
    forward_s = time_forward(net, args.size, args.forward_iters)
    timings = time_maps(net, args.size, args.n, args.modes)
    print(format_table(timings, forward_s, args.size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
