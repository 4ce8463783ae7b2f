"""What a compressed frame says about itself, read from its first bytes without decoding it.

A decoder sizes its output from the codestream's own header, not from the DICOM Rows and
Columns, so these headers are what must be checked before a decoder is allowed to run:

* JPEG 2000 (ISO/IEC 15444-1 A.5.1): the SIZ marker segment that follows SOC, in a raw
  codestream or in the ``jp2c`` box of a JP2 file (Annex I);
* JPEG (ISO/IEC 10918-1 B.2.2) and JPEG-LS (ISO/IEC 14495-1 C.2.2): the first frame header,
  SOF0-SOF15 or SOF55, after any tables and application segments;
* RLE Lossless (PS3.5 G.3.1): the 64-byte header with the number of segments.

Every function takes the first bytes of the frame (a prefix is enough) and raises
:class:`CodestreamError` when they are not the header they should be.
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass
from typing import Final

__all__ = [
    "CodestreamError",
    "CodestreamHeader",
    "j2k_header",
    "jpeg_header",
    "rle_segment_count",
]

#: JPEG 2000 markers (ISO/IEC 15444-1 A.2).
J2K_SOC: Final = b"\xff\x4f"
J2K_SIZ: Final = b"\xff\x51"
#: The JP2 signature box (ISO/IEC 15444-1 I.5.1) and the contiguous codestream box type.
JP2_SIGNATURE: Final = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
JP2_CODESTREAM_BOX: Final = b"jp2c"
#: JPEG markers (ISO/IEC 10918-1 B.1.1.3, Table B.1; ISO/IEC 14495-1 Table C.1).
JPEG_SOI: Final = 0xD8
JPEG_EOI: Final = 0xD9
JPEG_SOS: Final = 0xDA
JPEG_LS_SOF55: Final = 0xF7
#: Start-of-frame markers: SOF0-SOF15 except DHT (C4), JPG (C8) and DAC (CC), and SOF55.
JPEG_SOF_MARKERS: Final = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {JPEG_LS_SOF55}
#: Markers without a length field: TEM, RST0-RST7, SOI, EOI.
JPEG_STANDALONE: Final = frozenset({0x01, *range(0xD0, 0xD8), JPEG_SOI, JPEG_EOI})
#: RLE Lossless header (PS3.5 G.5): 16 little-endian unsigned longs, at most 15 segments.
RLE_HEADER_LENGTH: Final = 64
RLE_MAX_SEGMENTS: Final = 15


class CodestreamError(ValueError):
    """The bytes are not the codestream header they should be; the message says why."""


@dataclass(frozen=True)
class CodestreamHeader:
    """Image size and sample format that a codestream declares for itself."""

    kind: str
    rows: int
    columns: int
    components: int
    precision: int  # bits per sample, the largest of the components


def _unpack(fmt: str, data: bytes, offset: int, what: str) -> tuple[int, ...]:
    try:
        return struct.unpack_from(fmt, data, offset)
    except struct.error:
        raise CodestreamError(f"{what} is cut short") from None


def _jp2_codestream(data: bytes) -> bytes:
    """The contents of the first ``jp2c`` box of a JP2 file (ISO/IEC 15444-1 I.4)."""
    offset = 0
    while offset + 8 <= len(data):
        length, box_type = _unpack(">I4s", data, offset, "a JP2 box header")
        header = 8
        if length == 1:  # the real length follows as 8 bytes (XLBox)
            (length,) = _unpack(">Q", data, offset + 8, "a JP2 box header")
            header = 16
        if box_type == JP2_CODESTREAM_BOX:
            return data[offset + header :]
        if length == 0 or length < header:  # "to the end of the file", or malformed
            break
        offset += length
    raise CodestreamError("JP2 file without a codestream box in its first bytes")


def j2k_header(data: bytes) -> CodestreamHeader:
    """The image size of a JPEG 2000 codestream, from its SIZ marker segment (A.5.1).

    The image area is ``Xsiz - XOsiz`` by ``Ysiz - YOsiz``; a JP2 file is unwrapped first.
    """
    if data.startswith(JP2_SIGNATURE):
        data = _jp2_codestream(data)
    if not data.startswith(J2K_SOC):
        raise CodestreamError("no JPEG 2000 start of codestream (SOC)")
    if data[2:4] != J2K_SIZ:
        raise CodestreamError("no SIZ marker segment after SOC")
    fields = _unpack(">HHIIIIIIIIH", data, 4, "the SIZ marker segment")
    _length, _rsiz, xsiz, ysiz, x_origin, y_origin = fields[:6]
    components = fields[10]
    if xsiz <= x_origin or ysiz <= y_origin:
        raise CodestreamError(f"empty image area in SIZ ({xsiz}-{x_origin} x {ysiz}-{y_origin})")
    if not 1 <= components <= 16384:
        raise CodestreamError(f"{components} components in SIZ")
    precision = 0
    for index in range(components):
        ssiz, x_step, y_step = _unpack(">BBB", data, 42 + 3 * index, "the SIZ components")
        if x_step != 1 or y_step != 1:
            raise CodestreamError(f"component {index} is subsampled ({x_step}x{y_step})")
        precision = max(precision, (ssiz & 0x7F) + 1)
    return CodestreamHeader("JPEG 2000", ysiz - y_origin, xsiz - x_origin, components, precision)


def jpeg_header(data: bytes) -> CodestreamHeader:
    """The first frame header (SOFn or SOF55) of a JPEG or JPEG-LS codestream."""
    if data[:2] != bytes((0xFF, JPEG_SOI)):
        raise CodestreamError("no JPEG start of image (SOI)")
    offset = 2
    while True:
        if offset >= len(data):
            raise CodestreamError("the JPEG header is cut short before its frame header")
        if data[offset] != 0xFF:
            raise CodestreamError(f"no JPEG marker at byte {offset} before the frame header")
        while offset < len(data) and data[offset] == 0xFF:  # fill bytes (B.1.1.2)
            offset += 1
        if offset >= len(data):
            raise CodestreamError("the JPEG header is cut short")
        marker = data[offset]
        offset += 1
        if marker in JPEG_STANDALONE:
            if marker == JPEG_EOI:
                raise CodestreamError("end of image before any frame header")
            continue
        if marker == JPEG_SOS:
            raise CodestreamError("a scan starts before any frame header")
        (length,) = _unpack(">H", data, offset, "a JPEG marker segment")
        if marker in JPEG_SOF_MARKERS:
            precision, rows, columns, components = _unpack(
                ">BHHB", data, offset + 2, "the frame header"
            )
            kind = "JPEG-LS" if marker == JPEG_LS_SOF55 else "JPEG"
            if rows == 0:
                raise CodestreamError(f"{kind} frame header leaves the height to a DNL marker")
            if columns == 0 or components == 0:
                raise CodestreamError(f"{kind} frame header declares an empty image")
            return CodestreamHeader(kind, rows, columns, components, precision)
        if length < 2:
            raise CodestreamError(f"JPEG marker segment of length {length}")
        offset += length


def rle_segment_count(data: bytes) -> int:
    """The number of segments an RLE Lossless frame declares, checked against its offsets."""
    if len(data) < RLE_HEADER_LENGTH:
        raise CodestreamError("the RLE header is cut short")
    count, *offsets = struct.unpack_from("<16L", data)
    if not 1 <= count <= RLE_MAX_SEGMENTS:
        raise CodestreamError(f"RLE header declares {count} segments (1 to 15 allowed)")
    used = offsets[:count]
    if used[0] != RLE_HEADER_LENGTH or any(b <= a for a, b in itertools.pairwise(used)):
        raise CodestreamError("RLE segment offsets do not follow the header in order")
    return int(count)
