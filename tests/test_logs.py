"""Log lines that received data cannot forge, and third-party echoes without values."""

from __future__ import annotations

import io
import logging

import pytest

from dicom_node.core.logs import (
    OneLineFormatter,
    RedactThirdParty,
    escape_controls,
    make_safe,
    redact_values,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain", "plain"),
        ("a\nb", "a\\x0ab"),
        ("bell\x07 and esc\x1b[31m", "bell\\x07 and esc\\x1b[31m"),
        ("del\x7f c1\x85", "del\\x7f c1\\x85"),
    ],
)
def test_control_characters_are_written_as_escapes(text: str, expected: str) -> None:
    assert escape_controls(text) == expected


def test_quoted_values_and_uids_are_replaced() -> None:
    text = "Invalid value for VR UI: '1.2.3.4\nX' and 1.2.840.10008.1.2 in \"DOE^JOHN\""
    redacted = redact_values(text)
    assert "1.2.3.4" not in redacted and "DOE" not in redacted and "1.2.840" not in redacted
    assert redacted.count("<value>") == 2 and "<UID>" in redacted


def _log_through(name: str, message: str) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(OneLineFormatter("%(name)s: %(message)s"))
    handler.addFilter(RedactThirdParty())
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        logger.warning(message)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def test_a_forged_line_stays_on_its_line() -> None:
    out = _log_through("dicom_node.test", "peer said 1.2\n2020-01-01 00:00:00 INFO forged")
    assert out.count("\n") == 1  # the record's own end of line only


def test_third_party_echoes_lose_their_values_and_ours_keep_them() -> None:
    assert "1.2.3.4.5" not in _log_through("pydicom", "bad UID '1.2.3.4.5'")
    assert "1.2.3.4.5" not in _log_through("pynetdicom.utils", "Non-conformant '1.2.3.4.5'")
    assert "study 0123abcd" in _log_through("dicom_node.test", "study 0123abcd")


def test_a_handler_with_a_foreign_formatter_is_made_safe_too() -> None:
    """The worker's handlers belong to Celery; their records are escaped and redacted."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
    logger = logging.getLogger("coronet.test.foreign")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        make_safe(logger)
        logging.getLogger("pydicom").addHandler(handler)
        logging.getLogger("pydicom").warning("Invalid value for VR UI: '1.2.3\nforged'")
        logger.warning("line one\nline two")
    finally:
        logging.getLogger("pydicom").removeHandler(handler)
        logger.removeHandler(handler)
        logging.captureWarnings(False)
    out = stream.getvalue()
    assert "forged" not in out and "1.2.3" not in out
    assert "line one\\x0aline two" in out
    assert out.count("\n") == 2
