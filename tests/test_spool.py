"""The durable spool: layout, commit protocol, duplicates, task state and failures."""

from __future__ import annotations

import io
import json
import os
import tempfile
import threading
from pathlib import Path

import pydicom
import pytest

from dicom_node.core.errors import IngestError
from dicom_node.core.spool import KEY_LENGTH, Spool, check_key, key_for
from tests.support.dicom_data import RG1_UNCR

STUDY = "1.2.826.0.1.3680043.8.498.1"
SOP_A = "1.2.826.0.1.3680043.8.498.1.1"
SOP_B = "1.2.826.0.1.3680043.8.498.1.2"
SOP_C = "1.2.826.0.1.3680043.8.498.1.3"


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


@pytest.mark.parametrize(
    ("uid", "same_as"),
    [
        ("1.2.3", "1.2.3"),
        ("1.2.3\0", "1.2.3"),
        ("1.2.3 ", "1.2.3"),
        ("1.2.30", None),
    ],
)
def test_keys_are_hashes(uid: str, same_as: str | None) -> None:
    key = key_for(uid)
    assert len(key) == KEY_LENGTH
    assert check_key(key) == key
    assert uid.strip("\0 ") not in key
    if same_as is None:
        assert key != key_for("1.2.3")
    else:
        assert key == key_for(same_as)


@pytest.mark.parametrize("bad", ["", "../etc", "A" * KEY_LENGTH, "0" * (KEY_LENGTH - 1), "/tmp"])
def test_malformed_keys_are_refused(spool: Spool, bad: str) -> None:
    with pytest.raises(IngestError):
        spool.instances(bad)
    with pytest.raises(IngestError):
        spool.mark_done(key_for(STUDY), [bad])


@pytest.mark.parametrize("as_stream", [False, True])
def test_store_layout_and_content(spool: Spool, as_stream: bool) -> None:
    data = RG1_UNCR.read_bytes()
    source = io.BytesIO(data) if as_stream else RG1_UNCR
    stored = spool.store(source, SOP_A, STUDY, sop_class_uid="1.2.840.10008.5.1.4.1.1.1")
    assert not stored.duplicate
    assert stored.bytes == len(data)
    assert stored.path == spool.root / key_for(STUDY) / f"{key_for(SOP_A)}.dcm"
    assert stored.path.read_bytes() == data
    assert RG1_UNCR.exists()  # copied, not moved
    # No file name holds a UID; the UIDs are data.
    names = [str(p.relative_to(spool.root)) for p in _files(spool.root)]
    assert not any(STUDY in name or SOP_A in name for name in names)
    assert sorted(names) == sorted(
        [
            f"{stored.study_key}/study.json",
            f"{stored.study_key}/{stored.instance_key}.dcm",
            f"{stored.study_key}/{stored.instance_key}.json",
        ]
    )
    assert spool.study_uid(stored.study_key) == STUDY
    meta = json.loads((stored.path.with_suffix(".json")).read_text())
    assert meta["sop_instance_uid"] == SOP_A
    assert meta["selected"] is True
    assert spool.read_instance(stored.study_key, stored.instance_key).SOPInstanceUID == (
        pydicom.dcmread(RG1_UNCR, stop_before_pixels=True).SOPInstanceUID
    )


@pytest.mark.parametrize("source_dir", ["same", "other-filesystem"])
def test_move_removes_the_source(spool: Spool, tmp_path: Path, source_dir: str) -> None:
    if source_dir == "same":
        folder = tmp_path
    else:
        shm = Path("/dev/shm")
        if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
            pytest.skip("no second file system to move from")
        folder = Path(tempfile.mkdtemp(dir=shm))
    source = folder / "received.dcm"
    source.write_bytes(b"DICM-ish payload")
    stored = spool.store(source, SOP_A, STUDY, move=True)
    assert not source.exists()
    assert stored.path.read_bytes() == b"DICM-ish payload"
    assert not list(stored.path.parent.glob(".*.tmp"))


def test_duplicate_keeps_the_first_copy(spool: Spool, tmp_path: Path) -> None:
    first = spool.store(io.BytesIO(b"first"), SOP_A, STUDY)
    second_source = tmp_path / "second.dcm"
    second_source.write_bytes(b"second copy")
    second = spool.store(second_source, SOP_A, STUDY, move=True)
    assert (first.duplicate, second.duplicate) == (False, True)
    assert second.path == first.path
    assert first.path.read_bytes() == b"first"
    assert not second_source.exists()
    assert [r.instance_key for r in spool.instances(first.study_key)] == [first.instance_key]


