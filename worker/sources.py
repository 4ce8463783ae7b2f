"""Where a task's instances come from: the node's spool folder, or the node over the network.

:class:`StudyProcessor <worker.processor.StudyProcessor>` works with an
:class:`InstanceSource`: it lists a study's instances, gets one instance's file, and tells the
node which instances are finished.  :class:`SpoolSource` reads the spool folder it shares with
the node (the node's own host, ``fetch.direct_spool``); :class:`worker.fetching.RemoteSource`
fetches from the node's ``/fetch/v1`` (every other worker).

Failures a source reports, besides :class:`~dicom_node.core.errors.IngestError` for a file
that is there but unreadable:

* :class:`SourceUnavailable`: the node did not answer (down, restarting, a network fault, a
  truncated or corrupted transfer): retry with backoff; never a dead letter, since the node
  still holds the study as pending and queues it again;
* :class:`SourceGone`: the node answered that the study or instance is not there (removed):
  permanent, dead-lettered at once;
* :class:`SourceRefused`: the node refused the task's ticket (expired or forged): the task is
  dropped; the node queues a pending study again with a fresh ticket.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

from dicom_node.core.errors import CoronetError
from dicom_node.core.spool import InstanceRecord, Spool

logger = logging.getLogger(__name__)


class SourceUnavailable(CoronetError):
    """The node could not be reached or the transfer failed: try again later."""


class SourceGone(CoronetError):
    """The node says the study or instance is not there: permanent."""


class SourceRefused(CoronetError):
    """The node refused the task's ticket (expired or not valid)."""


class SourceInstance(Protocol):
    """What the processor needs to know of one instance before it gets it."""

    @property
    def instance_key(self) -> str: ...

    @property
    def selected(self) -> bool: ...

    @property
    def done(self) -> bool: ...

    @property
    def received(self) -> float | None: ...


class InstanceSource(Protocol):
    """A study's instances, wherever they are (see the module docstring)."""

    def instances(self, study_key: str) -> Sequence[SourceInstance]:
        """The study's instances; IngestError or SourceGone when the study is not there."""
        ...

    def lost_instances(self, study_key: str) -> list[str]:
        """Instances queued whose file is gone (:meth:`Spool.lost_instances`)."""
        ...

    def instance_file(self, study_key: str, instance_key: str) -> Path:
        """A local file holding the instance (the spool's, or a verified cached copy)."""
        ...

    def mark_done(self, study_key: str, instance_keys: Iterable[str]) -> None:
        """Tell the node that these instances are finished (results settled)."""
        ...

    def mark_dead(self, study_key: str, instance_key: str, reason: str) -> None:
        """Tell the node that the instance was dead-lettered (finished, without a result)."""
        ...

    def release(self, study_key: str) -> None:
        """The task is over: drop what was kept for the study (a cache)."""
        ...


class SpoolSource:
    """The spool folder the worker shares with the node."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool

    def instances(self, study_key: str) -> list[InstanceRecord]:
        return self.spool.instances(study_key)

    def lost_instances(self, study_key: str) -> list[str]:
        return self.spool.lost_instances(study_key)

    def instance_file(self, study_key: str, instance_key: str) -> Path:
        return self.spool.instance_path(study_key, instance_key)

    def mark_done(self, study_key: str, instance_keys: Iterable[str]) -> None:
        self.spool.mark_done(study_key, instance_keys)

    def mark_dead(self, study_key: str, instance_key: str, reason: str) -> None:
        # The dead letter is in the outbox the node reads; the spool only needs the marker.
        self.spool.mark_done(study_key, [instance_key])

    def release(self, study_key: str) -> None:
        return None


__all__ = [
    "InstanceSource",
    "SourceGone",
    "SourceInstance",
    "SourceRefused",
    "SourceUnavailable",
    "SpoolSource",
]
