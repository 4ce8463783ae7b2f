"""CPU latency of CoroNet (pre-processing + 2 FPAEs + ResNet-18) against a plain ResNet-18.

Both run in the same process, with the same thread count, input size and warm-up, interleaved
call by call.  The plain ResNet-18 is the same MONAI network (same weights, channels_last) fed a
3 x S x S tensor.  MACs are counted with forward hooks on Conv/ConvTranspose/Linear.

    python -m bench.infer_latency --size 512 --threads 2 --batches 1 8 --iters 5
"""

from __future__ import annotations

import argparse
import importlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.common import (
    Row,
    count_macs,
    current_rss_mib,
    format_table,
    keep_freed_memory,
    median,
    peak_rss_mib,
    time_interleaved,
)
from monai_bundle.scripts.networks import CoroNet, residual_tensor

logger = logging.getLogger(__name__)

SOURCE_ROWS, SOURCE_COLS = 1955, 1841  # the pydicom RG1_UNCR chest CR
DICOM_TEST_FILE = "RG1_UNCR.dcm"
TARGET_RATIO = 0.8
PIPELINE = "pipeline (pre + CoroNet)"
MODEL = "CoroNet model"
PLAIN = "plain ResNet-18"


@dataclass(frozen=True)
class Preprocessor:
    """What the benchmark times as pre-processing: one call prepares one 1 x 1 x S x S image."""

    description: str
    prepare: Callable[[], torch.Tensor]


def standin_preprocessor(size: int) -> Preprocessor:
    """Nearest-neighbour resize of a 1955 x 1841 float image to ``size``, then min-max to [0, 1]."""
    image = torch.rand(1, 1, SOURCE_ROWS, SOURCE_COLS) * 32767.0

    def prepare() -> torch.Tensor:
        small = F.interpolate(image, size=(size, size), mode="nearest")
        low, high = small.amin(), small.amax()
        return (small - low) / (high - low).clamp_min(1e-6)

    return Preprocessor(
        f"stand-in: resize {SOURCE_ROWS}x{SOURCE_COLS} float32 -> {size}x{size} "
        "(nearest) + min-max scaling; no DICOM decoding",
        prepare,
    )


def dicom_preprocessor(size: int) -> Preprocessor | None:
    """The bundle's own ``prepare`` on a real chest CR, when the bundle provides it."""
    try:
        module = importlib.import_module("monai_bundle.scripts.preprocessing")
        from pydicom.data import get_testdata_file
    except ImportError:
        return None
    prepare = getattr(module, "prepare", None)
    path = get_testdata_file(DICOM_TEST_FILE)
    if prepare is None or path is None:
        return None

    def run() -> torch.Tensor:
        image: torch.Tensor = prepare(path, size)
        return image[None]

    return Preprocessor(
        f"DICOM: monai_bundle.scripts.preprocessing.prepare({DICOM_TEST_FILE}, {size}): read, "
        f"decode, modality/VOI LUT, MONOCHROME1 inversion, resize of a {SOURCE_ROWS}x"
        f"{SOURCE_COLS} chest CR",
        run,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="input height and width")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes")
    parser.add_argument("--iters", type=int, default=5, help="timed rounds per batch size")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per case")
    parser.add_argument(
        "--preprocessing",
        choices=("auto", "dicom", "standin"),
        default="auto",
        help="auto: the bundle's DICOM prepare() when it exists, else the resize stand-in",
    )
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="glibc: serve big tensors from the heap instead of fresh mmap pages (whole process)",
    )
    return parser.parse_args(argv)


def run_batch(
    net: CoroNet, pre: Preprocessor, batch: int, size: int, iters: int, warmup: int
) -> list[Row]:
    """Time every part at one batch size; rows are per image."""
    x = torch.cat([pre.prepare() for _ in range(batch)])
    plain_input = torch.rand(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    one = x[:1]
    fpae_macs = count_macs(net.fpae_healthy, one)
    resnet_macs = count_macs(net.classifier, plain_input[:1])
    pipeline_macs = 2 * fpae_macs + resnet_macs
    with torch.inference_mode():
        recon_h = net.fpae_healthy.reconstruct(x)
        recon_p = net.fpae_pneumonia.reconstruct(x)

        def pipeline() -> torch.Tensor:
            return net(torch.cat([pre.prepare() for _ in range(batch)]))

        cases: dict[str, Callable[[], object]] = {
            "pre-processing": lambda: [pre.prepare() for _ in range(batch)],
            "FPAE healthy": lambda: net.fpae_healthy.reconstruct(x),
            "FPAE pneumonia": lambda: net.fpae_pneumonia.reconstruct(x),
            "residual + ResNet-18": lambda: net.classifier(
                residual_tensor(x, recon_h, recon_p).contiguous(memory_format=torch.channels_last)
            ),
            MODEL: lambda: net(x),
            PIPELINE: pipeline,
            PLAIN: lambda: net.classifier(plain_input),
        }
        times = time_interleaved(cases, iters, warmup, desc=f"batch {batch}")
    macs = {
        "pre-processing": 0,
        "FPAE healthy": fpae_macs,
        "FPAE pneumonia": fpae_macs,
        "residual + ResNet-18": resnet_macs,
        MODEL: pipeline_macs,
        PIPELINE: pipeline_macs,
        PLAIN: resnet_macs,
    }
    return [Row(name, median(times[name]) / batch, macs[name]) for name in cases]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    allocator = "glibc default"
    if args.keep_freed_memory:
        allocator = (
            "glibc, no mmap for big blocks" if keep_freed_memory() else "unchanged (no glibc)"
        )
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = CoroNet().eval()
    pre = None if args.preprocessing == "standin" else dicom_preprocessor(args.size)
    if pre is None:
        if args.preprocessing == "dicom":
            print("the bundle has no preprocessing.prepare or pydicom-data is missing")
            return 1
        pre = standin_preprocessor(args.size)
    print(
        f"device cpu, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"input {args.size}x{args.size}, allocator: {allocator}"
    )
    print(f"pre-processing timed: {pre.description}")
    verdicts = []
    for batch in args.batches:
        rows = run_batch(net, pre, batch, args.size, args.iters, args.warmup)
        title = f"\nbatch {batch} (median of {args.iters}, per image)"
        print(format_table(rows, baseline=PLAIN, title=title))
        by_name = {r.name: r for r in rows}
        for name in (PIPELINE, MODEL):
            ratio = by_name[name].gmacs_per_s / by_name[PLAIN].gmacs_per_s
            met = "met" if ratio >= TARGET_RATIO else "NOT met"
            verdicts.append(f"batch {batch}, {name}: ratio {ratio:.2f} -> target {met}")
        print(f"peak RSS so far {peak_rss_mib():.0f} MiB, current RSS {current_rss_mib():.0f} MiB")
    print(f"\ntarget: GMAC/s >= {TARGET_RATIO} x plain ResNet-18")
    print("\n".join(verdicts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
