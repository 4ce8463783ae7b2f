"""Offline inference on DICOM files: what ``coronet infer`` does.

For each input it writes, into ``--out``:

- ``<stem>.sr.dcm``: the DICOM SR (TID 1500) with the findings, unless the image cannot be
  assessed and ``results.on_unassessable`` is ``skip``;
- ``<stem>.sc.dcm``: the heatmap Secondary Capture (not with ``--no-heatmap``);
- ``<stem>.json``: class (``null`` when the image cannot be assessed, with the reasons),
  calibrated probabilities, the gate's signals and thresholds, what deleting the heatmap did
  to the class's probability (``attribution``), timings and model version;
- ``<stem>.png`` with ``--png``: the heatmap overlay as a picture.

With ``--batch N``, N images at a time are analysed together (one forward pass, one heatmap
optimisation; :func:`worker.pipeline.process_many`), each with the result it gets alone.

A file that is not readable DICOM is reported and skipped, with its reason; the rest go on.  A
folder gives every file in it: each file that is not DICOM is named as skipped too.  The exit
status is 1 when any file failed or was skipped.  Images are decoded as in the worker: checked
first, then decoded in a decoder process with the limits of ``model.*`` (:mod:`worker.decoder`).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError
from tqdm.auto import tqdm

from dicom_node.core.errors import CoronetError
from dicom_node.core.settings import Settings
from monai_bundle.scripts.dicom_image import DEFER_SIZE, is_dicom_file
from worker.decoder import Decoder
from worker.engine import Engine, load_engine
from worker.pipeline import InstanceResult, process_many
from worker.results.outcome import Prediction
from worker.results.render import save_png
from worker.runtime import decode_limits

EXIT_OK = 0
EXIT_FAILED = 1


NOT_DICOM = "not a DICOM file (no DICM prefix after the 128-byte preamble, PS3.10 7.1)"


def iter_inputs(paths: Sequence[Path]) -> Iterator[Path]:
    """Files as given; folders give every file in them, recursively, sorted."""
    for path in paths:
        if path.is_dir():
            yield from (p for p in sorted(path.rglob("*")) if p.is_file())
        else:
            yield path


def screen_inputs(paths: Sequence[Path]) -> tuple[list[Path], dict[str, str]]:
    """The files to analyse, and the files of the given folders that are skipped, each with
    its reason.  A file named explicitly is always tried (and fails if it is not DICOM)."""
    explicit = {path for path in paths if not path.is_dir()}
    files: list[Path] = []
    skipped: dict[str, str] = {}
    for path in iter_inputs(paths):
        if path in explicit:
            files.append(path)
            continue
        try:
            dicom = is_dicom_file(path)
        except OSError as err:
            skipped[str(path)] = f"cannot read: {err.strerror or err}"
            continue
        if dicom:
            files.append(path)
        else:
            skipped[str(path)] = NOT_DICOM
    return files, skipped


def summary(path: Path, result: InstanceResult, engine: Engine, total_s: float) -> dict[str, Any]:
    """The JSON summary of one input."""
    outcome = result.outcome
    record: dict[str, Any] = {"input": path.name, "model_version": engine.model_version}
    if isinstance(outcome, Prediction):
        record["predicted"] = outcome.predicted
        record["probabilities"] = dict(outcome.probabilities)
    else:
        record["predicted"] = None
        record["unassessable_reasons"] = list(outcome.reasons)
    if result.verdict is not None:
        record["gate"] = result.verdict.to_json()
    if result.attribution is not None:
        record["attribution"] = {
            "class": result.attribution.class_name,
            "target_probability_before": result.attribution.probability_before,
            "target_probability_after": result.attribution.probability_after,
            "informative": result.attribution.informative,
        }
    record["timings_s"] = {**result.timings, "total_s": total_s}
    record["outputs"] = {}
    return record


def write_outputs(
    path: Path, result: InstanceResult, engine: Engine, out: Path, *, png: bool, total_s: float
) -> dict[str, Any]:
    """Write the SR, the SC (and its PNG) and the JSON summary of one input; the summary."""
    record = summary(path, result, engine, total_s)
    stem = path.stem
    if result.sr is not None:
        target = out / f"{stem}.sr.dcm"
        result.sr.save_as(target, enforce_file_format=True)
        record["outputs"]["sr"] = target.name
    if result.sc is not None:
        target = out / f"{stem}.sc.dcm"
        result.sc.save_as(target, enforce_file_format=True)
        record["outputs"]["sc"] = target.name
        if png:
            record["outputs"]["png"] = save_png(result.sc.pixel_array, out / f"{stem}.png").name
    (out / f"{stem}.json").write_text(json.dumps(record, indent=2))
    return record


#: What a file that cannot be processed raises: it is reported and skipped, the rest go on.
FILE_ERRORS = (InvalidDicomError, OSError, ValueError, CoronetError)


def infer_batch(
    paths: Sequence[Path],
    engine: Engine,
    settings: Settings,
    out: Path,
    *,
    decoder: Decoder,
    preset: str | None,
    png: bool,
) -> Iterator[tuple[Path, dict[str, Any] | Exception]]:
    """Process the files together (:func:`worker.pipeline.process_many`, one batch); each
    file's summary, or the error (of :data:`FILE_ERRORS`) for which it was skipped.  A file's
    ``total_s`` is its share of the batch's time."""
    start = time.perf_counter()
    read: list[tuple[Path, pydicom.Dataset]] = []
    for path in paths:
        try:
            read.append((path, pydicom.dcmread(path, defer_size=DEFER_SIZE)))
        except FILE_ERRORS as err:
            yield path, err
    results = process_many(
        [(ds, path) for path, ds in read],
        engine,
        settings.results,
        settings.selection,
        decoder=decoder,
        preset=preset,
        batch_size=max(1, len(read)),
    )
    share = (time.perf_counter() - start) / max(1, len(read))
    for (path, _), result in zip(read, results, strict=True):
        if isinstance(result, FILE_ERRORS):
            yield path, result
        elif isinstance(result, Exception):
            raise result  # not about the file: a failure of this program or machine
        else:
            try:
                record: dict[str, Any] | Exception = write_outputs(
                    path, result, engine, out, png=png, total_s=share
                )
            except FILE_ERRORS as err:  # e.g. the output folder is full
                record = err
            yield path, record


