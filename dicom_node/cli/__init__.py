"""The ``coronet`` command: the one composition root, the only module that sees the node, the
worker and the all-in-one stack together.

Each sub-command lives in its own module (``*_cmd``) with a ``register`` function that adds it
to the parser; a module depends only on :mod:`dicom_node.core` and on the part it drives.
Heavy libraries (torch, MONAI) are imported inside the handlers that need them, marked
``# heavy``, so that ``coronet --help`` and the admin commands start fast.

Exit status: 0 on success, 1 when the work failed, 2 for a usage or configuration error.
Every command is reachable as ``main([...])`` so that tests can call it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from dicom_node import __version__
from dicom_node.cli import (
    admin_cmd,
    aet_cmd,
    config_cmd,
    demo_cmd,
    infer_cmd,
    node_cmd,
    outbox_cmd,
    run_cmd,
    storage_cmd,
    worker_cmd,
)
from dicom_node.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Handler, Registrar
from dicom_node.core.errors import ConfigError, CoronetError
from dicom_node.core.logs import configure_logging
from dicom_node.core.settings import DEFAULT_CONFIG

_EPILOG = """\
Configuration precedence: --set key=value, then CORONET_SECTION__FIELD environment variables,
then the YAML file, then built-in defaults.  Not a medical device: results are for research
and must not be used for diagnosis.
"""

REGISTRARS: tuple[Registrar, ...] = (
    config_cmd.register,
    aet_cmd.register,
    node_cmd.register,
    worker_cmd.register,
    infer_cmd.register,
    outbox_cmd.register,
    storage_cmd.register,
    admin_cmd.register,
    demo_cmd.register,
    run_cmd.register,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``coronet`` parser with every sub-command."""
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
    parser.set_defaults(config=DEFAULT_CONFIG)  # the sub-commands' --config has no default
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in REGISTRARS:
        register(sub)
    return parser


#: OpenMP's wait policy, read once when torch loads, so set before any handler imports it.
#: Waiting threads that sleep instead of spinning keep a worker or ``coronet infer`` from
#: collapsing when other processes load the same cores: ``bench/contention.py`` measured the
#: fast map on 2 cores at 3.4 times its time alone with one busy competitor under the default
#: policy, 1.2 times with PASSIVE (docs/benchmarks.md).  An exported value wins.
OPENMP_WAIT_POLICY = "PASSIVE"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``coronet`` with ``argv`` (default: the process arguments); return the exit status."""
    os.environ.setdefault("OMP_WAIT_POLICY", OPENMP_WAIT_POLICY)
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    handler: Handler = args.handler
    try:
        status = handler(args)
        sys.stdout.flush()  # a reader that went away shows here, not at interpreter exit
        return status
    except BrokenPipeError:
        # The reader went away (e.g. `coronet aet list | head`): not a failure of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except CoronetError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
