"""The node's own Prometheus metrics: associations, instances received, studies queued.

One :class:`NodeMetrics` per node, on its own registry (never prometheus_client's global one),
handed to the handlers explicitly.  The admin service (``/metrics``) adds the worker metrics
from Redis (:mod:`dicom_node.core.telemetry`) and the disk and queue gauges.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Final

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from dicom_node.core import statuses

#: Status labels of ``coronet_instances_received_total``: the statuses the node answers.
STATUS_LABELS: Final[dict[int, str]] = {
    statuses.SUCCESS: "success",
    statuses.OUT_OF_RESOURCES: "out_of_resources",
    statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS: "dataset_does_not_match_sop_class",
    statuses.DATA_UNDECODABLE: "cannot_understand",
    statuses.UID_NOT_CONFORMANT: "uid_not_conformant",
    statuses.INVALID_SOP_INSTANCE: "invalid_sop_instance",
    statuses.PROCESSING_FAILURE: "processing_failure",
}


def status_label(status: int) -> str:
    """The ``status`` label of an answer: a name, or the code for one we do not name."""
    return STATUS_LABELS.get(status, f"0x{status:04x}")


class _QueuedStudies(Collector):
    """``coronet_studies_queued_total``, read from the study queue's own count."""

    def __init__(self, published: Callable[[], int]) -> None:
        self.published = published

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily("coronet_studies_queued", "Tasks published to the broker")]

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "coronet_studies_queued",
            "Tasks published to the broker (a study, or one instance in instance mode)",
            value=self.published(),
        )


class NodeMetrics:
    """Counters of the Storage SCP (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.associations = Counter(
            "coronet_associations",
            "Association requests, by outcome (accepted, rejected) and reason of a rejection",
            ["outcome", "reason"],
            registry=self.registry,
        )
        self.instances = Counter(
            "coronet_instances_received",
            "C-STORE requests, by the status the node answered",
            ["status"],
            registry=self.registry,
        )
        self.duplicates = Counter(
            "coronet_instances_duplicate",
            "Instances received again (answered Success, the first copy kept)",
            registry=self.registry,
        )
        self.received_bytes = Counter(
            "coronet_received_bytes",
            "Bytes of instances stored in the spool",
            registry=self.registry,
        )

    def watch_queue(self, published: Callable[[], int]) -> None:
        """Expose the number of tasks published (the queue counts them itself)."""
        self.registry.register(_QueuedStudies(published))

    def accepted(self) -> None:
        self.associations.labels("accepted", "").inc()

    def rejected(self, reason: str) -> None:
        self.associations.labels("rejected", reason).inc()

    def stored(self, status: int, duplicate: bool, size: int) -> None:
        self.instances.labels(status_label(status)).inc()
        if duplicate:
            self.duplicates.inc()
        elif size:
            self.received_bytes.inc(size)


__all__ = ["STATUS_LABELS", "NodeMetrics", "status_label"]
