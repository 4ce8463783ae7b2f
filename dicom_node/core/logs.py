"""Logging set-up shared by every ``coronet`` process.

* Our own loggers are named after their modules and log no PHI: studies and instances by their
  spool keys only (see the conformance statement).
* Every line is one line: control characters in a message (a peer's newline, a terminal escape)
  are written as ``\\xNN``, so nobody can forge a log line by sending data.
* pynetdicom logs every request at INFO and UIDs at DEBUG, highdicom every object it builds:
  :func:`quiet_libraries` keeps only their warnings.  What pydicom and pynetdicom still log,
  and Python warnings (which pydicom uses for invalid values), have quoted values and UIDs
  replaced by placeholders.
"""

from __future__ import annotations

import logging
import re
from typing import Final

FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CHATTY_LIBRARIES: Final = ("pynetdicom", "highdicom")
#: Loggers whose messages may echo values from received data.
THIRD_PARTY: Final = ("pydicom", "pynetdicom", "py.warnings")

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_UID_LIKE = re.compile(r"\d+(?:\.\d+){2,}")


def escape_controls(text: str) -> str:
    """``text`` with every control character written as ``\\xNN``."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def redact_values(text: str) -> str:
    """``text`` with quoted values and UIDs replaced by placeholders."""
    return _UID_LIKE.sub("<UID>", _QUOTED.sub("'<value>'", text))


class OneLineFormatter(logging.Formatter):
    """Escapes control characters in the message (tracebacks keep their lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


class OneLine(logging.Filter):
    """:class:`OneLineFormatter` as a filter, for handlers whose formatter is someone else's
    (Celery's): the message is rendered and escaped once."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = escape_controls(record.getMessage())
        record.args = None
        return True


class RedactThirdParty(logging.Filter):
    """Replaces values and UIDs in records of :data:`THIRD_PARTY` loggers."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".", 1)[0] in THIRD_PARTY or record.name == "py.warnings":
            record.msg = redact_values(record.getMessage())
            record.args = None
        return True


def level_for(verbosity: int) -> int:
    """``-v`` count to level: WARNING, INFO (``-v``), DEBUG (``-vv``)."""
    return logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG


def configure_logging(verbosity: int) -> None:
    """Root logging for a command run with ``verbosity`` times ``-v`` (see the module doc)."""
    logging.basicConfig(level=level_for(verbosity), format=FORMAT)
    logging.captureWarnings(True)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(OneLineFormatter(FORMAT))
        if not any(isinstance(f, RedactThirdParty) for f in handler.filters):
            handler.addFilter(RedactThirdParty())


def make_safe(logger: logging.Logger) -> None:
    """Redact and escape on every handler of ``logger`` whatever its formatter (the worker's
    loggers, which Celery sets up), and route Python warnings through logging."""
    logging.captureWarnings(True)
    for handler in logger.handlers:
        if not any(isinstance(f, RedactThirdParty) for f in handler.filters):
            handler.addFilter(RedactThirdParty())
            handler.addFilter(OneLine())


def quiet_libraries() -> None:
    """Keep only warnings of the libraries that log every step (and UIDs) at INFO."""
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
