"""The worker's own options: pool, batch size, heatmap mode, time limits, retries and threads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dicom_node.core.errors import ConfigError

Pool = Literal["prefork", "solo", "threads"]
HeatmapMode = Literal["fast", "full", "off"]

#: The bundle's attribution preset behind each ``--heatmap`` mode (``full``: the paper's).
HEATMAP_PRESETS: dict[HeatmapMode, str | None] = {"fast": "fast", "full": "default", "off": None}


@dataclass(frozen=True)
class WorkerOptions:
    """Worker settings that are not part of the node's configuration file (``coronet worker``
    options), checked when built.

    Times are in seconds.  ``lock_ttl`` is how long an instance lock outlives a dead worker.
    """

    concurrency: int = 1
    pool: Pool = "prefork"
    queue: str | None = None
    heatmap: HeatmapMode = "fast"
    soft_time_limit: float = 840.0
    time_limit: float = 900.0
    visibility_timeout: float = 3600.0
    max_retries: int = 8
    retry_backoff: float = 2.0
    retry_backoff_max: float = 300.0
    max_redeliveries: int = 3
    """Redeliveries of a message whose worker was lost; also how often one instance's analysis
    may start without finishing before it is dead-lettered (at least once)."""
    max_read_attempts: int = 3
    """Tries to read a spooled instance (or find its study) before it is dead-lettered."""
    gpu_count: int | None = None
    threads: int | None = None
    """torch CPU threads per pool process; None: the cores shared between the processes."""
    batch: int = 1
    """Images analysed together; above 1, ``batch`` tasks run in the threads of one process
    and share their batches (:mod:`worker.batching`)."""
    batch_wait: float = 0.05
    """Seconds a batch that is not full waits for the images of running tasks."""

    def __post_init__(self) -> None:
        problems = []
        if self.concurrency < 1:
            problems.append("concurrency must be at least 1")
        if self.batch < 1 or self.batch_wait < 0:
            problems.append("batch must be at least 1, its wait not negative")
        elif (self.pool == "threads") != (self.batch > 1):
            problems.append("the threads pool runs batches, and batches run in it only")
        elif self.batch > 1 and self.concurrency != self.batch:
            problems.append("a batching worker runs one task per image of its batch")
        if self.threads is not None and self.threads < 1:
            problems.append("threads must be at least 1")
        if not 0 < self.soft_time_limit < self.time_limit:
            problems.append("need 0 < soft time limit < time limit")
        if self.visibility_timeout <= self.time_limit:
            problems.append("the visibility timeout must exceed the task time limit")
        if self.visibility_timeout <= self.retry_backoff_max:
            problems.append("the visibility timeout must exceed the longest retry countdown")
        if self.max_retries < 0 or self.max_redeliveries < 0:
            problems.append("max retries and max redeliveries must not be negative")
        if self.max_read_attempts < 1:
            problems.append("max read attempts must be at least 1")
        if self.retry_backoff <= 0 or self.retry_backoff_max < self.retry_backoff:
            problems.append("need 0 < retry backoff <= retry backoff max")
        if problems:
            raise ConfigError("worker options: " + "; ".join(problems))

    @property
    def attribution_preset(self) -> str | None:
        """The bundle's attribution preset for ``heatmap``; None: no heatmap."""
        return HEATMAP_PRESETS[self.heatmap]

    @property
    def lock_ttl(self) -> float:
        return self.time_limit + 60.0

    @property
    def restore_interval(self) -> float:
        """Seconds between sweeps for messages of lost workers (at most 10)."""
        return max(1.0, min(10.0, self.visibility_timeout / 4))
