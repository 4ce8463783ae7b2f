"""Limits on stored pixel data, checked before anything is decoded or allocated.

A decoder trusts what it is given: pydicom sizes native pixel data from the DICOM attributes
and takes whatever length the element has, and the JPEG, JPEG-LS and JPEG 2000 decoders size
their output from the codestream's own header.  A file whose header and data disagree can
therefore make a small file decode into gigabytes.  Before a decoder runs, these checks
require:

1. **the header** (:func:`check_header`): one frame, one grayscale sample, Bits Allocated 8,
   16 or 32, each side in [``MIN_SIDE``, ``MAX_SIDE``] and Rows x Columns x Samples per Pixel
   x Number of Frames at most ``max_pixels``;
2. **the data** (:func:`check_pixel_data`): native Pixel Data exactly as long as the header
   says (one padding byte allowed): more is *refused*, never decoded as further frames, and
   less is a truncated image.  Encapsulated Pixel Data must be at most
   ``ENCAPSULATED_SLACK`` times the native size (plus ``ENCAPSULATED_MARGIN``), and its
   codestream header (:mod:`.codestreams`) must declare the DICOM Rows, Columns and Samples
   per Pixel, a precision that fits Bits Allocated, and for RLE the number of segments the
   header implies.  An encapsulated transfer syntax without such a check is refused.

A Pixel Data value that pydicom deferred (``dcmread(..., defer_size=...)``) is checked from the
file, reading only item headers and the first ``CODESTREAM_PREFIX`` bytes, so an oversized
value is refused without being read.  Everything raises :class:`InvalidImageError` with a
reason that names no patient data.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Final

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from .codestreams import (
    CodestreamError,
    CodestreamHeader,
    j2k_header,
    jpeg_header,
    rle_segment_count,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "GRAYSCALE_PHOTOMETRICS",
    "MAX_SIDE",
    "MIN_SIDE",
    "InvalidImageError",
    "check_header",
    "check_pixel_data",
    "check_size",
    "expected_length",
]

MIN_SIDE: Final = 64
MAX_SIDE: Final = 8192
#: Rows x Columns x Samples x Frames above which an image is not decoded (25 Mpx: a 43 cm
#: detector at 86 um; chest radiographs are 3-18 Mpx).
DEFAULT_MAX_PIXELS: Final = 25_000_000
GRAYSCALE_PHOTOMETRICS: Final = ("MONOCHROME1", "MONOCHROME2")
BITS_ALLOCATED: Final = (8, 16, 32)
PIXEL_DATA_TAG: Final = 0x7FE00010
UNDEFINED_LENGTH: Final = 0xFFFFFFFF
#: Compressed data may exceed the native size a little (incompressible noise, headers).
ENCAPSULATED_SLACK: Final = 2
ENCAPSULATED_MARGIN: Final = 1 << 20
#: Bytes of the first frame read to find its codestream header (JPEG tables and APPn
#: segments, e.g. an ICC profile, may come before the frame header).
CODESTREAM_PREFIX: Final = 256 * 1024
#: More items than this in one single-frame Pixel Data is no image, only work for the parser.
MAX_FRAGMENTS: Final = 100_000
_ITEM: Final = 0xFFFEE000
_SEQUENCE_DELIMITER: Final = 0xFFFEE0DD

_J2K: Final = frozenset({JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K})
_JPEG: Final = frozenset(
    {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless,
     JPEGLSNearLossless}
)  # fmt: skip


class InvalidImageError(ValueError):
    """An input cannot be used as a grayscale chest radiograph; the message says why."""


# --------------------------------------------------------------------------------------------
# The header.


def check_size(rows: int, columns: int) -> None:
    """Each side within [``MIN_SIDE``, ``MAX_SIDE``] pixels."""
    for name, side in (("rows", rows), ("columns", columns)):
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise InvalidImageError(
                f"absurd size {rows}x{columns}: {name} must be in [{MIN_SIDE}, {MAX_SIDE}] px"
            )


def check_header(ds: Dataset, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """One grayscale frame of a sane size and sample width, from the attributes alone.

    Raises :class:`InvalidImageError`; ``TypeError``/``ValueError`` for attributes that are
    not numbers.
    """
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise InvalidImageError(f"not a 2-D image: {frames} frames")
    samples = int(ds.get("SamplesPerPixel", 1))
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if samples != 1 or photometric not in GRAYSCALE_PHOTOMETRICS:
        raise InvalidImageError(
            f"not grayscale: Photometric Interpretation {photometric or 'absent'!r}, "
            f"{samples} samples per pixel; expected MONOCHROME1 or MONOCHROME2"
        )
    rows, columns = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    check_size(rows, columns)
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if bits not in BITS_ALLOCATED:
        raise InvalidImageError(f"unsupported Bits Allocated {bits} (expected 8, 16 or 32)")
    pixels = rows * columns * samples * frames
    if pixels > max_pixels:
        raise InvalidImageError(
            f"image too large to decode: {rows}x{columns} is {pixels} pixels, "
            f"more than the limit of {max_pixels}"
        )


def expected_length(ds: Dataset) -> int:
    """Bytes of native Pixel Data the attributes call for (before padding to even length)."""
    rows, columns = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.BitsAllocated)
    return (rows * columns * samples * frames * bits + 7) // 8


# --------------------------------------------------------------------------------------------
# The data.


@dataclass(frozen=True)
class _Value:
    """Where the Pixel Data value lies: its declared length and the bytes really there."""

    declared: int
    available: int
    in_memory: bytes | None
    filename: str | None
    offset: int


def _locate(ds: Dataset) -> _Value:
    element = ds.get_item(PIXEL_DATA_TAG, keep_deferred=True) if PIXEL_DATA_TAG in ds else None
    if element is None:
        other = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        detail = f" ({other[0]} is not supported)" if other else ""
        raise InvalidImageError(f"no pixel data{detail}")
    if isinstance(element, RawDataElement) and element.value is None:
        filename = getattr(ds, "filename", None)
        if not isinstance(filename, str):
            raise InvalidImageError("deferred pixel data without the file it is in")
        size = os.stat(filename).st_size
        available = max(0, size - element.value_tell)
        return _Value(element.length, available, None, filename, element.value_tell)
    value = element.value if isinstance(element, RawDataElement | DataElement) else None
    if not isinstance(value, bytes | bytearray):
        raise InvalidImageError("pixel data is not a byte string")
    data = bytes(value)
    return _Value(len(data), len(data), data, None, 0)


@contextmanager
def _open(value: _Value) -> Iterator[IO[bytes]]:
    if value.in_memory is not None:
        yield io.BytesIO(value.in_memory)
        return
    assert value.filename is not None
    with open(value.filename, "rb") as handle:
        handle.seek(value.offset)
        yield handle


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    return UID(str(syntax)) if syntax else ImplicitVRLittleEndian


def check_pixel_data(ds: Dataset) -> None:
    """The Pixel Data matches the header (see the module docstring); call after
    :func:`check_header`.  Reads at most item headers and a prefix of the first frame."""
    value = _locate(ds)
    expected = expected_length(ds)
    syntax = _transfer_syntax(ds)
    if not syntax.is_encapsulated:
        _check_native(value, expected)
        return
    with _open(value) as stream:
        fragments = _fragments(stream, value, expected)
        prefix = _prefix(stream, fragments)
    _check_codestream(ds, syntax, prefix)


def _check_native(value: _Value, expected: int) -> None:
    if value.declared == UNDEFINED_LENGTH:
        raise InvalidImageError("native pixel data of undefined length")
    if value.declared > expected + 1:
        raise InvalidImageError(
            f"excess pixel data: {value.declared} bytes where the header describes one frame "
            f"of {expected} bytes (refused, not decoded as more frames)"
        )
    if min(value.declared, value.available) < expected:
        raise InvalidImageError(
            f"truncated pixel data: {min(value.declared, value.available)} of the "
            f"{expected} bytes the header describes"
        )


def _read_item(stream: IO[bytes]) -> tuple[int, int] | None:
    header = stream.read(8)
    if len(header) < 8:
        return None
    group, element, length = struct.unpack("<HHL", header)
    return (group << 16 | element), length


def _fragments(stream: IO[bytes], value: _Value, expected: int) -> list[tuple[int, int]]:
    """(position, length) of each fragment after the Basic Offset Table (PS3.5 A.4)."""
    start = stream.tell()
    end = start + value.available
    limit = ENCAPSULATED_SLACK * expected + ENCAPSULATED_MARGIN
    first = _read_item(stream)
    if first is None or first[0] != _ITEM or first[1] == UNDEFINED_LENGTH:
        raise InvalidImageError("encapsulated pixel data does not start with an offset table")
    stream.seek(first[1], io.SEEK_CUR)
    fragments: list[tuple[int, int]] = []
    total = 0
    while True:
        item = _read_item(stream)
        if item is None:
            if value.in_memory is not None:  # pydicom keeps the value without its delimiter
                break
            raise InvalidImageError("truncated encapsulated pixel data (no sequence delimiter)")
        tag, length = item
        if tag == _SEQUENCE_DELIMITER:
            break
        if tag != _ITEM or length == UNDEFINED_LENGTH:
            raise InvalidImageError("malformed encapsulated pixel data (not a fragment item)")
        position = stream.tell()
        if position + length > end:
            raise InvalidImageError("truncated encapsulated pixel data (a fragment is cut short)")
        total += length
        fragments.append((position, length))
        if total > limit:
            raise InvalidImageError(
                f"excess pixel data: more than {limit} bytes of compressed data for an image "
                f"of {expected} bytes"
            )
        if len(fragments) > MAX_FRAGMENTS:
            raise InvalidImageError(f"more than {MAX_FRAGMENTS} pixel data fragments")
        stream.seek(length, io.SEEK_CUR)
    if not fragments or total == 0:
        raise InvalidImageError("encapsulated pixel data without any data")
    return fragments


def _prefix(stream: IO[bytes], fragments: list[tuple[int, int]]) -> bytes:
    """The first ``CODESTREAM_PREFIX`` bytes of the frame (its fragments, concatenated)."""
    parts: list[bytes] = []
    wanted = CODESTREAM_PREFIX
    for position, length in fragments:
        stream.seek(position)
        part = stream.read(min(length, wanted))
        parts.append(part)
        wanted -= len(part)
        if wanted <= 0:
            break
    return b"".join(parts)


def _check_codestream(ds: Dataset, syntax: UID, prefix: bytes) -> None:
    rows, columns = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1))
    bits = int(ds.BitsAllocated)
    try:
        if syntax == RLELossless:
            segments = rle_segment_count(prefix)
            wanted = samples * bits // 8
            if segments != wanted:
                raise InvalidImageError(
                    f"RLE data has {segments} segments; {samples} sample(s) of {bits} bits "
                    f"need {wanted}"
                )
            return
        if syntax in _J2K:
            header = j2k_header(prefix)
        elif syntax in _JPEG:
            header = jpeg_header(prefix)
        else:
            raise InvalidImageError(f"no codestream check for the transfer syntax {syntax.name}")
    except CodestreamError as err:
        raise InvalidImageError(f"unreadable codestream header ({syntax.name}): {err}") from err
    _compare(header, rows, columns, samples, bits)


def _compare(header: CodestreamHeader, rows: int, columns: int, samples: int, bits: int) -> None:
    if (header.rows, header.columns) != (rows, columns):
        raise InvalidImageError(
            f"the {header.kind} codestream is {header.rows}x{header.columns} but Rows and "
            f"Columns say {rows}x{columns} (not decoded)"
        )
    if header.components != samples:
        raise InvalidImageError(
            f"the {header.kind} codestream has {header.components} components but Samples "
            f"per Pixel is {samples} (not decoded)"
        )
    if header.precision > bits:
        raise InvalidImageError(
            f"the {header.kind} codestream has {header.precision}-bit samples but Bits "
            f"Allocated is {bits} (not decoded)"
        )
