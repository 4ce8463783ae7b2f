"""From one source radiograph to the DICOM results: prediction, heatmap SC and SR.

Used by the Celery task and by ``coronet infer``, so both give the same objects.  The source
is a header (read with its pixel data deferred) and the path of its file; the pixel data is
decoded once, by the decoder process (:mod:`worker.decoder`), and that one image feeds both the
model and the heatmap SC.

Every failure of one image is classified here:

* an image the model cannot assess (not a frontal chest CR/DX by :mod:`dicom_node.core.chest`,
  a patient younger than the model card allows (:mod:`dicom_node.core.age`), pixel data that
  does not match its header or exceeds the decode limits, an image that could not be decoded
  safely, an image the bundle's gate finds unlike its training data) becomes an
  ``Unassessable`` outcome with its reasons: no class is ever made up for it;
* any other error that bad data can cause while analysing the image or building its results
  (:data:`DATA_ERRORS`) also becomes ``Unassessable``, with the error as the reason;
* the "Not Evaluated" SR is then built from the header; a header from which no SR can be built
  (e.g. a missing or invalid UID) raises :class:`~dicom_node.core.errors.ResultError`, which the
  study processor records as a dead letter for this instance;
* failures of the model itself (:class:`~dicom_node.core.errors.InferenceError`) and of the
  machine propagate: they say nothing about the image.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import torch
from pydicom.dataset import Dataset

from dicom_node.core.age import age_reasons
from dicom_node.core.chest import assessment_reasons
from dicom_node.core.errors import ResultError, describe_error
from dicom_node.core.settings import ResultSettings, SelectionRules
from monai_bundle.scripts.dicom_image import Image2D, image_header_problems
from monai_bundle.scripts.trust import Verdict
from worker.decoder import Decoder
from worker.engine import Engine
from worker.results.outcome import Attribution, Prediction, Unassessable
from worker.results.sc import build_sc
from worker.results.source import missing_attributes
from worker.results.sr import build_sr

logger = logging.getLogger(__name__)

#: What malformed input raises from pydicom, numpy, highdicom or our builders.
DATA_ERRORS: Final = (
    ValueError,
    TypeError,
    LookupError,
    AttributeError,
    ArithmeticError,
    NotImplementedError,
    ResultError,
)


@dataclass(frozen=True)
class InstanceResult:
    """What the pipeline made for one source image, ready to store and send."""

    outcome: Prediction | Unassessable
    datasets: list[Dataset] = field(default_factory=list)  # the SC (if any), then the SR (if any)
    timings: dict[str, float] = field(default_factory=dict)
    verdict: Verdict | None = None  # the gate's, when the image reached the model
    attribution: Attribution | None = None  # the heatmap's, when one was made

    @property
    def sr(self) -> Dataset | None:
        return next((d for d in self.datasets if d.Modality == "SR"), None)

    @property
    def sc(self) -> Dataset | None:
        return next((d for d in self.datasets if d.Modality != "SR"), None)


@dataclass(frozen=True)
class Assessment:
    """The prediction for one image, or why it cannot be assessed."""

    outcome: Prediction | Unassessable
    image: torch.Tensor | None  # the model input, when the image could be prepared
    timings: dict[str, float]
    pixels: Image2D | None = None  # the decoded image at its native size, for the SC
    verdict: Verdict | None = None  # the gate's, when the image reached the model


def assess(
    ds: Dataset, path: Path, engine: Engine, rules: SelectionRules, decoder: Decoder
) -> Assessment:
    """Check ``ds``, decode ``path`` in the decoder process, pre-process and classify it;
    timings are in seconds."""
    timings: dict[str, float] = {}
    reasons = (
        assessment_reasons(ds, rules)
        + age_reasons(ds, engine.minimum_age_years)
        + image_header_problems(ds, decoder.limits.max_pixels)
    )
    if reasons:
        return Assessment(Unassessable(tuple(reasons)), None, timings)
    start = time.perf_counter()
    try:
        pixels = decoder.load(path)
        image = engine.prepare(pixels)
    except ValueError as err:  # the bundle's InvalidImageError: a clear reason, not a crash
        return Assessment(Unassessable((str(err),)), None, timings)
    timings["preprocess_s"] = time.perf_counter() - start
    start = time.perf_counter()
    analysis = engine.assess(image)
    timings["inference_s"] = time.perf_counter() - start
    return Assessment(analysis.outcome, image, timings, pixels, analysis.verdict)


def process_dataset(
    ds: Dataset,
    path: Path,
    engine: Engine,
    results: ResultSettings,
    rules: SelectionRules,
    *,
    decoder: Decoder,
    preset: str | None = "fast",
) -> InstanceResult:
    """Run the model on the header ``ds`` of the file ``path`` and build its SC (with the
    attribution ``preset``; none when ``None``) and SR (see the module docstring).

    Raises ``ResultError`` when the header allows no result at all, ``InferenceError`` when
    the model itself fails; bad images give an ``Unassessable`` outcome.
    """
    missing = missing_attributes(ds)
    if missing:  # checked first: no result could reference the image, so do not analyse it
        raise ResultError(f"source image lacks required attributes: {', '.join(missing)}")
    timings: dict[str, float] = {}
    try:
        analysed = _analyse(ds, path, engine, results, rules, decoder, preset, timings)
    except DATA_ERRORS as err:
        logger.warning("image not assessable after %s during analysis", type(err).__name__)
        analysed = _Analysed(Unassessable((f"could not be analysed: {describe_error(err)}",)))
    start = time.perf_counter()
    sr = build_sr(
        ds,
        analysed.outcome,
        engine.algorithm,
        series_number=results.sr_series_number,
        series_description=results.sr_series_description,
        heatmap_sc=analysed.sc,
        on_unassessable=results.on_unassessable,
        classes=engine.classes,
        attribution=analysed.attribution,
    )
    timings["sr_s"] = time.perf_counter() - start
    datasets = [d for d in (analysed.sc, sr) if d is not None]
    return InstanceResult(
        analysed.outcome, datasets, timings, analysed.verdict, analysed.attribution
    )


@dataclass(frozen=True)
class _Analysed:
    outcome: Prediction | Unassessable
    sc: Dataset | None = None
    verdict: Verdict | None = None
    attribution: Attribution | None = None


def _analyse(
    ds: Dataset,
    path: Path,
    engine: Engine,
    results: ResultSettings,
    rules: SelectionRules,
    decoder: Decoder,
    preset: str | None,
    timings: dict[str, float],
) -> _Analysed:
    """The outcome and, for a prediction with a ``preset``, the heatmap SC."""
    assessment = assess(ds, path, engine, rules, decoder)
    outcome, image, pixels = assessment.outcome, assessment.image, assessment.pixels
    timings.update(assessment.timings)
    if not isinstance(outcome, Prediction) or image is None or pixels is None or preset is None:
        return _Analysed(outcome, verdict=assessment.verdict)
    start = time.perf_counter()
    target = engine.class_names.index(outcome.predicted)
    explanation = engine.explain(image, target, preset)
    timings["heatmap_s"] = time.perf_counter() - start
    attribution = Attribution(
        outcome.predicted,
        explanation.probability_before,
        explanation.probability_after,
        explanation.informative,
    )
    start = time.perf_counter()
    sc = build_sc(
        ds,
        explanation.heatmap,
        outcome,
        engine.algorithm,
        series_number=results.sc_series_number,
        series_description=results.sc_series_description,
        source_image=pixels,
        attribution=attribution,
    )
    timings["sc_s"] = time.perf_counter() - start
    return _Analysed(outcome, sc, assessment.verdict, attribution)
