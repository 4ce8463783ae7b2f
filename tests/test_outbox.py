"""The outbox: durable layout, keep-the-first-copy, delivery state, dead letters and the CLI."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset

from dicom_node.cli import main
from dicom_node.core import statuses
from dicom_node.core.errors import ConfigError, PermanentDeliveryError, TransientDeliveryError
from dicom_node.core.outbox import Outbox
from dicom_node.core.settings import Destination, Timeouts
from dicom_node.core.spool import Spool, key_for
from tests.support.dicom_tools import dciodvfy
from tests.support.ports import free_port
from tests.support.results import phantom_source, results_for
from tests.support.scp import running_scp
from worker.delivery import Disposition, SendOutcome, send_files
from worker.rounds import deliver, give_up, order_for_sending, settle

STUDY = "a" * 32
INSTANCE = "b" * 32
TIMEOUTS = Timeouts(acse=10, dimse=10, network=10)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    source = phantom_source(tmp_path_factory.mktemp("src") / "source.dcm")
    return results_for(source)


def _destination(name: str = "pacs", port: int = 104) -> Destination:
    return Destination(name=name, ae_title="PACS", host="127.0.0.1", port=port)


class ScriptedSend:
    """A stand-in for send_files that answers per destination, recording what it was given."""

    def __init__(self, answers: dict[str, list[Disposition] | Exception]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, list[str]]] = []

    def __call__(self, destination: Destination, paths: Sequence[Path]) -> list[SendOutcome]:
        self.calls.append((destination.name, [p.stem for p in paths]))
        answer = self.answers[destination.name]
        if isinstance(answer, Exception):
            raise answer
        return [SendOutcome(p, d, None, d.value) for p, d in zip(paths, answer, strict=False)]


def test_layout_is_hashed_and_durable(tmp_path: Path, results: list[Dataset]) -> None:
    outbox = Outbox(tmp_path / "out")
    record = outbox.put(STUDY, INSTANCE, results, outcome="prediction", received=1.0)
    keys = [key_for(str(ds.SOPInstanceUID)) for ds in results]
    assert list(record.results) == keys
    names = sorted(p.relative_to(outbox.root).as_posix() for p in outbox.root.rglob("*"))
    assert names == sorted(
        ["results", "sources", f"sources/{STUDY}", f"sources/{STUDY}/{INSTANCE}.json"]
        + [f"results/{k}.{ext}" for k in keys for ext in ("dcm", "json")]
    )
    for ds in results:  # no UID in any file name
        assert not any(str(ds.SOPInstanceUID) in n for n in names)
    for key, ds in zip(keys, results, strict=True):
        stored = pydicom.dcmread(outbox.result_path(key))
        assert stored.SOPInstanceUID == ds.SOPInstanceUID
        assert outbox.result(key) is not None
    assert outbox.source(STUDY, INSTANCE) == record
    assert [r.kind for r in outbox.results()] == ["sc", "sr"]


def test_stored_results_pass_dciodvfy(tmp_path: Path, results: list[Dataset]) -> None:
    outbox = Outbox(tmp_path / "out")
    record = outbox.put(STUDY, INSTANCE, results, outcome="prediction")
    for key in record.results:
        report = dciodvfy(outbox.result_path(key))
        assert not report.errors, report


def test_first_copy_wins(tmp_path: Path, results: list[Dataset]) -> None:
    outbox = Outbox(tmp_path / "out")
    outbox.put(STUDY, INSTANCE, results, outcome="prediction")
    key = key_for(str(results[-1].SOPInstanceUID))
    before = outbox.result_path(key).read_bytes()
    changed = [ds.copy() for ds in results]
    changed[-1].SeriesDescription = "changed"
    outbox.put(STUDY, INSTANCE, changed, outcome="prediction")
    assert outbox.result_path(key).read_bytes() == before
    assert not list(outbox.root.rglob("*.tmp"))


@pytest.mark.parametrize(
    ("answers", "states", "waiting"),
    [
        ({"a": [Disposition.DELIVERED] * 2}, {"a": ["delivered", "delivered"]}, []),
        (
            {"a": [Disposition.DELIVERED, Disposition.PERMANENT]},
            {"a": ["delivered", "dead"]},
            [],
        ),
        (
            {"a": [Disposition.TRANSIENT, Disposition.DELIVERED]},
            {"a": ["pending", "delivered"]},
            ["a"],
        ),
        ({"a": TransientDeliveryError("refused")}, {"a": ["pending", "pending"]}, ["a"]),
        ({"a": PermanentDeliveryError("rejected")}, {"a": ["dead", "dead"]}, []),
        (
            {"a": [Disposition.DELIVERED] * 2, "b": TransientDeliveryError("down")},
            {"a": ["delivered", "delivered"], "b": ["pending", "pending"]},
            ["b"],
        ),
    ],
)
def test_delivery_round_records_state_per_destination(
    tmp_path: Path,
    results: list[Dataset],
    answers: dict[str, list[Disposition] | Exception],
    states: dict[str, list[str]],
    waiting: list[str],
) -> None:
    outbox = Outbox(tmp_path / "out")
    record = outbox.put(STUDY, INSTANCE, results, outcome="prediction")
    destinations = [_destination(name) for name in answers]
    send = ScriptedSend(answers)
    round_ = deliver(outbox, destinations, record.results, send)
    for name, expected in states.items():
        assert [outbox.state(k, name) for k in record.results] == expected
    assert sorted(round_.waiting) == waiting
    assert outbox.is_settled(record, destinations) is (not waiting)
    # Idempotent: a second round sends only what is still pending.
    again = ScriptedSend({name: [Disposition.DELIVERED] * 2 for name in answers})
    deliver(outbox, destinations, record.results, again)
    for name, expected in states.items():
        sent = [keys for dest, keys in again.calls if dest == name]
        pending = [k for k, s in zip(record.results, expected, strict=True) if s == "pending"]
        assert sent == ([pending] if pending else [])


def test_sc_is_sent_before_the_sr(tmp_path: Path, results: list[Dataset]) -> None:
    outbox = Outbox(tmp_path / "out")
    record = outbox.put(STUDY, INSTANCE, list(reversed(results)), outcome="prediction")
    kinds = [outbox.result(k).kind for k in order_for_sending(outbox, record.results)]  # type: ignore[union-attr]
    assert kinds == ["sc", "sr"]


def test_give_up_dead_letters_what_waits_and_settles(
    tmp_path: Path, results: list[Dataset]
) -> None:
    spool = Spool(tmp_path / "spool")
    source = tmp_path / "source.dcm"
    ds = phantom_source(source)
    stored = spool.store(source, str(ds.SOPInstanceUID), str(ds.StudyInstanceUID))
    outbox = Outbox(tmp_path / "out")
    record = outbox.put(stored.study_key, stored.instance_key, results, outcome="prediction")
    destinations = [_destination()]
    round_ = deliver(
        outbox, destinations, record.results, ScriptedSend({"pacs": TransientDeliveryError("x")})
    )
    assert settle(outbox, spool, destinations, [record]) == []
    assert spool.pending_instances(stored.study_key) == [stored.instance_key]
    assert give_up(outbox, round_, "tried enough") == 2
    assert [d.reason for d in outbox.dead_letters("pacs")] == ["tried enough; last error: x"] * 2
    assert settle(outbox, spool, destinations, [record]) == [stored.instance_key]
    assert spool.pending_instances(stored.study_key) == []


@pytest.mark.parametrize("name", [".", ".."])
def test_destination_names_cannot_escape_the_outbox(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="cannot name"):
        Outbox(tmp_path).state(INSTANCE, name)


def test_leftover_temporary_files_are_removed(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "out")
    leftover = outbox.root / "results" / ".abc.dcm.123.tmp"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"partial")
    assert outbox.remove_temporary() == 1
    assert not leftover.exists()


# --------------------------------------------------------------------------- the CLI


def _config(tmp_path: Path, destinations: list[dict[str, object]]) -> Path:
    data = {
        "node": {"ae_title": "CORONET", "port": free_port()},
        "destinations": destinations,
        "storage": {"spool_dir": str(tmp_path / "spool"), "outbox_dir": str(tmp_path / "out")},
    }
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.mark.integration
def test_list_and_retry_commands(
    tmp_path: Path, results: list[Dataset], capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused for good, then fixed on the PACS side: `outbox retry` delivers; exit codes."""
    spool = Spool(tmp_path / "spool")
    source = tmp_path / "source.dcm"
    ds = phantom_source(source)
    stored = spool.store(source, str(ds.SOPInstanceUID), str(ds.StudyInstanceUID))
    outbox = Outbox(tmp_path / "out")
    record = outbox.put(stored.study_key, stored.instance_key, results, outcome="prediction")
    with running_scp(statuses=[statuses.CANNOT_UNDERSTAND, statuses.SUCCESS]) as scp:
        config = _config(tmp_path, [scp.destination()])
        destination = _destination(port=scp.port)

        def send(dest: Destination, paths: Sequence[Path]) -> list[SendOutcome]:
            return send_files(dest, paths, calling_ae="CORONET", timeouts=TIMEOUTS)

        deliver(outbox, [destination], record.results, send)
        assert [outbox.state(k, "pacs") for k in record.results] == ["dead", "delivered"]
        assert settle(outbox, spool, [destination], [record]) == [stored.instance_key]

        assert main(["outbox", "list", "--config", str(config)]) == 0
        listing = capsys.readouterr().out
        assert "pacs: 1 delivered, 0 pending, 1 dead-lettered" in listing
        assert "0xC000 (Error: Cannot understand)" in listing
        assert str(ds.SOPInstanceUID) not in listing and str(ds.PatientID) not in listing

        assert main(["outbox", "list", "--config", str(config), "--state", "pending"]) == 0
        assert "0 results" in capsys.readouterr().out

        assert main(["outbox", "retry", "--config", str(config)]) == 0
        report = capsys.readouterr().out
        assert "pacs: 1 delivered, 0 refused, 0 waiting" in report
        assert [outbox.state(k, "pacs") for k in record.results] == ["delivered", "delivered"]
        assert len(scp.stored()) == 2  # the SR was not sent a second time
        assert main(["outbox", "retry", "--config", str(config)]) == 0
        assert "nothing to send" in capsys.readouterr().out
    # A destination that is down: the results are pending there; retry reports and fails.
    down = {"name": "down", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}
    config = _config(tmp_path, [down])
    assert main(["outbox", "retry", "--config", str(config), "--dead-only"]) == 0
    assert "nothing to send" in capsys.readouterr().out
    assert main(["outbox", "retry", "--config", str(config)]) == 1
    assert "down: 0 delivered, 0 refused, 2 waiting (no association" in capsys.readouterr().out
    assert main(["outbox", "list", "--config", str(config), "--state", "pending"]) == 0
    assert "down: 0 delivered, 2 pending, 0 dead-lettered" in capsys.readouterr().out


def test_records_are_json_with_a_format_version(tmp_path: Path, results: list[Dataset]) -> None:
    outbox = Outbox(tmp_path / "out")
    record = outbox.put(STUDY, INSTANCE, results, outcome="prediction", timings={"a": 1.5})
    meta = json.loads((outbox.root / "results" / f"{record.results[0]}.json").read_text())
    assert meta["format"] == 1 and meta["kind"] == "sc" and meta["study_key"] == STUDY
    source = json.loads((outbox.root / "sources" / STUDY / f"{INSTANCE}.json").read_text())
    assert source["results"] == list(record.results) and source["timings"] == {"a": 1.5}
