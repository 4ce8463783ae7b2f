"""Exponential backoff, the one rule for every retry: publishing to the broker and delivery.

Attempt ``n`` (0 for the first retry) waits ``d = min(maximum, initial * 2**n)`` seconds, or,
with jitter ("equal jitter"), a uniformly random time between ``d/2`` and ``d``, so that many
retries after one outage do not all hit the peer at the same moment.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


def backoff_delay(
    attempt: int,
    initial: float,
    maximum: float,
    *,
    jitter: bool = False,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retry ``attempt`` (0-based); see the module docstring."""
    ceiling = min(maximum, initial * (2 ** max(attempt, 0)))
    if not jitter:
        return ceiling
    return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


@dataclass
class Backoff:
    """Backoff state of one retried activity: how long to wait after each failure."""

    initial: float
    maximum: float
    failures: int = 0
    retry_at: float = 0.0

    def failed(self, now: float) -> float:
        """Record a failure at ``now``; return the delay until the next try."""
        delay = backoff_delay(self.failures, self.initial, self.maximum)
        self.failures += 1
        self.retry_at = now + delay
        return delay

    def succeeded(self) -> bool:
        """Reset; return True if we were backing off."""
        was_failing = self.failures > 0
        self.failures, self.retry_at = 0, 0.0
        return was_failing

    @property
    def backing_off(self) -> bool:
        return self.failures > 0
