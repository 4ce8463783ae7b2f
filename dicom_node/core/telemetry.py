"""Worker metrics and heartbeats in Redis: the published contract between the workers, which
write them, and the node's admin service, which exposes them on ``/metrics`` and ``/healthz``.

Workers run on other hosts and in short-lived pool processes, so they do not serve metrics
themselves: every sample goes to the broker's Redis, where one scrape of the node sees all the
workers, and a restarted worker does not reset a counter.  Keys (version 1)::

    coronet:metrics:counter:<name>     hash  <labels> -> total (HINCRBYFLOAT)
    coronet:metrics:histogram:<name>   hash  <labels>|<le> -> observations <= le,
                                             <labels>|sum, <labels>|count
    coronet:workers                    sorted set  worker name -> last seen (Unix time)

``<labels>`` is the JSON of the sorted label pairs.  The bucket bounds of each histogram are
fixed here (:data:`BUCKETS`), so the writer and the reader agree.  Writing never raises: a
metric is not worth failing a study for.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import redis

logger = logging.getLogger(__name__)

PREFIX: Final = "coronet:metrics:"
WORKERS_KEY: Final = "coronet:workers"

#: Seconds; analysis of one instance (decode, model, results) and one heatmap.
SECONDS_BUCKETS: Final = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)

#: The worker's metrics: name -> (type, help).  Counters end in ``_total``.
METRICS: Final[dict[str, tuple[str, str]]] = {
    "coronet_analysis_seconds": ("histogram", "Seconds to analyse one instance, heatmap included"),
    "coronet_heatmap_seconds": ("histogram", "Seconds to compute one attribution heatmap"),
    "coronet_instances_analysed_total": (
        "counter",
        "Instances analysed by a worker, by outcome (prediction, unassessable)",
    ),
    "coronet_deliveries_total": (
        "counter",
        "C-STOREs of results to a destination, by outcome (delivered, refused, waiting)",
    ),
    "coronet_dead_lettered_total": (
        "counter",
        "Results or instances dead-lettered by a worker, by kind (delivery, analysis)",
    ),
}
BUCKETS: Final[dict[str, tuple[float, ...]]] = {
    "coronet_analysis_seconds": SECONDS_BUCKETS,
    "coronet_heatmap_seconds": SECONDS_BUCKETS,
}

Labels = tuple[tuple[str, str], ...]


def _labels_key(labels: Mapping[str, str]) -> str:
    return json.dumps(sorted((str(k), str(v)) for k, v in labels.items()), separators=(",", ":"))


def _labels_of(key: str) -> Labels:
    pairs = json.loads(key)
    return tuple((str(k), str(v)) for k, v in pairs)


class TelemetryWriter:
    """What a worker records (see the module docstring); every method swallows Redis errors."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def count(self, name: str, labels: Mapping[str, str], amount: float = 1.0) -> None:
        self._safely(
            lambda: self.client.hincrbyfloat(f"{PREFIX}counter:{name}", _labels_key(labels), amount)
        )

    def observe(self, name: str, value: float, labels: Mapping[str, str] | None = None) -> None:
        bounds = BUCKETS[name]
        key = f"{PREFIX}histogram:{name}"
        base = _labels_key(labels or {})

        def write() -> None:
            pipe = self.client.pipeline(transaction=False)
            for bound in bounds:
                if value <= bound:
                    pipe.hincrbyfloat(key, f"{base}|{bound!r}", 1)
            pipe.hincrbyfloat(key, f"{base}|+Inf", 1)
            pipe.hincrbyfloat(key, f"{base}|sum", value)
            pipe.hincrbyfloat(key, f"{base}|count", 1)
            pipe.execute()

        self._safely(write)

    def heartbeat(self, worker: str, at: float | None = None) -> None:
        """Record that ``worker`` is alive (``/healthz`` checks the newest heartbeat)."""
        self._safely(lambda: self.client.zadd(WORKERS_KEY, {worker: at or time.time()}))

    def forget(self, worker: str) -> None:
        """A worker that stops cleanly is not waited for."""
        self._safely(lambda: self.client.zrem(WORKERS_KEY, worker))

    def _safely(self, write: Any) -> None:
        try:
            write()
        except redis.exceptions.RedisError as err:
            logger.debug("metrics not recorded: %s", err)


@dataclass
class HistogramSample:
    """One labelled series of a histogram: cumulative bucket counts, sum and count."""

    buckets: dict[float, float] = field(default_factory=dict)
    sum: float = 0.0
    count: float = 0.0


@dataclass
class TelemetrySnapshot:
    """Everything the workers recorded, read in one go."""

    counters: dict[str, dict[Labels, float]] = field(default_factory=dict)
    histograms: dict[str, dict[Labels, HistogramSample]] = field(default_factory=dict)
    workers: dict[str, float] = field(default_factory=dict)


def read_snapshot(client: redis.Redis) -> TelemetrySnapshot:
    """Read every worker metric and heartbeat; raises ``redis.RedisError`` when Redis is down."""
    snapshot = TelemetrySnapshot()
    names = [name for name in METRICS]
    pipe = client.pipeline(transaction=False)
    for name in names:
        kind = METRICS[name][0]
        pipe.hgetall(f"{PREFIX}{kind}:{name}")
    pipe.zrange(WORKERS_KEY, 0, -1, withscores=True)
    replies = pipe.execute()
    for name, raw in zip(names, replies[:-1], strict=True):
        if METRICS[name][0] == "counter":
            snapshot.counters[name] = {_labels_of(_text(k)): float(v) for k, v in dict(raw).items()}
        else:
            snapshot.histograms[name] = _histogram(dict(raw), BUCKETS[name])
    snapshot.workers = {_text(member): float(score) for member, score in replies[-1]}
    return snapshot


def _histogram(raw: dict[Any, Any], bounds: Sequence[float]) -> dict[Labels, HistogramSample]:
    samples: dict[Labels, HistogramSample] = {}
    for key, value in raw.items():
        labels_key, _, slot = _text(key).rpartition("|")
        sample = samples.setdefault(_labels_of(labels_key), HistogramSample())
        if slot == "sum":
            sample.sum = float(value)
        elif slot == "count":
            sample.count = float(value)
        else:
            sample.buckets[math.inf if slot == "+Inf" else float(slot)] = float(value)
    for sample in samples.values():
        for bound in (*bounds, math.inf):
            sample.buckets.setdefault(bound, 0.0)
    return samples


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def newest_heartbeat(workers: Mapping[str, float]) -> float | None:
    """When a worker was last seen, or None when none ever was."""
    return max(workers.values()) if workers else None


__all__ = [
    "BUCKETS",
    "METRICS",
    "HistogramSample",
    "TelemetrySnapshot",
    "TelemetryWriter",
    "newest_heartbeat",
    "read_snapshot",
]
