"""Exceptions raised by the CoroNet node and worker.

Hierarchy::

    CoronetError
     ├── ConfigError                  a configuration file, option or override is invalid
     ├── IngestError                  received data cannot be stored, read or queued
     ├── InferenceError               the model cannot assess an image
     ├── ResultError                  a result object (SR, SC) cannot be built from its input
     └── DeliveryError                a result did not reach a destination
          ├── TransientDeliveryError     it may work later: retry with backoff
          └── PermanentDeliveryError     the peer refused it for good: never retry

Transient and permanent delivery errors are siblings, so the order of ``except`` clauses can
never turn one into the other.  Chain with ``raise ... from err`` so that the cause is kept.
Only transient errors (and broker outages) are retried.
"""

from __future__ import annotations


class CoronetError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(CoronetError):
    """A configuration file, environment variable, option or ``--set`` override is invalid.

    ``problems`` holds ``(field path, reason)`` pairs, so that callers can name each field.
    """

    def __init__(self, message: str, problems: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.problems: list[tuple[str, str]] = problems or []


class IngestError(CoronetError):
    """Received data cannot be persisted, read back or queued."""


class InferenceError(CoronetError):
    """The model cannot assess an image (bad input, failed pre-processing, a failing network)."""


class ResultError(CoronetError):
    """A result object (SR, SC, prediction) cannot be built from the given input."""


class DeliveryError(CoronetError):
    """A result did not reach a destination; see the two subclasses for what to do."""


class TransientDeliveryError(DeliveryError):
    """The destination is unreachable or busy (no association, timeout, A7xx): retry later."""


class PermanentDeliveryError(DeliveryError):
    """The destination refused a result for good (e.g. rejected-permanent, A9xx, Cxxx)."""
