"""The first wall: the bundle checks the header and the pixel data against each other, and the
codestream's own header, before anything is decoded or allocated."""

from __future__ import annotations

import io
import resource
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from monai_bundle.scripts.codestreams import (
    JP2_SIGNATURE,
    CodestreamError,
    j2k_header,
    jpeg_header,
    rle_segment_count,
)
from monai_bundle.scripts.dicom_image import DEFER_SIZE, decode_stored, load_dicom_image
from monai_bundle.scripts.pixel_guard import (
    PIXEL_DATA_TAG,
    InvalidImageError,
    check_header,
    check_pixel_data,
)
from tests.support.dicom_data import RG1_J2KR, RG1_UNCR
from tests.support.hostile import (
    encoded,
    excess_pixel_data,
    j2k_siz_bomb,
    truncated_pixel_data,
)

RG1_SHAPE = (1955, 1841)
RG1_BYTES = 1955 * 1841 * 2
_KIB = 1024


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / _KIB


@pytest.fixture(scope="module", name="rg1_encodings")
def rg1_encodings_fixture(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """RG1 in the four lossless encodings the benchmarks use."""
    folder = tmp_path_factory.mktemp("rg1")
    return {
        "explicit": RG1_UNCR,
        "rle": encoded(folder / "rle.dcm", RLELossless),
        "jpeg-ls": encoded(folder / "jls.dcm", JPEGLSLossless),
        "jpeg2000": encoded(folder / "j2k.dcm", JPEG2000Lossless),
    }


def _codestream(path: Path) -> bytes:
    ds = pydicom.dcmread(path)
    (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
    return frame


# --------------------------------------------------------------------------- codestream headers


@pytest.mark.parametrize("name", ["explicit", "rle", "jpeg-ls", "jpeg2000"])
def test_rg1_passes_the_checks_in_every_encoding(rg1_encodings: dict[str, Path], name: str) -> None:
    ds = pydicom.dcmread(rg1_encodings[name], defer_size=DEFER_SIZE)
    check_header(ds)
    check_pixel_data(ds)
    assert decode_stored(ds).shape == RG1_SHAPE


def test_the_jpeg_2000_siz_gives_size_components_and_precision() -> None:
    header = j2k_header(_codestream(RG1_J2KR))
    assert (header.rows, header.columns) == RG1_SHAPE
    assert (header.components, header.precision) == (1, 15)


def test_a_jp2_file_is_read_from_its_codestream_box() -> None:
    codestream = _codestream(RG1_J2KR)
    file_type = struct.pack(">I4s4sI4s", 20, b"ftyp", b"jp2 ", 0, b"jp2 ")
    jp2 = JP2_SIGNATURE + file_type + struct.pack(">I4s", 8 + len(codestream), b"jp2c")
    header = j2k_header(jp2 + codestream)
    assert (header.rows, header.columns) == RG1_SHAPE


def test_the_jpeg_ls_sof55_gives_the_size(rg1_encodings: dict[str, Path]) -> None:
    header = jpeg_header(_codestream(rg1_encodings["jpeg-ls"]))
    assert (header.kind, header.rows, header.columns, header.components) == (
        "JPEG-LS",
        *RG1_SHAPE,
        1,
    )


def test_a_jpeg_frame_header_is_found_after_the_application_segments() -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((70, 90), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
    header = jpeg_header(buffer.getvalue())  # after JFIF APP0, DQT and DHT
    assert (header.kind, header.rows, header.columns, header.precision) == ("JPEG", 70, 90, 8)


def test_the_rle_header_gives_the_segment_count(rg1_encodings: dict[str, Path]) -> None:
    assert rle_segment_count(_codestream(rg1_encodings["rle"])) == 2


@pytest.mark.parametrize(
    ("data", "parse", "message"),
    [
        (b"\xff\x4f\xff\x52" + bytes(60), j2k_header, "no SIZ"),
        (b"\xff\x4f\xff\x51\x00\x29", j2k_header, "cut short"),
        (b"\x00" * 40, j2k_header, "no JPEG 2000 start"),
        (
            JP2_SIGNATURE + struct.pack(">I4s", 12, b"ftyp") + bytes(4),
            j2k_header,
            "without a codestream box",
        ),
        (b"\xff\xd8\xff\xda\x00\x02", jpeg_header, "scan starts before"),
        (b"\xff\xd8\xff\xc0\x00\x0b\x08\x00\x00\x00\x40\x01", jpeg_header, "DNL"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", jpeg_header, "cut short"),
        (b"\xff\xd8\xff\xd9", jpeg_header, "end of image"),
        (struct.pack("<16L", 0, *([0] * 15)), rle_segment_count, "0 segments"),
        (struct.pack("<16L", 2, 64, 10, *([0] * 13)), rle_segment_count, "in order"),
    ],
)
def test_malformed_codestream_headers_are_named(data: bytes, parse: object, message: str) -> None:
    assert callable(parse)
    with pytest.raises(CodestreamError, match=message):
        parse(data)


# --------------------------------------------------------------------------- refused images


@pytest.mark.parametrize("side", [25_000, 40_000])
def test_a_j2k_siz_bomb_is_unassessable_and_never_decoded(tmp_path: Path, side: int) -> None:
    bomb = j2k_siz_bomb(tmp_path / "bomb.dcm", side=side)
    before = _peak_rss_mib()
    with pytest.raises(InvalidImageError) as caught:
        load_dicom_image(bomb)
    assert str(caught.value) == (
        f"the JPEG 2000 codestream is {side}x{side} but Rows and Columns say 1024x1024 "
        "(not decoded)"
    )
    assert _peak_rss_mib() - before < 100  # its decode would need gigabytes


def test_excess_pixel_data_is_refused_not_decoded_as_frames(tmp_path: Path) -> None:
    excess = excess_pixel_data(tmp_path / "excess.dcm")  # 800 MB of Pixel Data, sparse
    ds = pydicom.dcmread(excess, defer_size=DEFER_SIZE)
    with pytest.raises(InvalidImageError, match="excess pixel data: 838860800 bytes where"):
        check_pixel_data(ds)
    assert ds.get_item(PIXEL_DATA_TAG, keep_deferred=True).value is None  # never read
    with pytest.raises(InvalidImageError, match="refused, not decoded as more frames"):
        load_dicom_image(excess)


def test_truncated_pixel_data_is_refused_with_what_is_there(tmp_path: Path) -> None:
    truncated = truncated_pixel_data(tmp_path / "truncated.dcm")
    with pytest.raises(InvalidImageError) as caught:
        load_dicom_image(truncated)
    assert str(caught.value) == (
        f"truncated pixel data: 7000000 of the {RG1_BYTES} bytes the header describes"
    )


def test_one_byte_more_is_padding_two_are_excess() -> None:
    ds = pydicom.dcmread(RG1_UNCR)
    pixels = bytes(ds.PixelData)
    ds.PixelData = pixels + b"\0"  # the padding of an odd length to even (PS3.5 7.1)
    check_pixel_data(ds)
    ds.PixelData = pixels + b"\0\0"
    with pytest.raises(InvalidImageError, match=f"excess pixel data: {RG1_BYTES + 2} bytes"):
        check_pixel_data(ds)


@pytest.mark.parametrize(
    ("name", "changes", "message"),
    [
        ("jpeg-ls", {"Rows": 1024}, "JPEG-LS codestream is 1955x1841 but Rows and Columns"),
        ("jpeg2000", {"Columns": 2000}, "JPEG 2000 codestream is 1955x1841"),
        ("jpeg2000", {"BitsAllocated": 8, "BitsStored": 8, "HighBit": 7}, "15-bit samples"),
        ("rle", {"BitsAllocated": 8, "BitsStored": 8, "HighBit": 7}, "RLE data has 2 segments"),
    ],
)
def test_a_codestream_that_contradicts_the_header_is_not_decoded(
    rg1_encodings: dict[str, Path], name: str, changes: dict[str, int], message: str
) -> None:
    ds = pydicom.dcmread(rg1_encodings[name])
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    with pytest.raises(InvalidImageError, match=message):
        load_dicom_image(ds)


def test_compressed_data_larger_than_the_image_is_excess(rg1_encodings: dict[str, Path]) -> None:
    ds = pydicom.dcmread(rg1_encodings["jpeg2000"])
    (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
    ds.PixelData = encapsulate([frame + bytes(RG1_BYTES * 2)])
    with pytest.raises(InvalidImageError, match="excess pixel data: more than"):
        check_pixel_data(ds)


def test_an_encapsulated_syntax_without_a_check_is_refused(rg1_encodings: dict[str, Path]) -> None:
    ds = pydicom.dcmread(rg1_encodings["jpeg2000"])
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.110")  # JPEG XL Lossless
    with pytest.raises(InvalidImageError, match="no codestream check for the transfer syntax"):
        check_pixel_data(ds)


def test_a_jpeg_baseline_image_is_checked_against_its_sof() -> None:
    ds = pydicom.dcmread(RG1_UNCR)
    small = (ds.pixel_array[:256, :256] >> 7).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(small).save(buffer, "JPEG", quality=95)
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.Rows = ds.Columns = 256
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PhotometricInterpretation = "MONOCHROME2"
    check_pixel_data(ds)
    ds.Rows = 300
    with pytest.raises(InvalidImageError, match="JPEG codestream is 256x256 but Rows"):
        check_pixel_data(ds)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_pixels": 3_000_000}, "image too large to decode: 1955x1841 is 3599155 pixels"),
        ({"BitsAllocated": 12}, "unsupported Bits Allocated 12"),
    ],
)
def test_header_limits(changes: dict[str, int], message: str) -> None:
    ds = pydicom.dcmread(RG1_UNCR, stop_before_pixels=True)
    limit = changes.pop("max_pixels", 25_000_000)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    with pytest.raises(InvalidImageError, match=message):
        check_header(ds, limit)


def test_a_native_image_in_memory_is_checked_like_one_in_a_file() -> None:
    ds = pydicom.dcmread(RG1_UNCR)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    ds.PixelData = ds.PixelData[: RG1_BYTES // 2]
    with pytest.raises(InvalidImageError, match="truncated pixel data"):
        check_pixel_data(ds)
