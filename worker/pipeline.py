"""From one source radiograph to the DICOM results: prediction, heatmap SC and SR.

Used by the Celery task and by ``coronet infer``, so both give the same objects.  The source
is a header (read with its pixel data deferred) and the path of its file; the pixel data is
decoded once, by the decoder process (:mod:`worker.decoder`), and that one image feeds both the
model and the heatmap SC.

Images go through in batches (:func:`process_many`): each image is checked and decoded, then
the batch is classified in one forward pass and explained in one optimisation, and each image's
SC and SR are built.  Every image gets the result it would get alone.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, cast

import torch
from pydicom.dataset import Dataset

from dicom_node.core.age import age_reasons
from dicom_node.core.chest import assessment_reasons
from dicom_node.core.errors import ResultError, describe_error
from dicom_node.core.settings import ResultSettings, SelectionRules
from monai_bundle.scripts.attribution import Explanation
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


Source = tuple[Dataset, Path]
"""One image to analyse: its header (pixel data deferred) and the path of its file."""


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
    (result,) = process_many(
        [(ds, path)], engine, results, rules, decoder=decoder, preset=preset, batch_size=1
    )
    if isinstance(result, Exception):
        raise result
    return result


def process_many(
    sources: Sequence[Source],
    engine: Engine,
    results: ResultSettings,
    rules: SelectionRules,
    *,
    decoder: Decoder,
    preset: str | None = "fast",
    batch_size: int = 1,
) -> list[InstanceResult | Exception]:
    """:func:`process_dataset` for several images, the model's steps batched: up to
    ``batch_size`` images are decoded, then classified in one forward pass and explained in one
    optimisation.

    Each image gets the result it would get alone, in order; where :func:`process_dataset`
    would raise, its place holds the exception.  A batch step that fails is run again image by
    image, so an error is charged to its own image only.  The ``inference_s`` and
    ``heatmap_s`` timings are each image's share of its batch.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    done: list[InstanceResult | Exception] = []
    for first in range(0, len(sources), batch_size):
        items = [_Item(ds, path) for ds, path in sources[first : first + batch_size]]
        for item in items:
            _prepare(item, engine, rules, decoder)
        _assess(items, engine)
        if preset is not None:
            _explain(items, engine, preset)
        for item in items:
            _build_sc(item, engine, results)
        done.extend(_finish(item, engine, results) for item in items)
    return done


@dataclass
class _Item:
    """One image on its way through a batch."""

    dataset: Dataset
    path: Path
    timings: dict[str, float] = field(default_factory=dict)
    outcome: Prediction | Unassessable | None = None
    image: torch.Tensor | None = None  # the model input, while the image is being analysed
    pixels: Image2D | None = None  # the decoded image at its native size, for the SC
    verdict: Verdict | None = None  # the gate's, when the image reached the model
    explanation: Explanation | None = None
    attribution: Attribution | None = None
    sc: Dataset | None = None
    error: Exception | None = None  # not about the image: the caller classifies it

    @property
    def predicted(self) -> Prediction | None:
        """The prediction still to be explained, if any."""
        if self.error is not None or self.image is None or self.pixels is None:
            return None
        return self.outcome if isinstance(self.outcome, Prediction) else None

    def stop(self, outcome: Unassessable) -> None:
        """The image cannot be assessed: no class, no heatmap."""
        self.outcome, self.image, self.pixels = outcome, None, None
        self.verdict = self.explanation = self.attribution = self.sc = None

    def failed(self, err: Exception) -> None:
        """An error while analysing: bad data makes the image unassessable, with the error as
        the reason; any other error is the caller's to classify."""
        if isinstance(err, DATA_ERRORS):
            logger.warning("image not assessable after %s during analysis", type(err).__name__)
            self.stop(Unassessable((f"could not be analysed: {describe_error(err)}",)))
        else:
            self.error, self.image, self.pixels = err, None, None


def _prepare(item: _Item, engine: Engine, rules: SelectionRules, decoder: Decoder) -> None:
    """Check the header, decode the file in the decoder process and pre-process the image."""
    ds = item.dataset
    missing = missing_attributes(ds)
    if missing:  # checked first: no result could reference the image, so do not analyse it
        item.error = ResultError(f"source image lacks required attributes: {', '.join(missing)}")
        return
    try:
        reasons = (
            assessment_reasons(ds, rules)
            + age_reasons(ds, engine.minimum_age_years)
            + image_header_problems(ds, decoder.limits.max_pixels)
        )
        if reasons:
            item.stop(Unassessable(tuple(reasons)))
            return
        start = time.perf_counter()
        try:
            item.pixels = decoder.load(item.path)
            item.image = engine.prepare(item.pixels)
        except ValueError as err:  # the bundle's InvalidImageError: a clear reason, not a crash
            item.stop(Unassessable((str(err),)))
            return
        item.timings["preprocess_s"] = time.perf_counter() - start
    except Exception as err:  # classified by failed()
        item.failed(err)


