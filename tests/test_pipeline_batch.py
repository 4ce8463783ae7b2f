"""The pipeline in batches (:func:`worker.pipeline.process_many`), with the real model: a batch
of good and bad images gives each image the result it gets alone, and an error in a batch step
is charged to its own image only."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

import monai_bundle
from dicom_node.core.errors import InferenceError, ResultError
from dicom_node.core.settings import ResultSettings, SelectionRules
from monai_bundle.scripts.attribution import Explanation
from tests.support.dicom_data import RG1_UNCR, make_instance
from tests.support.dicom_tools import dciodvfy
from tests.support.results import phantom_source
from worker.decoder import DecodeLimits, Decoder
from worker.engine import Analysis, Engine, load_engine
from worker.pipeline import InstanceResult, Source, process_dataset, process_many
from worker.results.outcome import Prediction, Unassessable

BUNDLE = Path(monai_bundle.__file__).resolve().parent
LABELS = ("normal", "pneumonia", "COVID-19")


@pytest.fixture(scope="module", name="engine")
def engine_fixture() -> Engine:
    return load_engine(BUNDLE, "cpu")


@pytest.fixture(scope="module", name="decoder")
def decoder_fixture(engine: Engine) -> Iterator[Decoder]:
    with Decoder(DecodeLimits(fallback_window=engine.fallback_window)) as decoder:
        yield decoder


def _edit(path: Path, **attributes: str | None) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in attributes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)


def _source(path: Path) -> Source:
    return pydicom.dcmread(path, defer_size=64 * 1024), path


@pytest.fixture(scope="module", name="sources")
def sources_fixture(tmp_path_factory: pytest.TempPathFactory) -> list[Source]:
    """Phantoms of the three classes, a lateral view, a header without its SOP Instance UID,
    and the real adult chest CR RG1 (which the demo weights' gate refuses)."""
    folder = tmp_path_factory.mktemp("batch")
    paths = [folder / f"{label}.dcm" for label in LABELS]
    for index, (path, label) in enumerate(zip(paths, LABELS, strict=True)):
        phantom_source(path, label=label, seed=index)
    lateral, nameless = folder / "lateral.dcm", folder / "nameless.dcm"
    phantom_source(lateral, label="pneumonia", seed=7)
    _edit(lateral, ViewPosition="LL")
    phantom_source(nameless, label="normal", seed=8)
    _edit(nameless, SOPInstanceUID=None)
    rg1 = folder / "rg1.dcm"
    make_instance(RG1_UNCR, rg1)
    return [_source(p) for p in (*paths[:2], lateral, nameless, paths[2], rg1)]


def _run_many(
    sources: Sequence[Source], engine: Engine, decoder: Decoder, batch_size: int
) -> list[InstanceResult | Exception]:
    return process_many(
        sources,
        engine,
        ResultSettings(),
        SelectionRules(),
        decoder=decoder,
        preset="fast",
        batch_size=batch_size,
    )


def _alone(source: Source, engine: Engine, decoder: Decoder) -> InstanceResult | Exception:
    try:
        return process_dataset(
            *source, engine, ResultSettings(), SelectionRules(), decoder=decoder, preset="fast"
        )
    except Exception as err:
        return err


def _same(batched: InstanceResult | Exception, alone: InstanceResult | Exception) -> None:
    if isinstance(alone, Exception):
        assert type(batched) is type(alone) and str(batched) == str(alone)
        return
    assert isinstance(batched, InstanceResult)
    assert type(batched.outcome) is type(alone.outcome)
    if isinstance(alone.outcome, Unassessable):
        assert batched.outcome == alone.outcome
        assert batched.sc is None and alone.sc is None
        return
    assert isinstance(batched.outcome, Prediction)
    assert batched.outcome.predicted == alone.outcome.predicted
    for name, p in alone.outcome.probabilities.items():
        assert batched.outcome.probabilities[name] == pytest.approx(p, abs=1e-5)
    assert batched.attribution is not None and alone.attribution is not None
    assert batched.attribution.informative == alone.attribution.informative
    assert batched.sc is not None and alone.sc is not None
    # a batch sums in another order: the rendered maps agree to a grey level or two
    diff = np.abs(batched.sc.pixel_array.astype(int) - alone.sc.pixel_array.astype(int))
    assert float(np.mean(diff)) < 1.0, float(np.mean(diff))


def test_a_mixed_batch_gives_each_image_what_it_gets_alone(
    sources: list[Source], engine: Engine, decoder: Decoder, tmp_path: Path
) -> None:
    together = _run_many(sources, engine, decoder, batch_size=len(sources))
    alone = [_alone(source, engine, decoder) for source in sources]
    assert len(together) == len(sources)
    for batched, single in zip(together, alone, strict=True):
        _same(batched, single)
    kinds = ["error" if isinstance(r, Exception) else type(r.outcome).__name__ for r in together]
    assert kinds == [
        "Prediction", "Prediction", "Unassessable", "error", "Prediction", "Unassessable"
    ]  # fmt: skip
    assert isinstance(together[3], ResultError) and "SOPInstanceUID" in str(together[3])
    for index, result in enumerate(together):
        if isinstance(result, Exception):
            continue
        assert "inference_s" in result.timings or isinstance(result.outcome, Unassessable)
        for number, dataset in enumerate(result.datasets):
            path = tmp_path / f"{index}-{number}.dcm"
            dataset.save_as(path, enforce_file_format=True)
            pydicom.dcmread(path)  # read back
            report = dciodvfy(path)
            assert report.errors == (), report.errors


def test_batches_smaller_than_the_input_give_the_same_results(
    sources: list[Source], engine: Engine, decoder: Decoder
) -> None:
    good = [sources[i] for i in (0, 1, 4)]
    whole = _run_many(good, engine, decoder, batch_size=3)
    pairs = _run_many(good, engine, decoder, batch_size=2)
    for left, right in zip(whole, pairs, strict=True):
        _same(right, left)


def test_a_failed_batch_step_is_run_again_image_by_image(
    sources: list[Source], engine: Engine, decoder: Decoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The forward pass of the whole batch fails: each image is classified alone; one image's
    heatmap fails alone too: that image, and only that one, carries the error."""
    good = [sources[i] for i in (0, 1, 4)]
    expected = _run_many(good, engine, decoder, batch_size=1)
    assess_many, explain_many = engine.assess_many, engine.explain_many
    poisoned = engine.prepare(decoder.load(good[1][1]))
    calls: list[int] = []

    def fragile_assess(images: Sequence[torch.Tensor]) -> list[Analysis]:
        calls.append(len(images))
        if len(images) > 1:
            raise InferenceError("the network failed: out of memory")
        return assess_many(images)

    def fragile_explain(
        images: Sequence[torch.Tensor], targets: Sequence[int], preset: str = "fast"
    ) -> list[Explanation]:
        if any(torch.equal(image, poisoned) for image in images):
            raise InferenceError("the attribution map failed: NaN in the mask")
        return explain_many(images, targets, preset)

    monkeypatch.setattr(engine, "assess_many", fragile_assess)
    monkeypatch.setattr(engine, "explain_many", fragile_explain)
    results = _run_many(good, engine, decoder, batch_size=3)
    assert calls == [3, 1, 1, 1]
    assert isinstance(results[1], InferenceError) and "NaN" in str(results[1])
    _same(results[0], expected[0])
    _same(results[2], expected[2])


def test_process_dataset_is_a_batch_of_one(
    sources: list[Source], engine: Engine, decoder: Decoder
) -> None:
    with pytest.raises(ResultError, match="SOPInstanceUID"):
        process_dataset(*sources[3], engine, ResultSettings(), SelectionRules(), decoder=decoder)
    with pytest.raises(ValueError, match="batch_size"):
        _run_many(sources[:1], engine, decoder, batch_size=0)
