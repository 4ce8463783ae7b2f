"""From one source radiograph to the DICOM results: prediction, heatmap SC and SR.

Used by the Celery task and by ``coronet infer``, so both give the same objects.  An image the
model cannot assess (not a frontal chest CR/DX by :mod:`dicom_node.core.chest`, or pixel data
the bundle cannot use) becomes an ``Unassessable`` outcome with its reasons: no class is ever
made up for it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from pydicom.dataset import Dataset

from dicom_node.core.chest import assessment_reasons
from dicom_node.core.settings import ResultSettings, SelectionRules
from monai_bundle.scripts.preprocessing import image_header_problems
from worker.engine import Engine
from worker.results.outcome import Prediction, Unassessable
from worker.results.sc import build_sc
from worker.results.sr import build_sr

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstanceResult:
    """What the pipeline made for one source image, ready to store and send."""

    outcome: Prediction | Unassessable
    datasets: list[Dataset] = field(default_factory=list)  # the SC (if any), then the SR (if any)
    timings: dict[str, float] = field(default_factory=dict)

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


def assess(ds: Dataset, engine: Engine, rules: SelectionRules) -> Assessment:
    """Check, pre-process and classify ``ds``; timings are in seconds."""
    timings: dict[str, float] = {}
    reasons = assessment_reasons(ds, rules) + image_header_problems(ds)
    if reasons:
        return Assessment(Unassessable(tuple(reasons)), None, timings)
    start = time.perf_counter()
    try:
        image = engine.prepare(ds)
    except ValueError as err:  # the bundle's InvalidImageError: a clear reason, not a crash
        return Assessment(Unassessable((str(err),)), None, timings)
    timings["preprocess_s"] = time.perf_counter() - start
    start = time.perf_counter()
    prediction = engine.predict(image)
    timings["inference_s"] = time.perf_counter() - start
    return Assessment(prediction, image, timings)


def process_dataset(
    ds: Dataset,
    engine: Engine,
    results: ResultSettings,
    rules: SelectionRules,
    *,
    preset: str | None = "fast",
) -> InstanceResult:
    """Run the model on ``ds`` and build its SC (with the attribution ``preset``; none when
    ``None``) and SR.

    Raises ``InferenceError`` only when the model itself fails; bad images give an
    ``Unassessable`` outcome.
    """
    assessment = assess(ds, engine, rules)
    outcome, image, timings = assessment.outcome, assessment.image, dict(assessment.timings)
    sc: Dataset | None = None
    if isinstance(outcome, Prediction) and image is not None and preset is not None:
        start = time.perf_counter()
        target = engine.class_names.index(outcome.predicted)
        explanation = engine.explain(image, target, preset)
        timings["heatmap_s"] = time.perf_counter() - start
        start = time.perf_counter()
        sc = build_sc(
            ds,
            explanation.heatmap,
            outcome,
            engine.algorithm,
            series_number=results.sc_series_number,
            series_description=results.sc_series_description,
        )
        timings["sc_s"] = time.perf_counter() - start
    start = time.perf_counter()
    sr = build_sr(
        ds,
        outcome,
        engine.algorithm,
        series_number=results.sr_series_number,
        series_description=results.sr_series_description,
        heatmap_sc=sc,
        on_unassessable=results.on_unassessable,
        classes=engine.classes,
    )
    timings["sr_s"] = time.perf_counter() - start
    datasets = [d for d in (sc, sr) if d is not None]
    return InstanceResult(outcome, datasets, timings)
