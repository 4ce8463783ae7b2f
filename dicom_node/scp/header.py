"""The header of a received data set, read within limits (everything before Pixel Data).

pydicom reads every element before Pixel Data into memory, and inflates a Deflated Explicit VR
Little Endian data set (PS3.5 A.5) in one piece.  A peer could make either cost gigabytes, so:

* elements longer than ``node.limits.max_element_bytes`` are refused without being read
  (pydicom defers them; only their length is looked at);
* a deflated data set is inflated in chunks into a scratch file next to the spool, counting
  the bytes, and refused beyond ``node.limits.max_inflated_bytes``; its header is then read
  from that file.  The spool keeps the data set as received, deflated.

:class:`UndecodableError` means the data set cannot be parsed (answered 0xC210),
:class:`TooLargeError` that it breaks a limit (answered 0xA700).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from dicom_node.core.settings import NodeLimits

logger = logging.getLogger(__name__)

_PREAMBLE_AND_PREFIX: Final = 132  # PS3.10 7.1: 128-byte preamble, "DICM"
_GROUP_LENGTH_ELEMENT: Final = 12  # (0002,0000) UL, Explicit VR: tag, VR, length, value
_CHUNK: Final = 1 << 20
_UNDEFINED_LENGTH: Final = 0xFFFFFFFF


class UndecodableError(ValueError):
    """The received data set cannot be parsed."""


class TooLargeError(ValueError):
    """The received data set breaks a size limit of ``node.limits``."""


@dataclass(frozen=True)
class HeaderLimits:
    """The limits of :func:`read_header`, from ``node.limits``."""

    max_element: int
    max_inflated: int

    @classmethod
    def from_settings(cls, limits: NodeLimits) -> HeaderLimits:
        return cls(limits.max_element_bytes, limits.max_inflated_bytes)


def read_header(path: Path, limits: HeaderLimits, scratch: Path) -> Dataset:
    """The header of the received file at ``path`` (DICOM File Format as pynetdicom wrote it).

    ``scratch`` is a folder for the inflated copy of a deflated data set.  Raises
    :class:`UndecodableError`, :class:`TooLargeError`, or ``OSError`` for our own I/O.
    """
    meta = _file_meta(path)
    if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        with _inflated(path, meta, limits.max_inflated, scratch) as plain:
            return _parse(plain, limits.max_element)
    return _parse(path, limits.max_element)


def _file_meta(path: Path) -> FileMetaDataset:
    """The file meta information, every element decoded here: pydicom decodes an element when
    it is first read, so a malformed one (an unknown VR, found by the fuzzer) would raise
    later, outside this check."""
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
        for tag in list(meta.keys()):
            meta[tag]  # decodes the raw element in place
        return meta
    except OSError:
        raise
    except Exception as err:  # pydicom raises many types on malformed input
        logger.debug("undecodable file meta: %s", err)  # may quote values: DEBUG only
        raise UndecodableError(f"{type(err).__name__} in the file meta information") from err


def _parse(path: Path, max_element: int) -> Dataset:
    with path.open("rb") as handle:  # OSError here is ours, not the peer's
        size = path.stat().st_size
        try:
            dataset = pydicom.dcmread(handle, stop_before_pixels=True, defer_size=max_element)
            _check_elements(dataset, max_element, size)
        except (UndecodableError, TooLargeError):
            raise
        except Exception as err:  # pydicom raises many types on malformed input
            # pydicom's message may quote element values (PHI): keep it at DEBUG only.
            logger.debug("undecodable data set: %s", err)
            raise UndecodableError(f"{type(err).__name__} while parsing") from err
    if "SOPClassUID" not in dataset and "SOPInstanceUID" not in dataset:
        raise UndecodableError("no SOP Class UID and no SOP Instance UID")
    return dataset


def _check_elements(dataset: Dataset, max_element: int, file_size: int) -> None:
    """Refuse elements over ``max_element`` (never read: pydicom deferred them) and truncated
    ones; decode the others, in sequences too."""
    for tag in list(dataset.keys()):
        raw = dataset.get_item(tag, keep_deferred=True)
        if isinstance(raw, RawDataElement) and raw.length != _UNDEFINED_LENGTH:
            if raw.length > max_element:
                raise TooLargeError(
                    f"element {tag} has {raw.length} bytes, more than "
                    f"node.limits.max_element_bytes ({max_element})"
                )
            if raw.value is not None and len(raw.value) != raw.length:
                raise UndecodableError(f"element {tag} is truncated")
            if raw.value is None and raw.value_tell + raw.length > file_size:
                raise UndecodableError(f"element {tag} runs past the end of the data")
        element = dataset[tag]
        if element.VR == "SQ":
            for item in element.value:
                _check_elements(item, max_element, file_size)


@contextlib.contextmanager
def _inflated(path: Path, meta: FileMetaDataset, cap: int, scratch: Path) -> Iterator[Path]:
    """A scratch copy of the deflated file at ``path`` in Explicit VR Little Endian."""
    length = meta.get("FileMetaInformationGroupLength")
    if not isinstance(length, int):
        raise UndecodableError("no File Meta Information Group Length")
    plain_meta = FileMetaDataset(meta)
    plain_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=scratch, suffix=".inflated", delete=True) as out:
        out.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(out, plain_meta)  # type: ignore[arg-type]
        with path.open("rb") as source:
            source.seek(_PREAMBLE_AND_PREFIX + _GROUP_LENGTH_ELEMENT + length)
            _inflate(source, out, cap)
        out.flush()
        yield Path(out.name)


def _inflate(source: IO[bytes], out: IO[bytes], cap: int) -> None:
    """Raw DEFLATE (RFC 1951, PS3.5 A.5) from ``source`` to ``out``, at most ``cap`` bytes."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    written = 0
    try:
        while chunk := source.read(_CHUNK):
            data = inflater.decompress(chunk, _CHUNK)
            while True:
                written += len(data)
                if written > cap:
                    raise TooLargeError(
                        f"the deflated data set inflates beyond "
                        f"node.limits.max_inflated_bytes ({cap})"
                    )
                out.write(data)
                if not inflater.unconsumed_tail:
                    break
                data = inflater.decompress(inflater.unconsumed_tail, _CHUNK)
        rest = inflater.flush()
        if written + len(rest) > cap:
            raise TooLargeError(
                f"the deflated data set inflates beyond node.limits.max_inflated_bytes ({cap})"
            )
        out.write(rest)
    except zlib.error as err:
        raise UndecodableError(f"the deflated data set cannot be inflated: {err}") from err