def run_infer(
    inputs: Sequence[Path],
    out: Path,
    settings: Settings,
    *,
    bundle_dir: Path | None = None,
    device: str | None = None,
    weights: Path | None = None,
    preset: str | None = "default",
    png: bool = False,
    batch: int = 1,
) -> int:
    """Process every input, ``batch`` images at a time together; return the exit status (1
    when any file failed or was skipped)."""
    if batch < 1:
        raise ValueError("batch must be at least 1")
    paths, skipped = screen_inputs(inputs)
    for name, why in skipped.items():
        print(f"skipped {name}: {why}", file=sys.stderr)
    if not paths:
        print("error: no DICOM files found in the given paths", file=sys.stderr)
        return EXIT_FAILED
    out.mkdir(parents=True, exist_ok=True)
    engine = load_engine(
        bundle_dir or settings.model.bundle_dir, device or settings.model.device, weights
    )
    failures = dict(skipped)
    with (
        Decoder(decode_limits(settings, engine)) as decoder,
        tqdm(
            total=len(paths), desc="coronet infer", unit="img", disable=len(paths) < 2
        ) as progress,
    ):
        for first in range(0, len(paths), batch):
            chunk = paths[first : first + batch]
            done = infer_batch(
                chunk, engine, settings, out, decoder=decoder, preset=preset, png=png
            )
            for path, record in done:
                progress.update()
                if isinstance(record, Exception):
                    failures[str(path)] = f"{type(record).__name__}: {record}"
                    tqdm.write(f"skipped {path}: {record}", file=sys.stderr)
                else:
                    tqdm.write(f"{path.name}: {record['predicted'] or 'not assessable'}")
    total = len(paths) + len(skipped)
    print(f"{total - len(failures)} of {total} files processed; results in {out}")
    for name, why in failures.items():
        print(f"  failed: {name}: {why}", file=sys.stderr)
    return EXIT_FAILED if failures else EXIT_OK
