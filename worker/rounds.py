"""Delivery rounds: send the outbox's pending results to the destinations and record the outcome.

A round (:func:`deliver`) sends, per destination, every result still pending there (each
source's SC before its SR, which references it) and records what each answer means
(:mod:`worker.delivery`): delivered, refused for good (dead-lettered at once), or waiting for a
destination that may come back.  After the last retry :func:`give_up` dead-letters what still
waits; :func:`settle` marks a spool instance done once all its results are settled.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from dicom_node.core.errors import IngestError, PermanentDeliveryError, TransientDeliveryError
from dicom_node.core.outbox import KIND_ORDER, Outbox, SourceRecord, State
from dicom_node.core.settings import Destination
from dicom_node.core.spool import Spool
from worker.delivery import Disposition, SendFn, describe_status

logger = logging.getLogger(__name__)


class DoneMarks(Protocol):
    """Where finished instances are marked (the spool, or a source that tells the node)."""

    def mark_done(self, study_key: str, instance_keys: Iterable[str]) -> None: ...


@dataclass
class DeliveryRound:
    """What one round of sending achieved."""

    delivered: list[tuple[str, str]] = field(default_factory=list)
    """(result key, destination) pairs stored by the destination."""
    refused: list[tuple[str, str, str]] = field(default_factory=list)
    """(result key, destination, reason) pairs refused for good (now dead-lettered)."""
    waiting: dict[str, str] = field(default_factory=dict)
    """destination -> reason, for destinations with results still waiting (transient)."""
    waiting_keys: dict[str, list[str]] = field(default_factory=dict)
    """destination -> the result keys that are still waiting there."""

    @property
    def transient(self) -> bool:
        return bool(self.waiting)


def order_for_sending(outbox: Outbox, keys: Iterable[str]) -> list[str]:
    """Unique keys, each source's SC before its SR (the SR references the SC)."""
    unique = list(dict.fromkeys(keys))
    kinds = {}
    for key in unique:
        record = outbox.result(key)
        kinds[key] = KIND_ORDER.get(record.kind, 1) if record is not None else 1
    return sorted(unique, key=lambda k: kinds[k])


def deliver(
    outbox: Outbox,
    destinations: Sequence[Destination],
    keys: Iterable[str],
    send: SendFn,
    *,
    states: Iterable[State] = ("pending",),
) -> DeliveryRound:
    """Send every result of ``keys`` in one of ``states`` to every destination; record it.

    ``states=("pending", "dead")`` sends dead-lettered results again too.  Results already
    delivered to a destination are never sent there again.
    """
    round_ = DeliveryRound()
    ordered = order_for_sending(outbox, keys)
    wanted = set(states) - {"delivered"}
    for destination in destinations:
        todo = [k for k in ordered if outbox.state(k, destination.name) in wanted]
        todo = [k for k in todo if outbox.result(k) is not None]
        if not todo:
            continue
        _deliver_to(outbox, destination, todo, send, round_)
    return round_


def _deliver_to(
    outbox: Outbox,
    destination: Destination,
    todo: list[str],
    send: SendFn,
    round_: DeliveryRound,
) -> None:
    name = destination.name
    try:
        outcomes = send(destination, [outbox.result_path(k) for k in todo])
    except PermanentDeliveryError as err:
        for key in todo:
            outbox.dead_letter(key, name, None, str(err))
            round_.refused.append((key, name, str(err)))
        logger.error("destination %s refused %d results for good: %s", name, len(todo), err)
        return
    except TransientDeliveryError as err:
        round_.waiting[name] = str(err)
        round_.waiting_keys[name] = list(todo)
        logger.warning("destination %s unavailable, %d results wait: %s", name, len(todo), err)
        return
    by_path = {outcome.path: outcome for outcome in outcomes}
    for key in todo:
        outcome = by_path.get(outbox.result_path(key))
        if outcome is None:
            round_.waiting.setdefault(name, "no answer for some results")
            round_.waiting_keys.setdefault(name, []).append(key)
        elif outcome.disposition is Disposition.DELIVERED:
            outbox.mark_delivered(key, name, outcome.status)
            round_.delivered.append((key, name))
        elif outcome.disposition is Disposition.PERMANENT:
            reason = f"refused: {outcome.detail}"
            outbox.dead_letter(key, name, outcome.status, reason)
            round_.refused.append((key, name, reason))
        else:
            round_.waiting.setdefault(name, describe_status(outcome.status))
            round_.waiting_keys.setdefault(name, []).append(key)


def give_up(outbox: Outbox, round_: DeliveryRound, why: str) -> int:
    """Dead-letter the results still waiting after the last retry; return how many."""
    count = 0
    for name, keys in round_.waiting_keys.items():
        reason = f"{why}; last error: {round_.waiting.get(name, 'unknown')}"
        for key in keys:
            outbox.dead_letter(key, name, None, reason)
            count += 1
    return count


def settle(
    outbox: Outbox,
    spool: DoneMarks,
    destinations: Sequence[Destination],
    records: Iterable[SourceRecord],
) -> list[str]:
    """Mark done in the spool every source instance of ``records`` that is settled.

    Returns the instance keys marked done.  A spool that lacks the study is logged and
    skipped; a node that cannot be told raises (``worker.sources.SourceUnavailable``).
    """
    done: list[str] = []
    by_study: dict[str, list[str]] = {}
    for record in records:
        if outbox.is_settled(record, destinations):
            by_study.setdefault(record.study_key, []).append(record.instance_key)
    for study_key, instance_keys in by_study.items():
        try:
            spool.mark_done(study_key, instance_keys)
        except IngestError as err:
            logger.warning("study %s: cannot mark instances done: %s", study_key, err)
            continue
        done.extend(instance_keys)
    return done


def retry_outbox(
    outbox: Outbox,
    spool: Spool,
    send: SendFn,
    configured: Sequence[Destination],
    destinations: Sequence[Destination],
    *,
    dead_only: bool = False,
) -> tuple[DeliveryRound, list[str]]:
    """Send dead-lettered (and, unless ``dead_only``, pending) results to ``destinations``
    again, synchronously; ``configured`` are all destinations, which decide what is settled.

    Returns the round and the spool instance keys that became settled and were marked done.
    """
    states: tuple[State, ...] = ("dead",) if dead_only else ("pending", "dead")
    records = outbox.results()
    round_ = deliver(outbox, destinations, [r.key for r in records], send, states=states)
    touched = {key for key, _ in round_.delivered} | {key for key, _, _ in round_.refused}
    sources = {(r.study_key, r.instance_key) for r in records if r.key in touched}
    analysed = [outbox.source(study, instance) for study, instance in sorted(sources)]
    done = settle(outbox, spool, configured, [s for s in analysed if s is not None])
    return round_, done


__all__ = [
    "DeliveryRound",
    "deliver",
    "give_up",
    "order_for_sending",
    "retry_outbox",
    "settle",
]
