"""Logging set-up shared by every ``coronet`` process.

Our own loggers are named after their modules.  pynetdicom logs every request at INFO (and
UIDs at DEBUG), highdicom every object it builds: :func:`quiet_libraries` keeps only their
warnings, so that INFO lines carry no UIDs (see the conformance statement).
"""

from __future__ import annotations

import logging
from typing import Final

FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CHATTY_LIBRARIES: Final = ("pynetdicom", "highdicom")


def level_for(verbosity: int) -> int:
    """``-v`` count to level: WARNING, INFO (``-v``), DEBUG (``-vv``)."""
    return logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG


def configure_logging(verbosity: int) -> None:
    """Root logging for a command run with ``verbosity`` times ``-v``."""
    logging.basicConfig(level=level_for(verbosity), format=FORMAT)


def quiet_libraries() -> None:
    """Keep only warnings of the libraries that log every step (and UIDs) at INFO."""
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
