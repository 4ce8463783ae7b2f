"""What every ``coronet`` sub-command shares: exit statuses, the configuration options and
argument types.

Exit status: 0 on success, 1 when the work failed, 2 for a usage or configuration error.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Final

from dicom_node.core.settings import DEFAULT_CONFIG, Settings, load_settings

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2

Handler = Callable[[argparse.Namespace], int]
"""What a sub-command runs; it returns the exit status."""

Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]
"""Adds one sub-command to the ``coronet`` parser."""


def add_config_options(parser: argparse.ArgumentParser, *, with_overrides: bool = True) -> None:
    """``--config FILE`` and, optionally, repeatable ``--set key=value``.

    ``--config`` has no default of its own (the ``coronet`` parser sets it once), so a command
    may accept it at several levels, e.g. ``aet add --config F caller X`` as well as
    ``aet add caller X --config F``: a sub-command that does not see it leaves the value of the
    level above.
    """
    parser.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
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
    """The settings named by ``--config`` with the ``--set`` overrides applied."""
    return load_settings(args.config, getattr(args, "overrides", []))


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value
