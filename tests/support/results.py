"""Real result objects without the model, for tests of the worker's machinery.

* :func:`phantom_source` writes a synthetic frontal chest CR (``monai_bundle`` phantoms) with
  fresh UIDs; :func:`results_for` builds its real SR (:func:`worker.results.sr.build_sr`) and
  heatmap SC (:func:`worker.results.sc.build_sc`) from a given prediction.
* :class:`StandInModel` replaces the CoroNet engine in tests of the queueing and delivery
  machinery: it returns those real SR and SC objects for a fixed prediction and counts its
  calls.  Tests of the model itself use the real engine (``tests/test_e2e.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_node.core.settings import ResultSettings
from monai_bundle.scripts.classes import CLASS_NAMES
from monai_bundle.scripts.dicom_image import load_dicom_image
from monai_bundle.scripts.phantoms import make_phantom, write_dicom
from worker.results.outcome import AlgorithmInfo, Prediction, Unassessable
from worker.results.sc import build_sc
from worker.results.sr import build_sr

ALGORITHM = AlgorithmInfo(
    name="CoroNet",
    version="0.0.0+worker-tests",
    weights_sha256="ab" * 32,
    parameters={"input_size": "256"},
)
PREDICTION = Prediction(CLASS_NAMES, {"normal": 0.1, "pneumonia": 0.2, "COVID-19": 0.7}, "COVID-19")


def phantom_source(
    path: Path, *, label: str = "normal", study_uid: str | None = None, seed: int = 0
) -> Dataset:
    """A 256 px phantom chest CR (PA) written to ``path`` with fresh UIDs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_dicom(
        make_phantom(label, size=256, seed=seed),
        path,
        study_uid=study_uid or generate_uid(),
        series_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
    )


def heatmap_array(size: int = 64) -> np.ndarray:
    """A smooth blob in [0, 1], standing in for an attribution map."""
    y, x = np.mgrid[0:size, 0:size] / size
    return np.exp(-((x - 0.6) ** 2 + (y - 0.4) ** 2) / 0.02).astype(np.float32)


def results_for(
    source: Dataset,
    outcome: Prediction | Unassessable = PREDICTION,
    settings: ResultSettings | None = None,
) -> list[Dataset]:
    """The real SC (for a prediction) and SR of ``source``, SC first."""
    settings = settings or ResultSettings()
    datasets: list[Dataset] = []
    sc = None
    if isinstance(outcome, Prediction):
        sc = build_sc(
            source,
            heatmap_array(),
            outcome,
            ALGORITHM,
            series_number=settings.sc_series_number,
            series_description=settings.sc_series_description,
            source_image=load_dicom_image(source),
        )
        datasets.append(sc)
    sr = build_sr(
        source,
        outcome,
        ALGORITHM,
        series_number=settings.sr_series_number,
        series_description=settings.sr_series_description,
        heatmap_sc=sc,
        on_unassessable=settings.on_unassessable,
    )
    if sr is not None:
        datasets.append(sr)
    return datasets


@dataclass
class StandInResult:
    """Same fields as ``worker.pipeline.InstanceResult``."""

    outcome: Prediction | Unassessable
    datasets: list[Dataset]
    timings: dict[str, float]


@dataclass
class StandInModel:
    """Returns the real SR and SC of each source for a fixed outcome; counts its calls."""

    outcome: Prediction | Unassessable = PREDICTION
    settings: ResultSettings = field(default_factory=ResultSettings)
    calls: int = 0
    fail_with: Exception | None = None

    def __call__(self, dataset: Dataset, path: Path | None = None) -> StandInResult:
        self.calls += 1
        if self.fail_with is not None:
            raise self.fail_with
        datasets = results_for(dataset, self.outcome, self.settings)
        return StandInResult(self.outcome, datasets, {"model_s": 0.0})