def _assess(items: list[_Item], engine: Engine) -> None:
    """Classify the prepared images in one forward pass (image by image if that fails)."""
    ready = [i for i in items if i.image is not None and i.outcome is None and i.error is None]
    if not ready:
        return
    start = time.perf_counter()
    try:
        analyses = engine.assess_many([cast(torch.Tensor, i.image) for i in ready])
    except Exception as err:
        if len(ready) == 1:
            ready[0].failed(err)
        else:
            _alone("classifying", ready, err, lambda item: _assess([item], engine))
        return
    share = (time.perf_counter() - start) / len(ready)
    for item, analysis in zip(ready, analyses, strict=True):
        item.timings["inference_s"] = share
        item.outcome, item.verdict = analysis.outcome, analysis.verdict


def _explain(items: list[_Item], engine: Engine, preset: str) -> None:
    """The heatmaps of the predictions, optimised together (image by image if that fails)."""
    todo = [i for i in items if i.predicted is not None]
    if not todo:
        return
    start = time.perf_counter()
    try:
        targets = [engine.class_names.index(cast(Prediction, i.outcome).predicted) for i in todo]
        explanations = engine.explain_many(
            [cast(torch.Tensor, i.image) for i in todo], targets, preset
        )
    except Exception as err:
        if len(todo) == 1:
            todo[0].failed(err)
        else:
            _alone("explaining", todo, err, lambda item: _explain([item], engine, preset))
        return
    share = (time.perf_counter() - start) / len(todo)
    for item, explanation in zip(todo, explanations, strict=True):
        item.timings["heatmap_s"] = share
        item.explanation = explanation


def _alone(step: str, items: list[_Item], err: Exception, again: Callable[[_Item], None]) -> None:
    logger.warning(
        "%s a batch of %d images failed (%s); each image again alone",
        step, len(items), type(err).__name__,
    )  # fmt: skip
    for item in items:
        again(item)


def _build_sc(item: _Item, engine: Engine, results: ResultSettings) -> None:
    """The heatmap Secondary Capture of an explained prediction."""
    prediction, explanation, pixels = item.predicted, item.explanation, item.pixels
    if prediction is None or explanation is None or pixels is None:
        return
    attribution = Attribution(
        prediction.predicted,
        explanation.probability_before,
        explanation.probability_after,
        explanation.informative,
    )
    start = time.perf_counter()
    try:
        sc = build_sc(
            item.dataset,
            explanation.heatmap,
            prediction,
            engine.algorithm,
            series_number=results.sc_series_number,
            series_description=results.sc_series_description,
            source_image=pixels,
            attribution=attribution,
        )
    except Exception as err:
        item.failed(err)
        return
    item.timings["sc_s"] = time.perf_counter() - start
    item.sc, item.attribution = sc, attribution
    item.image = item.pixels = None  # the batch's memory goes as soon as it is not needed


def _finish(item: _Item, engine: Engine, results: ResultSettings) -> InstanceResult | Exception:
    """The SR (the "Not Evaluated" one for an unassessable image) and the item's result."""
    if item.error is not None:
        return item.error
    outcome = item.outcome
    if outcome is None:  # unreachable: every path above sets an outcome or an error
        return ResultError("the image was neither assessed nor refused")
    start = time.perf_counter()
    try:
        sr = build_sr(
            item.dataset,
            outcome,
            engine.algorithm,
            series_number=results.sr_series_number,
            series_description=results.sr_series_description,
            heatmap_sc=item.sc,
            on_unassessable=results.on_unassessable,
            classes=engine.classes,
            attribution=item.attribution,
        )
    except Exception as err:  # e.g. ResultError: a header from which no SR can be built
        return err
    item.timings["sr_s"] = time.perf_counter() - start
    datasets = [d for d in (item.sc, sr) if d is not None]
    return InstanceResult(outcome, datasets, item.timings, item.verdict, item.attribution)
