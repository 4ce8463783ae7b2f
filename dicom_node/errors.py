"""Exceptions raised by the CoroNet node and worker.

Hierarchy::

    CoronetError
     ├── ConfigError        a configuration file or override is invalid
     ├── IngestError        received data cannot be stored or queued
     ├── InferenceError     the model cannot assess an image
     └── DeliveryError      a result cannot be sent to a destination
          └── PermanentDeliveryError   the peer refused it for good; do not retry

Chain with ``raise ... from err`` so that the cause is kept.  Only transient errors
(``DeliveryError`` that is not ``PermanentDeliveryError``, broker outages) are retried.
"""

from __future__ import annotations


class CoronetError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(CoronetError):
    """A configuration file, environment variable or ``--set`` override is invalid.

    ``problems`` holds ``(field path, reason)`` pairs, so that callers can name each field.
    """

    def __init__(self, message: str, problems: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.problems: list[tuple[str, str]] = problems or []


class IngestError(CoronetError):
    """Received data cannot be persisted or queued."""


class InferenceError(CoronetError):
    """The model cannot assess an image (bad input, failed pre-processing)."""


class DeliveryError(CoronetError):
    """A result could not be delivered; the attempt may be retried."""


class PermanentDeliveryError(DeliveryError):
    """The destination refused a result for good (e.g. status 0xA9xx or 0xCxxx)."""
