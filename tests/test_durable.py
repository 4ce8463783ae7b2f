"""The durable-write helpers shared by the spool and the outbox."""

from __future__ import annotations

from pathlib import Path
from typing import IO

import pytest

from dicom_node.core.durable import TMP_SUFFIX, read_json, replace_json, write_temp


def test_replace_json_round_trip_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "record.json"
    replace_json(target, {"b": 2, "a": 1})
    replace_json(target, {"a": 3})
    assert read_json(target, "record") == {"a": 3}
    assert target.read_text() == '{"a": 3}'
    assert list(tmp_path.glob(f"*{TMP_SUFFIX}")) == []


def test_a_failed_write_removes_its_temporary(tmp_path: Path) -> None:
    def fail(handle: IO[bytes]) -> None:
        handle.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_temp(tmp_path, "result.dcm", fail)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, None),  # missing
        ("{not json", None),
        ("[1, 2]", None),  # not an object
        ('{"ok": true}', {"ok": True}),
    ],
)
def test_read_json(
    tmp_path: Path,
    content: str | None,
    expected: dict[str, object] | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "x.json"
    if content is not None:
        path.write_text(content)
    assert read_json(path, "test record") == expected
    if content == "{not json":
        assert "unreadable test record x.json" in caplog.text