def test_concurrent_copies_of_one_instance_store_once(spool: Spool) -> None:
    results = []
    lock = threading.Lock()

    def store(n: int) -> None:
        outcome = spool.store(io.BytesIO(f"copy {n}".encode()), SOP_A, STUDY)
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=store, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.duplicate for r in results) == [False] + [True] * 7
    winner = next(r for r in results if not r.duplicate)
    assert winner.path.read_bytes().startswith(b"copy ")
    assert len(spool.instances(winner.study_key)) == 1
    assert not list(winner.path.parent.glob(".*.tmp"))


def test_task_state(spool: Spool) -> None:
    a = spool.store(io.BytesIO(b"a"), SOP_A, STUDY)
    b = spool.store(io.BytesIO(b"b"), SOP_B, STUDY)
    c = spool.store(io.BytesIO(b"c"), SOP_C, STUDY, selected=False, reason="view position LL")
    study = a.study_key
    assert spool.pending_studies() == [study]
    assert spool.pending_instances(study) == sorted([a.instance_key, b.instance_key])
    assert len(spool.instances(study)) == 3
    assert {r.instance_key for r in spool.instances(study, selected_only=True)} == {
        a.instance_key,
        b.instance_key,
    }
    spool.mark_queued(study, [a.instance_key])
    assert spool.unqueued_instances(study) == [b.instance_key]
    assert spool.pending_instances(study) == sorted([a.instance_key, b.instance_key])
    spool.mark_done(study, [a.instance_key, b.instance_key])
    assert spool.pending_instances(study) == []
    assert spool.pending_studies() == []
    skipped = next(r for r in spool.instances(study) if r.instance_key == c.instance_key)
    assert (skipped.selected, skipped.reason, skipped.done) == (False, "view position LL", False)


def test_a_queued_instance_whose_file_is_gone_is_lost_until_done(spool: Spool) -> None:
    a = spool.store(io.BytesIO(b"a"), SOP_A, STUDY)
    b = spool.store(io.BytesIO(b"b"), SOP_B, STUDY)
    spool.store(io.BytesIO(b"c"), SOP_C, STUDY)  # never queued: not the worker's yet
    study = a.study_key
    spool.mark_queued(study, [a.instance_key, b.instance_key])
    for stored in (a, spool.store(io.BytesIO(b"c"), SOP_C, STUDY)):
        stored.path.unlink()
    assert spool.lost_instances(study) == [a.instance_key]
    assert a.instance_key not in spool.pending_instances(study)
    spool.mark_done(study, [a.instance_key])
    assert spool.lost_instances(study) == []


def test_instance_without_metadata_counts_as_pending(spool: Spool) -> None:
    stored = spool.store(io.BytesIO(b"x"), SOP_A, STUDY, selected=False)
    stored.path.with_suffix(".json").unlink()  # as after a crash before the folder fsync
    assert spool.pending_instances(stored.study_key) == [stored.instance_key]


def test_temporary_leftovers_are_removed(spool: Spool) -> None:
    stored = spool.store(io.BytesIO(b"x"), SOP_A, STUDY)
    leftover = stored.path.parent / f".{stored.instance_key}.abc123.tmp"
    leftover.write_bytes(b"partial")
    assert spool.remove_temporary() == 1
    assert not leftover.exists()
    assert stored.path.exists()


@pytest.mark.parametrize("blocker", ["spool-is-a-file", "study-folder-is-a-file"])
def test_unwritable_spool_raises_ingest_error(spool: Spool, blocker: str) -> None:
    # chmod does not stop root, so put a regular file where a folder must go.
    if blocker == "spool-is-a-file":
        spool.root.parent.mkdir(parents=True, exist_ok=True)
        spool.root.write_bytes(b"")
    else:
        spool.root.mkdir(parents=True)
        (spool.root / key_for(STUDY)).write_bytes(b"")
    with pytest.raises(IngestError, match="cannot write to the spool"):
        spool.store(io.BytesIO(b"x"), SOP_A, STUDY)


def test_empty_or_missing_spool_has_no_studies(tmp_path: Path) -> None:
    assert Spool(tmp_path / "nowhere").pending_studies() == []
    root = tmp_path / "spool"
    root.mkdir()
    (root / "not-a-study").mkdir()
    (root / "node.pid").write_text(str(os.getpid()))
    assert Spool(root).study_keys() == []


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("1.2.3.4.5.6.7.\u00e9", "1.2.3.4.5.6.7.\u00fc"),
        ("1.2.3.\udce9", "1.2.3.\udcfc"),  # undecodable bytes, kept by surrogateescape
    ],
)
def test_uids_that_differ_in_one_non_ascii_character_get_different_keys(
    first: str, second: str
) -> None:
    assert key_for(first) != key_for(second)
