"""``coronet aet list|add|remove``: the allowed callers and the destinations, edited in place."""

from __future__ import annotations

import argparse
from pathlib import Path

from dicom_node.admin.config_edits import Actor, ConfigEditor
from dicom_node.cli.common import EXIT_OK, add_config_options
from dicom_node.cli.config_cmd import describe_tls
from dicom_node.cli.node_cmd import audit_trail
from dicom_node.core.settings import load_settings
from dicom_node.scp.node import launcher


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
        print(f"  {dest.name:<16} {dest.ae_title:<16} {where} {describe_tls(dest.tls)}")
    if not settings.destinations:
        print("  (none)")
    return EXIT_OK


def _editor(args: argparse.Namespace) -> ConfigEditor:
    """Edits of ``--config``, audited with the file's own audit settings."""
    return ConfigEditor(args.config, audit_trail(load_settings(args.config)))


def _aet_add(args: argparse.Namespace) -> int:
    editor, actor = _editor(args), Actor(launcher())
    if args.kind == "caller":
        editor.add_caller(actor, args.ae_title, args.host)
        print(
            f"added caller {args.ae_title.strip()} to {args.config}; "
            "reload a running node to apply it (coronet node reload)"
        )
    else:
        editor.add_destination(
            actor, args.name, args.ae_title, args.host, args.port, _tls_from_args(args)
        )
        print(
            f"added destination {args.name} to {args.config}; "
            "running workers use it from their next study"
        )
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
    editor, actor = _editor(args), Actor(launcher())
    if args.kind == "caller":
        editor.remove_caller(actor, args.target)
        applies = "reload a running node to apply it (coronet node reload)"
    else:
        editor.remove_destination(actor, args.target)
        applies = "running workers stop using it from their next study"
    print(f"removed {args.kind} {args.target} from {args.config}; {applies}")
    return EXIT_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``coronet aet list|add|remove``."""
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
    add_config_options(add, with_overrides=False)
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
    add_config_options(remove, with_overrides=False)
    remove_kind = remove.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind, metavar in (("caller", "TITLE"), ("destination", "NAME")):
        rm = remove_kind.add_parser(kind, help=f"remove the {kind} {metavar}")
        add_config_options(rm, with_overrides=False)
        rm.add_argument("target", metavar=metavar)
        rm.set_defaults(handler=_aet_remove)
