"""Helpers for the worker tests: real result objects, a recording Storage SCP, a model stand-in.

* :func:`phantom_source` writes a synthetic frontal chest CR (``monai_bundle`` phantoms) with
  fresh UIDs; :func:`results_for` builds its real SR (``worker.sr.build_sr``) and heatmap SC
  (``worker.sc.build_sc``) from a given :class:`~worker.results.Prediction`.
* :class:`StandInModel` replaces the CoroNet engine in tests of the queueing and delivery
  machinery: it returns those real SR and SC objects for a fixed prediction and counts its
  calls.  Tests of the model itself use the real engine (``tests/test_e2e.py``).
* :class:`RecordingSCP` is a pynetdicom Storage SCP on a loopback port that answers a scripted
  sequence of statuses, can reject associations, speak TLS, and be stopped and started again
  on the same port (a destination that goes down and comes back).
"""

from __future__ import annotations

import contextlib
import ssl
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.config import ResultSettings
from monai_bundle.scripts.phantoms import make_phantom, write_dicom
from tests.support.redis_server import free_port
from worker.results import AlgorithmInfo, Prediction, Unassessable
from worker.sc import build_sc
from worker.sr import build_sr

CLASS_NAMES = ("normal", "pneumonia", "COVID-19")
ALGORITHM = AlgorithmInfo(
    name="CoroNet",
    version="0.0.0+worker-tests",
    weights_sha256="ab" * 32,
    parameters={"input_size": "256"},
)
PREDICTION = Prediction(CLASS_NAMES, {"normal": 0.1, "pneumonia": 0.2, "COVID-19": 0.7}, "COVID-19")
RESULT_CONTEXTS = (Comprehensive3DSRStorage, SecondaryCaptureImageStorage)
SUCCESS = 0x0000


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

    def __call__(self, dataset: Dataset) -> StandInResult:
        self.calls += 1
        if self.fail_with is not None:
            raise self.fail_with
        datasets = results_for(dataset, self.outcome, self.settings)
        return StandInResult(self.outcome, datasets, {"model_s": 0.0})


# --------------------------------------------------------------------------- Storage SCP


@dataclass(frozen=True)
class Received:
    sop_class_uid: str
    sop_instance_uid: str
    calling_ae: str


@dataclass
class RecordingSCP:
    """A Storage SCP on 127.0.0.1 that records what it stores (see module docstring)."""

    ae_title: str = "PACS"
    port: int = field(default_factory=free_port)
    statuses: list[int] = field(default_factory=list)
    """Answers to the next C-STOREs, in order; Success once empty."""
    reject: tuple[int, int, int] | None = None
    """(result, source, reason) of an A-ASSOCIATE-RJ for every request, or None."""
    contexts: Sequence[str] = RESULT_CONTEXTS
    ssl_context: ssl.SSLContext | None = None
    received: list[Received] = field(default_factory=list)
    _server: ThreadedAssociationServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _on_store(self, event: Event) -> int:
        with self._lock:
            status = self.statuses.pop(0) if self.statuses else SUCCESS
            if status == SUCCESS or 0xB000 <= status < 0xC000:
                ds = event.dataset
                self.received.append(
                    Received(
                        str(ds.SOPClassUID),
                        str(ds.SOPInstanceUID),
                        event.assoc.requestor.ae_title.strip(),
                    )
                )
        return status

    def _on_requested(self, event: Event) -> None:
        if self.reject is not None:
            event.assoc.acse.send_reject(*self.reject)
            event.assoc.kill()

    def start(self) -> RecordingSCP:
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
        for sop_class in self.contexts:
            ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            ssl_context=self.ssl_context,
            evt_handlers=[
                (evt.EVT_C_STORE, self._on_store),
                (evt.EVT_REQUESTED, self._on_requested),
            ],
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def stored(self, sop_class_uid: str | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self.received if sop_class_uid in (None, r.sop_class_uid)]

    def destination(self, name: str = "pacs", **extra: Any) -> dict[str, Any]:
        """Configuration data of this SCP as a destination."""
        return {
            "name": name,
            "ae_title": self.ae_title,
            "host": "127.0.0.1",
            "port": self.port,
            **extra,
        }


@contextlib.contextmanager
def running_scp(**options: Any) -> Iterator[RecordingSCP]:
    scp = RecordingSCP(**options).start()
    try:
        yield scp
    finally:
        scp.stop()
