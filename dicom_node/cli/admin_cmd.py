"""``coronet admin user add|remove|list``: the users of the admin console and API."""

from __future__ import annotations

import argparse
import getpass
import sys

from dicom_node.admin.users import UserStore
from dicom_node.cli.common import EXIT_OK, EXIT_USAGE, add_config_options, settings_from_args
from dicom_node.cli.node_cmd import audit_trail
from dicom_node.core import audit
from dicom_node.core.settings import Settings
from dicom_node.scp.node import launcher


def read_password(prompt: bool) -> str | None:
    """The new password: asked twice on a terminal, else the first line of standard input."""
    if prompt:
        first = getpass.getpass("password: ")
        if getpass.getpass("again: ") != first:
            return None
        return first
    return sys.stdin.readline().rstrip("\r\n")


def _audit(settings: Settings, name: str, change: str) -> None:
    trail = audit_trail(settings)
    trail.record(
        audit.configuration_change(
            audit.USER_SECURITY_ATTRIBUTES_CHANGED,
            launcher(),
            None,
            f"file://{settings.admin.users_file.resolve()}#{name}",
            change,
        )
    )
    trail.close()


def _user_add(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    password = read_password(sys.stdin.isatty())
    if password is None:
        print("error: the passwords differ", file=sys.stderr)
        return EXIT_USAGE
    store = UserStore(settings.admin.users_file)
    new = store.add(args.name, password)
    _audit(settings, args.name, "user added" if new else "password changed")
    print(f"{'added' if new else 'changed the password of'} {args.name} in {store.path}")
    return EXIT_OK


def _user_remove(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    store = UserStore(settings.admin.users_file)
    store.remove(args.name)
    _audit(settings, args.name, "user removed")
    print(f"removed {args.name} from {store.path}")
    return EXIT_OK


def _user_list(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    users = UserStore(settings.admin.users_file).users()
    for name in sorted(users):
        print(name)
    if not users:
        print(f"(no users in {settings.admin.users_file})")
    return EXIT_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``coronet admin user add|remove|list``."""
    parser = sub.add_parser(
        "admin",
        help="manage the users of the admin console and REST API",
        description="The admin service of `coronet node serve` (console, /api/v1) lets in the "
        "users of admin.users_file.  Passwords are stored as argon2id hashes.",
    )
    admin_sub = parser.add_subparsers(dest="admin_command", required=True, metavar="COMMAND")
    user = admin_sub.add_parser("user", help="add, remove or list users")
    user_sub = user.add_subparsers(dest="user_command", required=True, metavar="COMMAND")
    add = user_sub.add_parser(
        "add",
        help="add a user, or set a new password (read from standard input)",
        description="Add the user NAME, or give it a new password.  The password (at least 8 "
        "characters) is asked twice on a terminal, else read as the first line of standard "
        "input, e.g. `printf '%%s\\n' \"$PASSWORD\" | coronet admin user add alice`.",
    )
    add_config_options(add)
    add.add_argument("name", metavar="NAME")
    add.set_defaults(handler=_user_add)
    remove = user_sub.add_parser("remove", help="remove a user")
    add_config_options(remove)
    remove.add_argument("name", metavar="NAME")
    remove.set_defaults(handler=_user_remove)
    listing = user_sub.add_parser("list", help="list the users")
    add_config_options(listing)
    listing.set_defaults(handler=_user_list)
