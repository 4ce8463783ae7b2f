"""Hostile instances for the worker, and sending files to the node exactly as they are.

Each builder writes a copy of RG1 (pydicom-data's real chest CR, 1955 x 1841, 16 bits) with
fresh UIDs (or the given ``study_uid``) to ``target`` and returns the path.  None decodes the
pixel data it writes, so even the bombs cost only their size on disk:

* :func:`j2k_siz_bomb`: RG1 in JPEG 2000 Lossless whose SIZ header says ``side x side`` while
  Rows and Columns say 1024;
* :func:`excess_pixel_data`: RG1's header with ``total`` bytes of native Pixel Data (a sparse
  file: the excess reads as zeros);
* :func:`truncated_pixel_data`: RG1 cut ``keep`` bytes into its Pixel Data;
* :func:`encoded`: RG1 in another transfer syntax (RLE, JPEG-LS, JPEG 2000), valid unless
  header changes contradict the codestream;
* :func:`j2k_corrupt`: RG1 in JPEG 2000 with a valid main header and a body of noise;
* :func:`with_raw_value`: RG1 with one element's value replaced by raw bytes, valid or not
  (e.g. a multi-valued Patient's Name, an Integer String that is no number);
* :func:`without`: RG1 without some attributes (e.g. the Series Instance UID).

:func:`send_as_is` C-STOREs files with pynetdicom's chunked sending: the data set goes over the
network byte for byte as it is in the file, never decoded, so malformed files arrive malformed.
"""

from __future__ import annotations

import contextlib
import random
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.tag import Tag
from pydicom.uid import UID, JPEG2000Lossless
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config

from tests.support.dicom_data import RG1_J2KR, RG1_UNCR, make_instance
from tests.support.settings import NODE_AET

BOMB_SIDE: Final = 25_000
EXCESS_BYTES: Final = 800 * 1024 * 1024
TRUNCATED_KEEP: Final = 7_000_000
#: Bytes of RG1's JPEG 2000 codestream kept by :func:`j2k_corrupt`: the main header and the
#: tile-part header, up to and including its start of data (SOD).
J2K_KEPT_HEADER: Final = 110
PIXEL_DATA: Final = Tag(0x7FE0, 0x0010)
TRAILING_PADDING: Final = Tag(0xFFFC, 0xFFFC)
#: SIZ field offsets in a codestream that starts SOC, SIZ (ISO/IEC 15444-1 A.5.1).
_XSIZ, _YSIZ, _XTSIZ, _YTSIZ = 8, 12, 24, 28


def _copy(source: Path, target: Path, study_uid: str | None, **attributes: Any) -> Dataset:
    ds = make_instance(source, target, study_uid=study_uid, **attributes)
    if TRAILING_PADDING in ds:
        del ds[TRAILING_PADDING]
    return ds


def j2k_siz_bomb(
    target: Path, *, side: int = BOMB_SIDE, rows: int = 1024, study_uid: str | None = None
) -> Path:
    """RG1's JPEG 2000 codestream with SIZ (image and tile size) set to ``side x side``."""
    ds = _copy(RG1_J2KR, target, study_uid)
    (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
    codestream = bytearray(frame)
    for offset in (_XSIZ, _YSIZ, _XTSIZ, _YTSIZ):
        struct.pack_into(">I", codestream, offset, side)
    ds.PixelData = encapsulate([bytes(codestream)])
    ds.Rows = ds.Columns = rows
    ds.save_as(target, enforce_file_format=True)
    return target


def excess_pixel_data(
    target: Path, *, total: int = EXCESS_BYTES, study_uid: str | None = None
) -> Path:
    """RG1's header and pixels, then zeros up to ``total`` bytes of Pixel Data."""
    ds = _copy(RG1_UNCR, target, study_uid)
    pixels = bytes(ds.PixelData)
    del ds.PixelData
    ds.save_as(target, enforce_file_format=True)
    total += total % 2
    with target.open("r+b") as handle:
        handle.seek(0, 2)
        handle.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, total))
        handle.write(pixels)
        handle.truncate(handle.tell() + total - len(pixels))  # sparse: no disk for the zeros
    return target


