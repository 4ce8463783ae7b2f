"""``coronet outbox list|retry``: what the outbox holds, per destination, and sending it again."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from dicom_node.cli.common import EXIT_FAILED, EXIT_OK, add_config_options, settings_from_args
from dicom_node.core.logs import quiet_libraries
from dicom_node.core.outbox import STATES, Outbox, State
from dicom_node.core.settings import Destination, Settings
from dicom_node.core.spool import Spool
from worker.delivery import Sender, describe_status
from worker.rounds import DeliveryRound, retry_outbox


def format_listing(
    outbox: Outbox, destinations: Sequence[Destination], *, state: State | None = None
) -> str:
    """The text of ``coronet outbox list``."""
    names = [d.name for d in destinations]
    records = outbox.results()
    states = {r.key: {name: outbox.state(r.key, name) for name in names} for r in records}
    if state is not None:
        records = [r for r in records if state in states[r.key].values()]
    lines = [f"outbox {outbox.root}: {len(records)} results"]
    for name in names:
        counts = {s: sum(1 for r in records if states[r.key][name] == s) for s in STATES}
        lines.append(
            f"  {name}: {counts['delivered']} delivered, {counts['pending']} pending, "
            f"{counts['dead']} dead-lettered"
        )
    if records:
        header = f"{'RESULT':<32}  {'KIND':<5} {'STUDY':<32}  " + "  ".join(names)
        lines += ["", header]
        for r in records:
            cells = "  ".join(f"{states[r.key][name]:<{len(name)}}" for name in names)
            lines.append(f"{r.key:<32}  {r.kind:<5} {r.study_key:<32}  {cells}")
    for name in names:
        letters = outbox.dead_letters(name)
        if letters:
            lines += ["", f"dead-lettered for {name}:"]
            lines += [
                f"  {d.key}  {describe_status(d.status) if d.status is not None else '-'}"
                f"  {d.at}  {d.reason}"
                for d in letters
            ]
    failed = outbox.dead_sources()
    if failed:
        lines += ["", "dead-lettered instances (study/instance, or study/* for a whole study):"]
        lines += [f"  {d.key}  {d.at}  {d.reason}" for d in failed]
    if not names:
        lines.append("(no destinations configured)")
    return "\n".join(lines)


def format_round(round_: DeliveryRound, destinations: Sequence[Destination]) -> str:
    """The report of ``coronet outbox retry``."""
    lines = []
    for destination in destinations:
        name = destination.name
        delivered = sum(1 for _, d in round_.delivered if d == name)
        refused = [r for r in round_.refused if r[1] == name]
        waiting = round_.waiting_keys.get(name, [])
        line = f"{name}: {delivered} delivered, {len(refused)} refused, {len(waiting)} waiting"
        if name in round_.waiting:
            line += f" ({round_.waiting[name]})"
        lines.append(line)
        lines += [f"  refused {key}: {reason}" for key, _, reason in refused]
    if not lines:
        lines.append("no destinations configured")
    if not round_.delivered and not round_.refused and not round_.waiting:
        lines.append("nothing to send")
    return "\n".join(lines)


def _outbox_list(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    outbox = Outbox(settings.storage.outbox_dir)
    print(format_listing(outbox, _destinations(settings, args.destination), state=args.state))
    return EXIT_OK


def _outbox_retry(args: argparse.Namespace) -> int:
    quiet_libraries()
    settings = settings_from_args(args)
    outbox = Outbox(settings.storage.outbox_dir)
    destinations = _destinations(settings, args.destination)
    round_, done = retry_outbox(
        outbox,
        Spool(settings.storage.spool_dir),
        Sender.from_settings(settings),
        settings.destinations,
        destinations,
        dead_only=args.dead_only,
    )
    print(format_round(round_, destinations))
    if done:
        print(f"{len(done)} spool instances settled and marked done")
    return EXIT_FAILED if round_.transient or round_.refused else EXIT_OK


def _destinations(settings: Settings, name: str | None) -> list[Destination]:
    return [settings.destination(name)] if name else list(settings.destinations)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``coronet outbox list|retry``."""
    parser = sub.add_parser(
        "outbox",
        help="show results waiting for delivery, delivered or dead-lettered; send them again",
        description="The outbox (storage.outbox_dir) holds every SR and SC the worker made, "
        "with its delivery state per destination: pending, delivered or dead-lettered "
        "(refused for good, or given up after the last retry).",
    )
    outbox_sub = parser.add_subparsers(dest="outbox_command", required=True, metavar="COMMAND")

    listing = outbox_sub.add_parser(
        "list",
        help="list the results and their state per destination",
        description="List every result (opaque key, kind, study key) with its state per "
        "destination, the dead letters with their reasons, and the dead-lettered instances with "
        "theirs (missing or unreadable in the spool, no result can be built from the header, "
        "the analysis failed).  Keys are opaque spool keys, never UIDs.",
    )
    add_config_options(listing)
    listing.add_argument("--destination", metavar="NAME", help="only this destination")
    listing.add_argument(
        "--state",
        choices=["pending", "delivered", "dead"],
        help="only results in this state for some destination",
    )
    listing.set_defaults(handler=_outbox_list)

    retry = outbox_sub.add_parser(
        "retry",
        help="send dead-lettered and pending results again, now, and report",
        description="Send every dead-lettered and pending result to its destinations in this "
        "process (not through the queue), record the outcome and print a report.  Exit 0 when "
        "everything was delivered, 1 otherwise.",
    )
    add_config_options(retry)
    retry.add_argument("--destination", metavar="NAME", help="only this destination")
    retry.add_argument(
        "--dead-only", action="store_true", help="only dead-lettered results, not pending ones"
    )
    retry.set_defaults(handler=_outbox_retry)
