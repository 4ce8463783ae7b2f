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

from typing import Final

#: Longest error message kept by :func:`describe_error` (a reason in an SR or a dead letter).
REASON_MAX: Final = 300


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


def describe_error(err: BaseException) -> str:
    """``Type: message`` of an error on one line, cut to :data:`REASON_MAX` characters."""
    text = " ".join(str(err).split()) or "no detail"
    if len(text) > REASON_MAX:
        text = text[: REASON_MAX - 3] + "..."
    return f"{type(err).__name__}: {text}"
