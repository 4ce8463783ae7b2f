"""``GET /metrics``: Prometheus text format, every metric named ``coronet_*``.  No login.

* the node's counters (:mod:`dicom_node.scp.metrics`): associations, instances received,
  studies queued;
* the workers' counters and histograms, read from Redis at each scrape
  (:mod:`dicom_node.core.telemetry`): analysis and heatmap seconds, deliveries, dead letters;
* gauges measured at each scrape: queue depth (messages waiting in the broker's queue), dead
  letters in the outbox, spool bytes (measured at most every 30 s), free bytes, workers seen,
  and whether the broker answered (``coronet_broker_up``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

import redis
from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from dicom_node.admin.services import AdminServices
from dicom_node.core.outbox import DEAD_LETTER, RESULTS, SOURCES, STUDIES
from dicom_node.core.telemetry import METRICS, TelemetrySnapshot, read_snapshot

logger = logging.getLogger(__name__)

router = APIRouter()


def _dead_letters(outbox_dir: Path) -> dict[str, int]:
    root = outbox_dir / DEAD_LETTER
    return {
        "delivery": sum(1 for _ in (root / RESULTS).glob("*/*.json")),
        "analysis": sum(1 for _ in (root / SOURCES).glob("*/*.json"))
        + sum(1 for _ in (root / STUDIES).glob("*.json")),
    }


class AdminCollector(Collector):
    """The worker metrics from Redis and the gauges of the module docstring."""

    def __init__(self, services: AdminServices) -> None:
        self.services = services

    def describe(self) -> list[Metric]:
        return []  # registering it must not scrape Redis and the disk

    def collect(self) -> Iterator[Metric]:
        settings = self.services.settings
        up = GaugeMetricFamily("coronet_broker_up", "1 when the broker answered this scrape")
        depth = GaugeMetricFamily(
            "coronet_queue_depth", "Tasks waiting in the broker's queue", labels=["queue"]
        )
        try:
            client = self.services.redis()
            snapshot = read_snapshot(client)
            depth.add_metric([settings.broker.queue], float(client.llen(settings.broker.queue)))
            up.add_metric([], 1.0)
        except redis.exceptions.RedisError as err:
            logger.debug("metrics: broker unavailable: %s", err)
            up.add_metric([], 0.0)
            snapshot = None
        yield up
        yield depth
        if snapshot is not None:
            yield from _worker_metrics(snapshot)
            workers = GaugeMetricFamily("coronet_workers_seen", "Workers with a heartbeat")
            workers.add_metric([], float(len(snapshot.workers)))
            yield workers
        dead = GaugeMetricFamily(
            "coronet_dead_letters", "Dead letters in the outbox, by kind", labels=["kind"]
        )
        for kind, count in _dead_letters(settings.storage.outbox_dir).items():
            dead.add_metric([kind], float(count))
        yield dead
        yield GaugeMetricFamily(
            "coronet_spool_bytes", "Bytes in the spool", value=self.services.spool_bytes()
        )
        yield GaugeMetricFamily(
            "coronet_free_bytes",
            "Free bytes on the spool's file system",
            value=self.services.free_bytes(),
        )
        yield GaugeMetricFamily(
            "coronet_min_free_bytes",
            "storage.min_free_bytes: below it the node refuses instances (0xA700)",
            value=settings.storage.min_free_bytes,
        )


def _worker_metrics(from_redis: TelemetrySnapshot) -> Iterator[Metric]:
    for name, (kind, help_text) in METRICS.items():
        if kind == "counter":
            series = from_redis.counters.get(name, {})
            label_names = sorted({k for labels in series for k, _ in labels})
            counter = CounterMetricFamily(
                name.removesuffix("_total"), help_text, labels=label_names
            )
            for labels, value in sorted(series.items()):
                values = dict(labels)
                counter.add_metric([values.get(k, "") for k in label_names], value)
            yield counter
        else:
            histograms = from_redis.histograms.get(name, {})
            label_names = sorted({k for labels in histograms for k, _ in labels})
            histogram = HistogramMetricFamily(name, help_text, labels=label_names)
            for labels, sample in sorted(histograms.items()):
                values = dict(labels)
                buckets = [
                    ("+Inf" if math.isinf(bound) else repr(bound), count)
                    for bound, count in sorted(sample.buckets.items())
                ]
                histogram.add_metric([values.get(k, "") for k in label_names], buckets, sample.sum)
            yield histogram


@router.get("/metrics")
def metrics(request: Request) -> Response:
    registry = request.app.state.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


__all__ = ["AdminCollector", "router"]
