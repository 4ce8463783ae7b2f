"""The ``coronet`` command line: one entry point with a subcommand per job.

Exit status: 0 on success, 1 when the work failed, 2 for a usage or configuration error.
Every command is reachable as ``main([...])`` so that tests can call it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from dicom_node import __version__
from dicom_node.aet import ConfigDocument
from dicom_node.config import DEFAULT_CONFIG, Settings, load_settings
from dicom_node.errors import ConfigError, CoronetError
from dicom_node.node_cli import register as _register_node
from worker.cli import register_demo as _register_demo
from worker.cli import register_outbox as _register_outbox
from worker.cli import register_run as _register_run
from worker.cli import register_worker as _register_worker
from worker.infer_cli import register as _register_infer

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], int]

_EPILOG = """\
Configuration precedence: --set key=value, then CORONET_SECTION__FIELD environment variables,
then the YAML file, then built-in defaults.  Not a medical device: results are for research
and must not be used for diagnosis.
"""


def add_config_options(parser: argparse.ArgumentParser, *, with_overrides: bool = True) -> None:
    """``--config FILE`` and, optionally, repeatable ``--set key=value``."""
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        metavar="FILE",
        help=f"node configuration file (default: {DEFAULT_CONFIG})",
    )
    if with_overrides:
        parser.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a field, e.g. --set node.port=11113 (repeatable)",
        )


def settings_from_args(args: argparse.Namespace) -> Settings:
    return load_settings(args.config, getattr(args, "overrides", []))


# --------------------------------------------------------------------------- config


def _describe_tls(tls: object) -> str:
    return "TLS on" if tls is not None else "TLS off"


def format_summary(settings: Settings) -> str:
    """A short human summary of the AE titles, destinations and folders."""
    node = settings.node
    lines = [
        f"node         {node.ae_title} listening on {node.host}:{node.port} "
        f"({_describe_tls(node.tls)}, at most {node.max_associations} associations)",
        f"callers      {len(settings.callers)} allowed",
    ]
    for caller in settings.callers:
        lines.append(f"  {caller.ae_title:<16} from {caller.host or 'any host'}")
    lines.append(f"destinations {len(settings.destinations)}")
    for dest in settings.destinations:
        where = f"{dest.ae_title} at {dest.host}:{dest.port}"
        lines.append(f"  {dest.name:<16} {where} ({_describe_tls(dest.tls)})")
    lines += [
        f"spool        {settings.storage.spool_dir}",
        f"outbox       {settings.storage.outbox_dir}",
        f"broker       {settings.broker.url} queue {settings.broker.queue}",
        f"model        {settings.model.bundle_dir} on {settings.model.device}",
        f"selection    modalities {','.join(settings.selection.modalities)}; "
        f"body parts {','.join(settings.selection.body_parts) or 'any'}; "
        f"views {','.join(settings.selection.view_positions) or 'any'}",
        f"grouping     {settings.grouping.mode}"
        + (
            f", quiet for {settings.grouping.quiet_seconds:g} s"
            if settings.grouping.mode == "study"
            else ""
        ),
    ]
    return "\n".join(lines)


def _config_check(args: argparse.Namespace) -> int:
    settings = load_settings(args.file, args.overrides)
    print(f"{args.file}: OK")
    print(format_summary(settings))
    return EXIT_OK


def _register_config(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "config", help="check a configuration file", description="Check a configuration file."
    )
    config_sub = parser.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    check = config_sub.add_parser(
        "check",
        help="validate FILE and print a summary of AE titles and destinations",
        description="Validate FILE and print a summary of the AE titles and destinations. "
        "On error, name each field and the reason, and exit 2.",
    )
    check.add_argument("file", type=Path, metavar="FILE", help="configuration file to check")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    check.set_defaults(handler=_config_check)


# --------------------------------------------------------------------------- aet


def _aet_list(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    print(f"our AE title: {settings.node.ae_title} ({settings.node.host}:{settings.node.port})")
    print("allowed callers:")
    for caller in settings.callers:
        print(f"  {caller.ae_title:<16} {caller.host or 'any host'}")
    if not settings.callers:
        print("  (none: every association will be rejected)")
    print("destinations:")
    for dest in settings.destinations:
        where = f"{dest.host}:{dest.port}"
        print(f"  {dest.name:<16} {dest.ae_title:<16} {where} {_describe_tls(dest.tls)}")
    if not settings.destinations:
        print("  (none)")
    return EXIT_OK


def _aet_add(args: argparse.Namespace) -> int:
    doc = ConfigDocument(args.config)
    if args.kind == "caller":
        doc.add_caller(args.ae_title, args.host)
        what = f"caller {args.ae_title.strip()}"
    else:
        tls = _tls_from_args(args)
        doc.add_destination(args.name, args.ae_title, args.host, args.port, tls)
        what = f"destination {args.name}"
    doc.save()
    print(f"added {what} to {args.config}; reload a running node to apply it")
    return EXIT_OK


def _tls_from_args(args: argparse.Namespace) -> dict[str, str] | None:
    tls = {
        key: str(value)
        for key, value in (
            ("cert_file", args.tls_cert),
            ("key_file", args.tls_key),
            ("ca_file", args.tls_ca),
        )
        if value is not None
    }
    return tls or None


def _aet_remove(args: argparse.Namespace) -> int:
    doc = ConfigDocument(args.config)
    if args.kind == "caller":
        doc.remove_caller(args.target)
    else:
        doc.remove_destination(args.target)
    doc.save()
    print(
        f"removed {args.kind} {args.target} from {args.config}; reload a running node to apply it"
    )
    return EXIT_OK


def _register_aet(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "aet",
        help="list, add or remove allowed callers and destinations",
        description="Manage the allowed calling AE titles and the destinations in the "
        "configuration file.  The file is rewritten atomically, with its comments and order kept, "
        "and only after the result has been validated.",
    )
    aet_sub = parser.add_subparsers(dest="aet_command", required=True, metavar="COMMAND")

    listing = aet_sub.add_parser("list", help="show our AE title, the callers and the destinations")
    add_config_options(listing, with_overrides=False)
    listing.set_defaults(handler=_aet_list)

    add = aet_sub.add_parser("add", help="allow a caller or add a destination")
    add_kind = add.add_subparsers(dest="kind", required=True, metavar="KIND")
    caller = add_kind.add_parser(
        "caller", help="allow a calling AE title, optionally only from one host"
    )
    add_config_options(caller, with_overrides=False)
    caller.add_argument(
        "ae_title", metavar="TITLE", help="calling AE title (PS3.5: at most 16 characters)"
    )
    caller.add_argument("--host", help="only accept this caller from this host name or IP address")
    caller.set_defaults(handler=_aet_add)
    dest = add_kind.add_parser("destination", help="add a C-STORE destination for results")
    add_config_options(dest, with_overrides=False)
    dest.add_argument(
        "name", metavar="NAME", help="a short name for the destination, e.g. main-pacs"
    )
    dest.add_argument("--ae-title", required=True, help="the destination's AE title")
    dest.add_argument("--host", required=True, help="the destination's host name or IP address")
    dest.add_argument("--port", required=True, type=int, help="the destination's DICOM port")
    dest.add_argument("--tls-cert", type=Path, help="our client certificate for TLS (PEM)")
    dest.add_argument("--tls-key", type=Path, help="the key of that certificate (PEM)")
    dest.add_argument("--tls-ca", type=Path, help="CA bundle that verifies the destination (PEM)")
    dest.set_defaults(handler=_aet_add)

    remove = aet_sub.add_parser("remove", help="remove a caller or a destination")
    remove_kind = remove.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind, metavar in (("caller", "TITLE"), ("destination", "NAME")):
        rm = remove_kind.add_parser(kind, help=f"remove the {kind} {metavar}")
        add_config_options(rm, with_overrides=False)
        rm.add_argument("target", metavar=metavar)
        rm.set_defaults(handler=_aet_remove)


# --------------------------------------------------------------------------- main

REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [
    _register_config,
    _register_aet,
    _register_node,
    _register_worker,
    _register_infer,
    _register_outbox,
    _register_demo,
    _register_run,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coronet",
        description="CoroNet DICOM node: receive chest radiographs from a PACS, run the CoroNet "
        "model and send a DICOM SR and heatmap back.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in REGISTRARS:
        register(sub)
    return parser


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    handler: Handler = args.handler
    try:
        return handler(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except CoronetError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
