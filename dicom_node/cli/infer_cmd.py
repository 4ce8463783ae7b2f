"""``coronet infer``: the command line of :mod:`worker.infer`."""

from __future__ import annotations

import argparse
from pathlib import Path

from dicom_node.cli.common import add_config_options, positive_int, settings_from_args


def _preset(args: argparse.Namespace) -> str | None:
    """The bundle's attribution preset the options ask for; None: no heatmap."""
    if args.no_heatmap:
        return None
    return "fast" if args.fast else "default"


def _run(args: argparse.Namespace) -> int:
    # heavy: the model loads torch and MONAI; imported here so `coronet --help` stays fast
    from worker.infer import run_infer

    return run_infer(
        args.inputs,
        args.out,
        settings_from_args(args),
        bundle_dir=args.bundle_dir,
        device=args.device,
        weights=args.weights,
        preset=_preset(args),
        png=args.png,
        batch=args.batch,
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``coronet infer``."""
    parser = sub.add_parser(
        "infer",
        help="run CoroNet on DICOM files and write the SR, the heatmap SC and a JSON summary",
        description="Run CoroNet on DICOM files or folders, without any network.  For each "
        "input, write <stem>.sr.dcm (findings, TID 1500), <stem>.sc.dcm (heatmap Secondary "
        "Capture) and <stem>.json (class, probabilities, timings, model version) into --out.  "
        "Bad files are reported and skipped; the exit status is 1 if any failed.  Not for "
        "diagnostic use.",
    )
    parser.add_argument("inputs", nargs="+", type=Path, metavar="FILE_OR_DIR")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--fast",
        action="store_true",
        help="fast heatmap: a gradient start refined by 2 to 10 optimisation steps, until it is "
        "informative (instead of the paper's 300)",
    )
    mode.add_argument("--no-heatmap", action="store_true", help="no heatmap and no SC")
    parser.add_argument("--png", action="store_true", help="also write the heatmap overlay as PNG")
    parser.add_argument("--bundle-dir", type=Path, help="MONAI bundle (default: model.bundle_dir)")
    parser.add_argument(
        "--weights", type=Path, help="CoroNet weights (default: the bundle's models/model.pt)"
    )
    parser.add_argument("--device", help="auto, cpu or cuda:N (default: model.device)")
    parser.add_argument(
        "--batch",
        type=positive_int,
        default=1,
        metavar="N",
        help="analyse N images together: one forward pass and one heatmap optimisation (for "
        "GPUs; default 1); each file's total_s is then its share of its batch",
    )
    add_config_options(parser)
    parser.set_defaults(handler=_run)
