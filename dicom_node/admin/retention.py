"""Bounded disk: remove delivered studies after ``storage.retention`` days.

A study is removed, spool folder and outbox files (results, analysis records, delivery
markers), only when all of this holds:

* every selected instance is done, analysed, and each of its results is delivered to every
  configured destination (with no destination configured, nothing counts as delivered);
* the study has no dead letter (of an instance, of the whole study, or of a result);
* its newest activity (an instance received, a result delivered) is older than the cut-off.

Dead letters and undelivered studies are never removed automatically.  The node runs
:func:`prune` every ``storage.prune_interval`` seconds; ``coronet storage prune`` runs it once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from dicom_node.core.errors import IngestError
from dicom_node.core.outbox import Outbox
from dicom_node.core.settings import Destination
from dicom_node.core.spool import Spool

logger = logging.getLogger(__name__)

DAY_S = 86400.0


@dataclass
class PruneReport:
    """What one prune run removed and kept."""

    removed: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    kept_recent: int = 0
    kept_undelivered: int = 0
    kept_dead_letters: int = 0


def study_verdict(
    spool: Spool, outbox: Outbox, study_key: str, destinations: Sequence[Destination]
) -> tuple[str, float]:
    """``delivered``, ``undelivered`` or ``dead-letter``, and the study's newest activity."""
    newest = spool.study_created(study_key)
    if outbox.dead_sources_of(study_key):
        return "dead-letter", newest
    records = {r.instance_key: r for r in outbox.sources_of(study_key)}
    names = [d.name for d in destinations]
    for instance in spool.instances(study_key):
        newest = max(newest, instance.received or 0.0)
        if not instance.selected:
            continue
        record = records.get(instance.instance_key)
        if not instance.done or record is None:
            return "undelivered", newest
        if record.results and not names:
            return "undelivered", newest
        for key in record.results:
            for name in names:
                state = outbox.state(key, name)
                if state == "dead":
                    return "dead-letter", newest
                if state != "delivered":
                    return "undelivered", newest
                newest = max(newest, outbox.delivered_at(key, name) or 0.0)
    return "delivered", newest


def prune(
    spool: Spool,
    outbox: Outbox,
    destinations: Sequence[Destination],
    older_than_days: float,
    *,
    now: float | None = None,
    dry_run: bool = False,
) -> PruneReport:
    """Remove the delivered studies older than ``older_than_days`` (see the module docstring)."""
    cutoff = (now if now is not None else time.time()) - older_than_days * DAY_S
    report = PruneReport()
    for study_key in spool.study_keys():
        try:
            verdict, newest = study_verdict(spool, outbox, study_key, destinations)
        except IngestError as err:  # removed meanwhile, or unreadable: leave it
            logger.warning("study %s: cannot decide whether to prune it: %s", study_key, err)
            continue
        if verdict == "dead-letter":
            report.kept_dead_letters += 1
        elif verdict == "undelivered":
            report.kept_undelivered += 1
        elif newest > cutoff:
            report.kept_recent += 1
        else:
            if not dry_run:
                report.freed_bytes += outbox.remove_study(study_key)
                report.freed_bytes += spool.remove_study(study_key)
            report.removed.append(study_key)
    if report.removed:
        logger.info(
            "pruned %d delivered studies older than %g days (%.1f MB)%s",
            len(report.removed),
            older_than_days,
            report.freed_bytes / 1e6,
            " (dry run)" if dry_run else "",
        )
    return report


__all__ = ["PruneReport", "prune", "study_verdict"]
