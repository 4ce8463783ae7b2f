"""The node's header reader on malformed file meta information: inputs the fuzzer found."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from dicom_node.scp.header import HeaderLimits, UndecodableError, read_header
from tests.support.attacks import write_part10
from tests.support.dicom_data import CR_IMAGE_STORAGE

#: P-DATA-TF variable fields the fuzzer (tests/hostile/test_fuzz.py) turned up, base64.
FOUND_BY_THE_FUZZER = {
    # A file meta element (0002,0010) with the unknown VR "O\0": pydicom raised
    # NotImplementedError when the transfer syntax was first read, outside the reader's checks.
    "unknown VR in the file meta": "AAAAEhYAAgAAAAAAAAACABAATwAAAA==",
}


def _meta() -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(CR_IMAGE_STORAGE)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid()
    return meta


@pytest.mark.parametrize("encoded", FOUND_BY_THE_FUZZER.values(), ids=FOUND_BY_THE_FUZZER.keys())
@pytest.mark.filterwarnings("ignore:Expected implicit VR:UserWarning")  # pydicom, on the bad bytes
def test_a_malformed_file_meta_is_undecodable_not_a_crash(encoded: str, tmp_path: Path) -> None:
    fragment = base64.b64decode(encoded)[6:]  # PDV length (4), context ID, control header
    path = write_part10(tmp_path / "received.dcm", _meta(), fragment)
    with pytest.raises(UndecodableError, match="file meta"):
        read_header(path, HeaderLimits(max_element=1 << 20, max_inflated=1 << 26), tmp_path)
