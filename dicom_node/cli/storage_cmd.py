"""``coronet storage prune``: remove delivered studies older than ``storage.retention`` days."""

from __future__ import annotations

import argparse

from dicom_node.admin.retention import prune
from dicom_node.cli.common import EXIT_OK, add_config_options, settings_from_args
from dicom_node.core.outbox import Outbox
from dicom_node.core.spool import Spool


def _prune(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    storage = settings.storage
    days = args.older_than if args.older_than is not None else storage.retention
    if days is None:
        print("storage.retention is null: nothing is removed (give --older-than DAYS)")
        return EXIT_OK
    report = prune(
        Spool(storage.spool_dir),
        Outbox(storage.outbox_dir),
        settings.destinations,
        days,
        dry_run=args.dry_run,
    )
    verb = "would remove" if args.dry_run else "removed"
    print(
        f"{verb} {len(report.removed)} delivered studies older than {days:g} days "
        f"({report.freed_bytes / 1e6:.1f} MB); kept {report.kept_recent} recent, "
        f"{report.kept_undelivered} undelivered, {report.kept_dead_letters} with dead letters"
    )
    for key in report.removed:
        print(f"  {key}")
    return EXIT_OK


def _non_negative_days(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``coronet storage prune``."""
    parser = sub.add_parser(
        "storage",
        help="remove delivered studies from the spool and the outbox",
        description="The node keeps received instances (spool) and results (outbox).  A "
        "delivered study is removed after storage.retention days by the running node; this "
        "command does the same now.",
    )
    storage_sub = parser.add_subparsers(dest="storage_command", required=True, metavar="COMMAND")
    prune_parser = storage_sub.add_parser(
        "prune",
        help="remove delivered studies older than storage.retention days",
        description="Remove the spool folder and the outbox files of every study whose "
        "results were all delivered to every destination, with no dead letter, and whose last "
        "activity is older than the retention.  Dead letters and undelivered studies are never "
        "removed.",
    )
    add_config_options(prune_parser)
    prune_parser.add_argument(
        "--older-than",
        type=_non_negative_days,
        metavar="DAYS",
        help="instead of storage.retention",
    )
    prune_parser.add_argument("--dry-run", action="store_true", help="only say what would go")
    prune_parser.set_defaults(handler=_prune)
