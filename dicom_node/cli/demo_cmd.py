"""``coronet demo send``: push sample chest radiographs into the demo PACS of ``coronet run``."""

from __future__ import annotations

import argparse
from pathlib import Path

from dicom_node.cli.common import EXIT_FAILED, EXIT_OK
from dicom_node.stack.demo import send_demo


def _demo_send(args: argparse.Namespace) -> int:
    ok, message = send_demo(
        files=args.files,
        var_dir=args.var_dir,
        host=args.host,
        port=args.port,
        called_aet=args.aet,
        calling_aet=args.calling_aet,
        keep_uids=args.keep_uids,
    )
    print(message)
    return EXIT_OK if ok else EXIT_FAILED


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``coronet demo send``."""
    parser = sub.add_parser(
        "demo",
        help="send sample chest radiographs into the demo PACS of `coronet run`",
        description="Helpers for the all-in-one demo started by `coronet run` (make run).",
    )
    demo_sub = parser.add_subparsers(dest="demo_command", required=True, metavar="COMMAND")
    send = demo_sub.add_parser(
        "send",
        help="C-STORE a chest radiograph into the demo Orthanc, which routes it to the node",
        description="Send FILE to the demo Orthanc over DICOM; by default two studies: a "
        "synthetic phantom CR like the demo weights' training data (it comes back with findings "
        "and a heatmap) and the real adult PA chest CR RG1_UNCR.dcm from pydicom-data, which "
        "the demo weights never saw (it comes back 'Not Evaluated').  Orthanc's Lua script "
        "routes CR and DX to the node; the results appear in the same study a few seconds "
        "later.  "
        "Each send gets new Study, Series and SOP Instance UIDs (a new study), unless "
        "--keep-uids.  Orthanc's address is read from <var-dir>/run/state.json unless given.",
    )
    send.add_argument("files", nargs="*", type=Path, metavar="FILE", help="DICOM files to send")
    send.add_argument(
        "--var-dir", type=Path, default=Path("var"), help="state folder of `coronet run`"
    )
    send.add_argument("--host", default=None, help="Orthanc host (default 127.0.0.1)")
    send.add_argument("--port", type=int, default=None, help="Orthanc DICOM port")
    send.add_argument("--aet", default=None, help="Orthanc's AE title")
    send.add_argument("--calling-aet", default="CORONETDEMO", help="our AE title for the send")
    send.add_argument(
        "--keep-uids", action="store_true", help="send the files unchanged (same UIDs)"
    )
    send.set_defaults(handler=_demo_send)
