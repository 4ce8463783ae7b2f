"""The data set path under a coverage-guided fuzzer (atheris), for a bounded time.

The seed corpus is made of the hostile cases of this suite: a valid header, truncated and
unterminated elements, an oversized element, a deflated data set, non-conformant UIDs and
garbage, each as the P-DATA value items a sender would put on the wire.  Every input must end
with the connection closed or a named DIMSE status (``tests/hostile/fuzz_dataset.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pydicom
import pytest
from pydicom import config
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID

from dicom_node.core import statuses
from tests.hostile.fuzz_dataset import SOP_INSTANCE, outcome
from tests.support.dicom_data import RG1_UNCR
from tests.support.processes import ChildProcess

pytestmark = pytest.mark.integration

FUZZ_SECONDS = 60


def _pdv(value: bytes, *, command: bool = False, last: bool = True) -> bytes:
    """One presentation data value item (PS3.8 9.3.5.1, E.2), context 1."""
    control = (0x01 if command else 0x00) | (0x02 if last else 0x00)
    return (len(value) + 2).to_bytes(4, "big") + bytes([1, control]) + value


def _encoded(dataset: pydicom.Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, dataset)
    return buffer.getvalue()


def _rg1_header(**changes: object) -> pydicom.Dataset:
    ds = pydicom.dcmread(RG1_UNCR, stop_before_pixels=True)
    ds.SOPInstanceUID = SOP_INSTANCE
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


def seeds() -> dict[str, bytes]:
    header = _encoded(_rg1_header())
    with config.disable_value_validation():
        bad_study = _encoded(_rg1_header(StudyInstanceUID=UID("1.2.3.\u00e9")))
    return {
        "valid-header": _pdv(header),
        "valid-header-in-two-fragments": _pdv(header[:100], last=False) + _pdv(header[100:]),
        "truncated-element": _pdv(b"\x08\x00\x16\x00UI\xc8\x001.2.840\0"),
        "unterminated-sequence": _pdv(b"\x08\x00\x40\x11SQ\0\0\xff\xff\xff\xff" + b"\0" * 40),
        "oversized-element": _pdv(header + b"\x09\x00\x10\x10OB\0\0\x00\x00\x20\x00"),
        "non-conformant-study-uid": _pdv(bad_study),
        "garbage": _pdv(b"\xff" * 512),
        "command-only": _pdv(b"\0" * 16, command=True),
        "pdv-longer-than-pdu": (1 << 20).to_bytes(4, "big") + b"\x01\x02" + header[:64],
        "empty": b"",
    }


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("valid-header", statuses.SUCCESS),
        ("valid-header-in-two-fragments", statuses.SUCCESS),
        ("truncated-element", statuses.DATA_UNDECODABLE),
        ("unterminated-sequence", statuses.DATA_UNDECODABLE),
        ("oversized-element", statuses.OUT_OF_RESOURCES),
        ("non-conformant-study-uid", statuses.UID_NOT_CONFORMANT),
        ("garbage", statuses.DATA_UNDECODABLE),
        ("pdv-longer-than-pdu", "closed"),
    ],
)
@pytest.mark.filterwarnings("ignore")
def test_each_seed_ends_with_the_answer_its_case_deserves(name: str, expected: int | str) -> None:
    assert outcome(seeds()[name]) == expected


def test_the_fuzzer_finds_no_input_without_a_named_answer(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, data in seeds().items():
        (corpus / name).write_bytes(data)
    argv = [
        sys.executable,
        "-m",
        "tests.hostile.fuzz_dataset",
        str(corpus),
        f"-max_total_time={FUZZ_SECONDS}",
        "-timeout=20",
        "-rss_limit_mb=2048",
        f"-artifact_prefix={tmp_path}/",
    ]
    with ChildProcess(argv) as fuzzer:
        code = fuzzer.wait(FUZZ_SECONDS + 120)
        output = fuzzer.text()
    assert code == 0, output[-4000:]
    assert "Done" in output and "runs in" in output, output[-4000:]
    assert not list(tmp_path.glob("crash-*")), output[-4000:]
