"""Recent studies and their state, read from the spool and the outbox (both core formats), and
the retry of a study's dead letters.

A study's state, first match wins:

* ``dead-lettered``: an instance, the whole study or a result has a dead letter (with reason);
* ``stored``: no instance was selected for the model (e.g. a lateral view): nothing to do;
* ``delivered``: every selected instance is analysed and every result is delivered to every
  configured destination (a destination added after the study was finished is not counted);
  an instance a worker on another host reported done counts as analysed and delivered (its
  results and their delivery state are in that worker's outbox);
* ``analysed``: every selected instance is analysed, some results wait for a destination;
* ``queued``: a task was published for it;
* ``received``: stored, not queued yet (the study is still arriving, or the broker is down).

Shown: Accession Number, Study Date, Modality, and Patient's Name only when
``admin.show_patient_name`` is true.  Studies are listed by the opaque spool key, never by UID.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from dicom_node.core.errors import IngestError
from dicom_node.core.outbox import Outbox
from dicom_node.core.settings import Destination
from dicom_node.core.spool import Spool


@dataclass
class DestinationState:
    name: str
    delivered: int = 0
    pending: int = 0
    dead: int = 0


@dataclass
class DeadLetterView:
    where: str
    """A destination name, or ``analysis``."""
    key: str
    reason: str
    at: str


@dataclass
class StudyView:
    key: str
    state: str
    received: str
    accession_number: str | None
    study_date: str | None
    modality: str | None
    patient_name: str | None
    instances: int
    selected: int
    queued: int
    analysed: int
    destinations: list[DestinationState] = field(default_factory=list)
    dead_letters: list[DeadLetterView] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if self.patient_name is None:
            del data["patient_name"]
        return data


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def recent_keys(spool: Spool, limit: int) -> list[str]:
    """The ``limit`` newest studies of the spool (by when their first instance arrived)."""
    created = []
    for key in spool.study_keys():
        try:
            created.append((spool.study_created(key), key))
        except IngestError:
            continue
    created.sort(reverse=True)
    return [key for _, key in created[:limit]]


def study_view(
    spool: Spool,
    outbox: Outbox,
    study_key: str,
    destinations: Sequence[Destination],
    *,
    show_patient_name: bool = False,
) -> StudyView:
    """The state of one spooled study (see the module docstring)."""
    info = spool.study_info(study_key)
    instances = spool.instances(study_key)
    selected = [i for i in instances if i.selected]
    records = {r.instance_key: r for r in outbox.sources_of(study_key)}
    view = StudyView(
        key=study_key,
        state="received",
        received=_iso(spool.study_created(study_key)),
        accession_number=info.get("accession_number"),
        study_date=info.get("study_date"),
        modality=info.get("modality"),
        patient_name=info.get("patient_name") if show_patient_name else None,
        instances=len(instances),
        selected=len(selected),
        queued=sum(1 for i in selected if i.queued or i.done),
        # A worker on another host keeps its outbox: the node knows its instances as done.
        analysed=sum(1 for i in selected if i.instance_key in records or i.done),
    )
    for dead in outbox.dead_sources_of(study_key):
        view.dead_letters.append(DeadLetterView("analysis", dead.key, dead.reason, dead.at))
    done = {i.instance_key for i in instances if i.done}
    for destination in destinations:
        state = DestinationState(destination.name)
        for record in records.values():
            for key in record.results:
                kind = outbox.state(key, destination.name)
                if kind == "delivered":
                    state.delivered += 1
                elif kind == "pending":
                    # A finished instance is not sent to a destination added after it.
                    state.pending += record.instance_key not in done
                else:
                    state.dead += 1
                    letter = outbox.dead_letter_of(key, destination.name)
                    if letter is not None:
                        view.dead_letters.append(
                            DeadLetterView(destination.name, key, letter.reason, letter.at)
                        )
        view.destinations.append(state)
    view.state = _state(view, bool(destinations))
    return view


def _state(view: StudyView, has_destinations: bool) -> str:
    if view.dead_letters:
        return "dead-lettered"
    if view.selected == 0:
        return "stored"
    if view.analysed >= view.selected:
        waiting = any(d.pending for d in view.destinations) or not has_destinations
        return "analysed" if waiting else "delivered"
    if view.queued:
        return "queued"
    return "received"


def recent_studies(
    spool: Spool,
    outbox: Outbox,
    destinations: Sequence[Destination],
    *,
    limit: int,
    show_patient_name: bool = False,
) -> list[StudyView]:
    """The newest studies with their state."""
    views = []
    for key in recent_keys(spool, limit):
        try:
            views.append(
                study_view(spool, outbox, key, destinations, show_patient_name=show_patient_name)
            )
        except IngestError:  # removed meanwhile (e.g. pruned)
            continue
    return views


def make_pending_again(
    spool: Spool, outbox: Outbox, study_key: str, destinations: Sequence[Destination]
) -> list[str]:
    """Clear a study's dead letters and mark their instances not done, so that the next task
    for the study analyses or delivers them again; return the instance keys (``*`` for a
    whole-study dead letter)."""
    instances = outbox.clear_dead_letters(study_key, [d.name for d in destinations])
    keys = [k for k in instances if k != "*"]
    if keys:
        # A study missing from the spool: its task will dead-letter it again, with the reason.
        with contextlib.suppress(IngestError):
            spool.unmark_done(study_key, keys)
    return instances


__all__ = [
    "DeadLetterView",
    "DestinationState",
    "StudyView",
    "make_pending_again",
    "recent_keys",
    "recent_studies",
    "study_view",
]
