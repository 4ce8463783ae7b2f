"""The one task the node publishes and the worker consumes: its name and its arguments.

``coronet.process_study(study_key: str, instance_keys: list[str] | None = None, *,
fetch: str | None = None, spool: str | None = None)``: analyse the study's pending instances
(``None``) or only the given ones.  The arguments are opaque spool keys
(:func:`dicom_node.core.spool.key_for`), never UIDs, so the broker never holds PHI.  ``fetch``
is the study's signed fetch URL and ``spool`` the identity of the node's spool folder
(:mod:`dicom_node.core.fetch`); a message without them (an older node, or one without its
admin service) can only be processed by a worker that shares the node's spool folder.
Messages are JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from dicom_node.core.errors import IngestError
from dicom_node.core.fetch import check_study_url
from dicom_node.core.spool import check_key

TASK_NAME: Final = "coronet.process_study"
"""The Celery task name shared by the node (producer) and the worker (consumer)."""


@dataclass(frozen=True)
class StudyTask:
    """The arguments of one ``coronet.process_study`` message, checked when built."""

    study_key: str
    instance_keys: tuple[str, ...] | None = None
    fetch: str | None = None
    spool: str | None = None

    def __post_init__(self) -> None:
        check_key(self.study_key)
        if self.fetch is not None:
            check_study_url(self.fetch, self.study_key)
        if self.spool is not None and (not isinstance(self.spool, str) or len(self.spool) > 64):
            raise IngestError("spool must be a spool identity of at most 64 characters")
        if self.instance_keys is not None:
            if isinstance(self.instance_keys, str):
                raise IngestError("instance_keys must be a list of spool keys, not one string")
            keys = tuple(check_key(key) for key in self.instance_keys)
            object.__setattr__(self, "instance_keys", keys)

    @classmethod
    def from_message(
        cls,
        study_key: Any,
        instance_keys: Sequence[Any] | None = None,
        fetch: Any = None,
        spool: Any = None,
    ) -> StudyTask:
        """The task of a received message; raises IngestError for malformed arguments."""
        if not isinstance(study_key, str):
            raise IngestError(f"study_key must be a spool key, not {type(study_key).__name__}")
        if instance_keys is not None and not isinstance(instance_keys, list | tuple):
            raise IngestError("instance_keys must be a list of spool keys")
        keys = None if instance_keys is None else tuple(instance_keys)
        return cls(study_key, keys, fetch, spool)

    def args(self) -> list[object]:
        """The positional arguments of the message (JSON)."""
        if self.instance_keys is None:
            return [self.study_key]
        return [self.study_key, list(self.instance_keys)]

    def kwargs(self) -> dict[str, str]:
        """The keyword arguments of the message (JSON)."""
        found = {"fetch": self.fetch, "spool": self.spool}
        return {name: value for name, value in found.items() if value is not None}