def truncated_pixel_data(
    target: Path, *, keep: int = TRUNCATED_KEEP, study_uid: str | None = None
) -> Path:
    """RG1 whose file ends ``keep`` bytes into its Pixel Data value (7.0 of 7.2 MB)."""
    ds = _copy(RG1_UNCR, target, study_uid)
    ds.save_as(target, enforce_file_format=True)
    value_start = target.stat().st_size - len(ds.PixelData)
    with target.open("r+b") as handle:
        handle.truncate(value_start + keep)
    return target


def encoded(target: Path, syntax: UID, *, study_uid: str | None = None, **attributes: Any) -> Path:
    """RG1 compressed in ``syntax`` (pydicom's encoders: RLE, JPEG-LS; pydicom-data's JPEG
    2000), then the header ``attributes`` changed (which may contradict the codestream)."""
    if syntax == JPEG2000Lossless:
        ds = _copy(RG1_J2KR, target, study_uid)
    else:
        ds = _copy(RG1_UNCR, target, study_uid)
        ds.compress(syntax)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.save_as(target, enforce_file_format=True)
    return target


def j2k_corrupt(target: Path, *, study_uid: str | None = None) -> Path:
    """RG1's JPEG 2000 codestream with a true main header and a body of noise: only a
    decoder can find out."""
    ds = _copy(RG1_J2KR, target, study_uid)
    (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
    noise = random.Random(13).randbytes(len(frame) - J2K_KEPT_HEADER)
    ds.PixelData = encapsulate([frame[:J2K_KEPT_HEADER] + noise])
    ds.save_as(target, enforce_file_format=True)
    return target


def with_raw_value(target: Path, keyword: str, raw: bytes, *, study_uid: str | None = None) -> Path:
    """RG1 with ``keyword``'s value replaced by ``raw`` bytes, written unchecked."""
    ds = _copy(RG1_UNCR, target, study_uid)
    number = tag_for_keyword(keyword)
    assert number is not None, f"no DICOM keyword {keyword}"
    tag = Tag(number)
    if len(raw) % 2:
        raw += b"\0" if dictionary_VR(tag) == "UI" else b" "
    ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(raw), raw, 0, False, True)
    with pydicom.config.disable_value_validation():
        if keyword == "SOPInstanceUID":
            ds.file_meta.MediaStorageSOPInstanceUID = UID(raw.rstrip(b"\0 ").decode("ascii"))
        ds.save_as(target, enforce_file_format=True)
    return target


def without(target: Path, *keywords: str, study_uid: str | None = None) -> Path:
    """RG1 without ``keywords``."""
    _copy(RG1_UNCR, target, study_uid, **dict.fromkeys(keywords))
    return target


# --------------------------------------------------------------------------- sending


@contextlib.contextmanager
def _chunked_sending() -> Iterator[None]:
    previous = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = previous


def send_as_is(
    paths: Sequence[Path], port: int, *, calling: str = "STORESCU", called: str = NODE_AET
) -> dict[Path, int | None]:
    """C-STORE each file as it is, one association; the status of each (None: no answer)."""
    metas = {path: pydicom.filereader.read_file_meta_info(path) for path in paths}
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    contexts = sorted(
        {(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas.values()}
    )
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, [syntax])
    statuses: dict[Path, int | None] = {}
    with _chunked_sending():
        assoc = ae.associate("127.0.0.1", port, ae_title=called)
        assert assoc.is_established, "the node refused the association"
        try:
            for path in paths:
                response = assoc.send_c_store(path)
                statuses[path] = int(response.Status) if "Status" in response else None
        finally:
            assoc.release()
    return statuses
