"""``coronet config check``: validate a configuration file and summarise it."""

from __future__ import annotations

import argparse
from pathlib import Path

from dicom_node.cli.common import EXIT_OK
from dicom_node.core.settings import Settings, TLSSettings, load_settings


def describe_tls(tls: TLSSettings | None) -> str:
    return "TLS on" if tls is not None else "TLS off"


def format_summary(settings: Settings) -> str:
    """A short human summary of the AE titles, destinations and folders."""
    node = settings.node
    lines = [
        f"node         {node.ae_title} listening on {node.host}:{node.port} "
        f"({describe_tls(node.tls)}, at most {node.max_associations} associations)",
        f"callers      {len(settings.callers)} allowed",
    ]
    for caller in settings.callers:
        lines.append(f"  {caller.ae_title:<16} from {caller.host or 'any host'}")
    lines.append(f"destinations {len(settings.destinations)}")
    for dest in settings.destinations:
        where = f"{dest.ae_title} at {dest.host}:{dest.port}"
        lines.append(f"  {dest.name:<16} {where} ({describe_tls(dest.tls)})")
    storage, admin, audit = settings.storage, settings.admin, settings.audit
    retention = f"{storage.retention:g} days" if storage.retention is not None else "for ever"
    scheme = "https" if admin.tls else "http"
    lines += [
        f"spool        {storage.spool_dir} (refuses instances below "
        f"{storage.min_free_bytes / (1 << 30):.1f} GiB free; delivered studies kept {retention})",
        f"outbox       {storage.outbox_dir}",
        f"admin        {scheme}://{admin.host}:{admin.port}/ (users in {admin.users_file})"
        if admin.enabled
        else "admin        off",
        f"audit        {audit.sink}"
        + (f" {audit.file}" if audit.sink == "file" else "")
        + (
            f" {audit.syslog.host}:{audit.syslog.port}/{audit.syslog.transport}"
            if audit.syslog and audit.sink == "syslog"
            else ""
        ),
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


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``coronet config check``."""
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
