"""What the decode guards cost, against plain pydicom, on RG1 in four encodings.

Two comparisons, each timed in the same run with the cases interleaved call by call (medians):

1. **In-process checks.**  Ours: ``dicom_image.decode_stored(path)``, i.e. ``dcmread`` with the
   pixel data deferred, the header and pixel-data checks of ``pixel_guard`` (for compressed
   data: the fragment walk and the codestream header), then ``pixel_array``.  Reference: plain
   ``pydicom.dcmread(path).pixel_array``.  Target: at most ``TARGET_RATIO`` times the reference.
2. **The decoder process.**  Ours: ``worker.decoder.Decoder.load(path)``, the bundle's
   ``load_dicom_image`` (checks, decode, Modality LUT, VOI, float32) in the pre-started child
   process, the image sent back over a pipe.  Reference: the same ``load_dicom_image`` in this
   process.  The difference is the overhead per image of the second wall.  Starting a decoder
   process (done once per pool process, and after a failure) is timed separately.

RG1 is pydicom-data's chest CR (1955 x 1841, 16 bits): Explicit VR Little Endian as shipped,
RLE Lossless and JPEG-LS Lossless encoded here by pydicom, JPEG 2000 Lossless as shipped.

    python -m bench.decode --iters 15
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import JPEGLSLossless, RLELossless

from bench.common import median, time_interleaved
from monai_bundle.scripts.dicom_image import decode_stored, load_dicom_image
from worker.decoder import Decoder

TARGET_RATIO = 1.2


def _testdata(name: str) -> Path:
    path = get_testdata_file(name)
    if not isinstance(path, str):
        raise SystemExit(f"pydicom-data lacks {name} (pip install pydicom-data)")
    return Path(path)


def rg1_encodings(folder: Path) -> dict[str, Path]:
    """RG1 in the four encodings, written to ``folder`` where they are made here."""
    source = _testdata("RG1_UNCR.dcm")
    files = {"Explicit VR LE": source}
    for name, syntax in (("RLE Lossless", RLELossless), ("JPEG-LS Lossless", JPEGLSLossless)):
        ds = pydicom.dcmread(source)
        ds.compress(syntax)
        path = folder / f"rg1-{syntax}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files[name] = path
    files["JPEG 2000 Lossless"] = _testdata("RG1_J2KR.dcm")
    return files


def _plain(path: Path) -> Callable[[], object]:
    return lambda: pydicom.dcmread(path).pixel_array


def _guarded(path: Path) -> Callable[[], object]:
    return lambda: decode_stored(path)


def _in_process(path: Path) -> Callable[[], object]:
    return lambda: load_dicom_image(path)


def _child(decoder: Decoder, path: Path) -> Callable[[], object]:
    return lambda: decoder.load(path)


def _row(name: str, ours: float, reference: float, unit: float = 1e3) -> str:
    return f"{name:<20} {ours * unit:9.1f} {reference * unit:11.1f} {ours / reference:7.3f}"


def compare_checks(files: dict[str, Path], iters: int) -> list[float]:
    print(f"\n1. in-process checks: decode_stored vs plain pydicom (ms, median of {iters})")
    print(f"{'encoding':<20} {'guarded':>9} {'pydicom':>11} {'ratio':>7}")
    ratios = []
    for name, path in files.items():
        times = time_interleaved(
            {"guarded": _guarded(path), "plain": _plain(path)}, iters, desc=name
        )
        guarded, plain = median(times["guarded"]), median(times["plain"])
        ratios.append(guarded / plain)
        print(_row(name, guarded, plain))
    verdict = "met" if max(ratios) <= TARGET_RATIO else "NOT met"
    print(f"target: ratio <= {TARGET_RATIO} in every encoding: {verdict}")
    return ratios


def compare_child(files: dict[str, Path], iters: int) -> None:
    print(f"\n2. decoder process vs the same load_dicom_image in process (ms, median of {iters})")
    print(f"{'encoding':<20} {'child':>9} {'in process':>11} {'ratio':>7} {'overhead':>9}")
    with Decoder() as decoder:
        for name, path in files.items():
            times = time_interleaved(
                {"child": _child(decoder, path), "in process": _in_process(path)}, iters, desc=name
            )
            child, local = median(times["child"]), median(times["in process"])
            print(f"{_row(name, child, local)} {(child - local) * 1e3:9.1f}")
    starts = []
    for _ in range(5):
        started = time.perf_counter()
        with Decoder():
            starts.append(time.perf_counter() - started)
    print(f"starting a decoder process (median of 5): {median(starts) * 1e3:.0f} ms")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=15, help="timed calls per case")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        files = rg1_encodings(Path(folder))
        compare_checks(files, args.iters)
        compare_child(files, args.iters)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
