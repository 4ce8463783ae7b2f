"""Pre-processing: DICOM grayscale pipeline, encodings, PNG/JPEG, resizing, MONAI transforms."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import DataLoader, MetaTensor
from monai.data import Dataset as MonaiDataset
from monai.transforms import Compose
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless, RLELossless

from monai_bundle.scripts.phantoms import make_phantom, phantom_dataset, write_dicom, write_png
from monai_bundle.scripts.preprocessing import (
    MAX_SIDE,
    MIN_SIDE,
    InvalidImageError,
    LoadRadiograph,
    LoadRadiographd,
    covidnet_crop,
    image_header_problems,
    is_dicom_file,
    load_dicom_image,
    load_image,
    prepare,
    resize_image,
)


def data_file(name: str) -> str:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} is missing"
    return str(path)


def reread(ds: Dataset) -> Dataset:
    """Serialise and read back, as a received file would be."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def ramp_dataset(rows: int = 64, cols: int = 64, bits: int = 12) -> Dataset:
    """A MONOCHROME2 CR whose stored values run linearly from 0 to 2**bits - 1 (no window)."""
    ds = phantom_dataset(make_phantom("normal", (rows, cols), 0), bits_stored=bits)
    ramp = np.linspace(0, 2**bits - 1, rows * cols).round().astype("<u2").reshape(rows, cols)
    ds.PixelData = ramp.tobytes()
    for keyword in ("WindowCenter", "WindowWidth", "WindowCenterWidthExplanation"):
        delattr(ds, keyword)
    return ds


def stored(ds: Dataset) -> np.ndarray:
    return np.asarray(ds.pixel_array, dtype=np.float64)


# --------------------------------------------------------------------------------------------
# The real test radiograph: encodings and orientation.


def test_rg1_lossless_encodings_prepare_identically() -> None:
    uncompressed = prepare(data_file("RG1_UNCR.dcm"))
    jpeg2000 = prepare(data_file("RG1_J2KR.dcm"))
    assert uncompressed.shape == (1, 512, 512) and uncompressed.dtype == torch.float32
    assert float((uncompressed - jpeg2000).abs().max()) <= 1e-6


def test_rg1_lossy_jpeg2000_close_to_its_original() -> None:
    original = prepare(data_file("RG1_UNCI.dcm"), 256)
    lossy = prepare(data_file("RG1_J2KI.dcm"), 256)
    assert float((original - lossy).abs().mean()) < 0.01


def test_rg1_monochrome1_comes_out_lungs_dark() -> None:
    ds = pydicom.dcmread(data_file("RG1_UNCR.dcm"))
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    image = prepare(ds, 256)[0].numpy()
    lungs = (image[80:150, 40:90].mean() + image[80:150, 166:216].mean()) / 2
    mediastinum = image[80:150, 118:138].mean()
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert lungs < mediastinum - 0.1
    assert image_header_problems(ds) == []


# --------------------------------------------------------------------------------------------
# Same image, every encoding: lossless ones give identical output.


def _compress(transfer_syntax: UID) -> Callable[[Dataset], Dataset]:
    def encode(ds: Dataset) -> Dataset:
        ds.compress(transfer_syntax)
        return ds

    return encode


def _jpeg_baseline(ds: Dataset) -> Dataset:
    """Re-encode an 8-bit dataset as JPEG baseline (PS3.5 A.4.1) with Pillow."""
    buffer = io.BytesIO()
    Image.fromarray(ds.pixel_array.astype(np.uint8)).save(buffer, format="JPEG", quality=95)
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.LossyImageCompression = "01"
    return ds


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize(
    ("encode", "bits", "tolerance"),
    [
        (_compress(RLELossless), 12, 0.0),
        (_compress(RLELossless), 16, 0.0),
        (_compress(JPEGLSLossless), 12, 0.0),
        (_compress(JPEGLSLossless), 16, 0.0),
        (_compress(JPEG2000Lossless), 12, 0.0),
        (_compress(JPEG2000Lossless), 16, 0.0),
        (_jpeg_baseline, 8, 0.02),
    ],
    ids=["rle12", "rle16", "jls12", "jls16", "j2k12", "j2k16", "jpeg8"],
)
def test_phantom_encodings_match_uncompressed(
    encode: Callable[[Dataset], Dataset], bits: int, tolerance: float, photometric: str
) -> None:
    phantom = make_phantom("COVID-19", 128, 2)
    kwargs = {"photometric": photometric, "bits_stored": bits}
    reference = load_dicom_image(reread(phantom_dataset(phantom, **kwargs)))  # type: ignore[arg-type]
    encoded = reread(encode(phantom_dataset(phantom, **kwargs)))  # type: ignore[arg-type]
    assert encoded.file_meta.TransferSyntaxUID.is_compressed
    result = load_dicom_image(encoded)
    assert result.shape == reference.shape and result.dtype == np.float32
    assert float(np.abs(result - reference).mean()) <= tolerance


@pytest.mark.parametrize(
    ("compressed", "uncompressed"),
    [
        ("MR_small_RLE.dcm", "MR_small.dcm"),
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
        ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
    ],
)
def test_pydicom_lossless_files_match(compressed: str, uncompressed: str) -> None:
    np.testing.assert_array_equal(
        load_dicom_image(data_file(compressed)), load_dicom_image(data_file(uncompressed))
    )


@pytest.mark.parametrize(
    "name",
    [
        "JPGLosslessP14SV1_1s_1f_8b.dcm",  # JPEG lossless, process 14
        "JPEG-LL.dcm",  # JPEG lossless, signed 16-bit
        "JPGExtended.dcm",  # JPEG extended, 12-bit
        "mlut_18.dcm",  # Modality LUT Sequence
        "vlut_04.dcm",  # VOI LUT Sequence
        "CT_small.dcm",  # signed, rescaled, windowed
    ],
)
def test_other_encodings_and_luts_decode_to_unit_range(name: str) -> None:
    image = load_dicom_image(data_file(name))
    assert image.ndim == 2 and image.dtype == np.float32
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert image.std() > 0.05


# --------------------------------------------------------------------------------------------
# Grayscale pipeline: Modality LUT, VOI, MONOCHROME1.


# (center, width, function, expected(x)) for stored x in 0..4095, PS3.3 C.11.2.1.2-3.
WINDOW_CASES = [
    (2048.0, 4096.0, "LINEAR", lambda x: x / 4095),
    (1000.5, 1001.0, "LINEAR", lambda x: np.clip((x - 1000.0) / 1000.0 + 0.5, 0, 1)),
    (2000.0, 1.0, "LINEAR", lambda x: (x > 1999.5).astype(float)),
    (1000.0, 1000.0, "LINEAR_EXACT", lambda x: np.clip((x - 1000.0) / 1000.0 + 0.5, 0, 1)),
    (2048.0, 800.0, "SIGMOID", lambda x: 1 / (1 + np.exp(-4 * (x - 2048.0) / 800.0))),
]


@pytest.mark.parametrize(("center", "width", "function", "expected"), WINDOW_CASES)
def test_window_functions(
    center: float, width: float, function: str, expected: Callable[[np.ndarray], np.ndarray]
) -> None:
    ds = ramp_dataset()
    ds.WindowCenter, ds.WindowWidth = center, width
    if function != "LINEAR":
        ds.VOILUTFunction = function
    np.testing.assert_allclose(load_dicom_image(ds), expected(stored(ds)), atol=1e-6)


def test_empty_window_uses_fallback() -> None:
    ds = ramp_dataset()
    ds.WindowCenter, ds.WindowWidth = None, None
    np.testing.assert_allclose(load_dicom_image(ds), stored(ds) / 4095, atol=1e-6)


def test_first_of_several_windows_is_used() -> None:
    ds = ramp_dataset()
    ds.WindowCenter, ds.WindowWidth = [1000.5, 3000.0], [1001.0, 200.0]
    np.testing.assert_allclose(
        load_dicom_image(ds), np.clip((stored(ds) - 1000.0) / 1000.0 + 0.5, 0, 1), atol=1e-6
    )


@pytest.mark.parametrize(("slope", "intercept"), [(1.0, 0.0), (2.0, -1024.0), (0.5, 10.0)])
def test_rescale_is_applied_before_the_window(slope: float, intercept: float) -> None:
    ds = ramp_dataset()
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    # The same window expressed in output units selects the same stored values.
    low, high = 1000.0 * slope + intercept, 3000.0 * slope + intercept
    ds.WindowCenter, ds.WindowWidth = (low + high) / 2, high - low
    ds.VOILUTFunction = "LINEAR_EXACT"
    np.testing.assert_allclose(
        load_dicom_image(ds), np.clip((stored(ds) - 1000.0) / 2000.0, 0, 1), atol=1e-6
    )


def test_voi_lut_sequence_preferred_and_scaled_by_its_extremes() -> None:
    ds = ramp_dataset()
    ds.WindowCenter, ds.WindowWidth = 10.0, 2.0  # would saturate: must be ignored
    table = (np.sqrt(np.arange(4096) / 4095) * 1000 + 100).round().astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new("LUTData", "US", table.tolist())
    ds.VOILUTSequence = [item]
    expected = (table[stored(ds).astype(int)] - 100.0) / 1000.0
    np.testing.assert_allclose(load_dicom_image(reread(ds)), expected, atol=1e-6)


@pytest.mark.parametrize(
    ("fallback", "expected_high"),
    [("minmax", 0.5), ("percentile", 1.0)],
)
def test_fallback_window_without_voi(fallback: str, expected_high: float) -> None:
    ds = ramp_dataset()
    pixels = np.linspace(0, 2000, 64 * 64).round().astype("<u2").reshape(64, 64)
    pixels[0, :8] = 4000  # a few burned-in marker pixels
    ds.PixelData = pixels.tobytes()
    image = load_dicom_image(ds, fallback_window=fallback)  # type: ignore[arg-type]
    assert image.min() == 0.0 and image.max() == 1.0
    # The bulk of the image (values up to 2000) fills half the range with min-max, all of it
    # with the percentile window.
    assert image[-1, -1] == pytest.approx(expected_high, abs=0.02)


def test_monochrome1_is_inverted() -> None:
    mono2 = ramp_dataset()
    mono2.WindowCenter, mono2.WindowWidth = 2048, 4096
    mono1 = ramp_dataset()
    mono1.WindowCenter, mono1.WindowWidth = 2048, 4096
    mono1.PhotometricInterpretation = "MONOCHROME1"
    np.testing.assert_allclose(load_dicom_image(mono1), 1.0 - load_dicom_image(mono2), atol=1e-6)


# --------------------------------------------------------------------------------------------
# Rejections.


def _no_pixels(ds: Dataset) -> None:
    del ds.PixelData


def _two_frames(ds: Dataset) -> None:
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2


def _rgb(ds: Dataset) -> None:
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0


def _palette(ds: Dataset) -> None:
    ds.PhotometricInterpretation = "PALETTE COLOR"


def _tiny(ds: Dataset) -> None:
    ds.Rows = ds.Columns = MIN_SIDE - 1
    ds.PixelData = bytes(2 * ds.Rows * ds.Columns)


def _huge(ds: Dataset) -> None:
    ds.Rows = MAX_SIDE + 1  # rejected from the header, before any decoding


def _constant(ds: Dataset) -> None:
    ds.PixelData = np.full((64, 64), 700, dtype="<u2").tobytes()


def _truncated(ds: Dataset) -> None:
    ds.PixelData = ds.PixelData[:100]


def _garbage_jpeg2000(ds: Dataset) -> None:
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(200)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless


def _zero_width(ds: Dataset) -> None:
    ds.WindowCenter, ds.WindowWidth = 100, 0


def _window_outside_data(ds: Dataset) -> None:
    ds.WindowCenter, ds.WindowWidth = 100000, 10


def _unknown_function(ds: Dataset) -> None:
    ds.WindowCenter, ds.WindowWidth = 100, 10
    ds.VOILUTFunction = "CUBIC"


def _broken_voi_lut(ds: Dataset) -> None:
    ds.VOILUTSequence = [Dataset()]  # no LUT Descriptor


def _broken_modality_lut(ds: Dataset) -> None:
    ds.ModalityLUTSequence = [Dataset()]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_no_pixels, "no pixel data"),
        (_broken_voi_lut, "invalid VOI LUT or window"),
        (_broken_modality_lut, "invalid Modality LUT"),
        (_two_frames, "not a 2-D image: 2 frames"),
        (_rgb, "not grayscale"),
        (_palette, "not grayscale"),
        (_tiny, "absurd size"),
        (_huge, "absurd size"),
        (_constant, "constant image"),
        (_truncated, "truncated pixel data: 100 of the 8192 bytes"),
        (_garbage_jpeg2000, "unreadable codestream header"),
        (_zero_width, "invalid Window Width"),
        (_window_outside_data, "constant image after the VOI window"),
        (_unknown_function, "unsupported VOI LUT Function"),
    ],
)
def test_bad_dicom_rejected_with_reason(damage: Callable[[Dataset], None], message: str) -> None:
    ds = ramp_dataset()
    damage(ds)
    with pytest.raises(InvalidImageError, match=message):
        load_dicom_image(ds)
    assert issubclass(InvalidImageError, ValueError)


def test_real_rgb_and_multiframe_files_rejected() -> None:
    with pytest.raises(InvalidImageError, match="not grayscale"):
        load_dicom_image(data_file("SC_rgb.dcm"))
    with pytest.raises(InvalidImageError, match="frames"):
        load_dicom_image(data_file("emri_small.dcm"))


@pytest.mark.parametrize(
    ("content", "name"),
    [
        (b"hello, not an image", "fake.dcm"),
        (b"\x00" * 200, "zeros"),
        (b"GIF89a" + bytes(64), "a.gif"),
    ],
)
def test_unreadable_files_rejected(tmp_path: Path, content: bytes, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InvalidImageError):
        load_image(path)


# --------------------------------------------------------------------------------------------
# image_header_problems: can the pixel data be model input?


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, None),
        ({"Modality": "CT", "ViewPosition": "LL"}, None),  # the node's rules, not the bundle's
        ({"PhotometricInterpretation": "RGB", "SamplesPerPixel": 3}, "not grayscale"),
        ({"NumberOfFrames": 2}, "2 frames"),
        ({"Rows": 20}, "absurd size"),
        ({"Columns": 20000}, "absurd size"),
    ],
)
def test_image_header_problems_name_what_the_model_cannot_read(
    changes: dict[str, object], expected: str | None
) -> None:
    ds = phantom_dataset(make_phantom("normal", 64, 0), modality="DX")
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    problems = image_header_problems(ds)
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 1 and expected in problems[0]


def test_image_header_problems_without_pixel_data() -> None:
    ds = phantom_dataset(make_phantom("normal", 64, 0))
    del ds.PixelData
    assert image_header_problems(ds) == ["no pixel data"]


# --------------------------------------------------------------------------------------------
# PNG and JPEG.


def _save(tmp_path: Path, name: str, pixels: np.ndarray, **params: Any) -> Path:
    path = tmp_path / name
    Image.fromarray(pixels).save(path, **params)
    return path


@pytest.fixture
def gray8() -> np.ndarray:
    return np.round(make_phantom("pneumonia", 96, 1).image * 255).astype(np.uint8)


@pytest.mark.parametrize(
    ("name", "convert", "tolerance"),
    [
        ("gray.png", lambda g: g, 0.0),
        ("gray16.png", lambda g: g.astype(np.uint16) * 257, 0.0),
        ("rgb.png", lambda g: np.stack([g] * 3, -1), 0.0),
        ("la.png", lambda g: np.stack([g, np.full_like(g, 255)], -1), 0.0),
        ("rgba.png", lambda g: np.stack([g, g, g, np.full_like(g, 255)], -1), 0.0),
        ("gray.jpg", lambda g: g, 0.02),
        ("rgb.jpg", lambda g: np.stack([g] * 3, -1), 0.02),
    ],
)
def test_raster_images_load_as_gray(
    tmp_path: Path,
    gray8: np.ndarray,
    name: str,
    convert: Callable[[np.ndarray], np.ndarray],
    tolerance: float,
) -> None:
    path = _save(tmp_path, name, convert(gray8))
    image = load_image(path)
    assert image.dtype == np.float32 and image.shape == gray8.shape
    assert float(np.abs(image - gray8 / 255.0).mean()) <= tolerance + 1e-7


def test_palette_png_loads_as_gray(tmp_path: Path, gray8: np.ndarray) -> None:
    path = tmp_path / "palette.png"
    Image.fromarray(gray8).convert("P").save(path)
    np.testing.assert_allclose(load_image(path), gray8 / 255.0, atol=1e-6)


def _colour(g: np.ndarray) -> np.ndarray:
    return np.stack([g, np.roll(g, 9, axis=1), 255 - g], -1)


def _transparent(g: np.ndarray) -> np.ndarray:
    alpha = np.full_like(g, 255)
    alpha[:10] = 0
    return np.stack([g, alpha], -1)


@pytest.mark.parametrize(
    ("name", "make", "params", "message"),
    [
        ("colour.png", _colour, {}, "colour image"),
        ("colour.jpg", _colour, {"quality": 95}, "colour image"),
        ("alpha.png", _transparent, {}, "transparency"),
        ("flat.png", lambda g: np.full_like(g, 90), {}, "constant image"),
        ("tiny.png", lambda g: g[:40, :40], {}, "absurd size"),
        ("wide.png", lambda g: np.zeros((64, MAX_SIDE + 1), np.uint8), {}, "absurd size"),
        ("gray.bmp", lambda g: g, {}, "unsupported image format BMP"),
        ("gray.tif", lambda g: g, {}, "unsupported image format TIFF"),
    ],
)
def test_bad_raster_images_rejected(
    tmp_path: Path,
    gray8: np.ndarray,
    name: str,
    make: Callable[[np.ndarray], np.ndarray],
    params: dict[str, Any],
    message: str,
) -> None:
    path = _save(tmp_path, name, make(gray8), **params)
    with pytest.raises(InvalidImageError, match=message):
        load_image(path)


def test_bilevel_png_rejected(tmp_path: Path, gray8: np.ndarray) -> None:
    path = tmp_path / "bilevel.png"
    Image.fromarray(gray8).convert("1").save(path)
    with pytest.raises(InvalidImageError, match="unsupported image mode '1'"):
        load_image(path)


@pytest.mark.parametrize("name", ["image.png", "noextension", "scan.jpg"])
def test_dicom_detected_by_preamble_not_suffix(tmp_path: Path, name: str) -> None:
    phantom = make_phantom("normal", 64, 3)
    write_dicom(phantom, tmp_path / name)
    assert is_dicom_file(tmp_path / name)
    np.testing.assert_allclose(load_image(tmp_path / name), phantom.image, atol=1e-3)


def test_png_is_not_dicom(tmp_path: Path) -> None:
    path = write_png(make_phantom("normal", 64, 3), tmp_path / "x.png").rename(tmp_path / "x.dcm")
    assert not is_dicom_file(path)
    assert load_image(path).shape == (64, 64)


# --------------------------------------------------------------------------------------------
# Geometry.


@pytest.mark.parametrize(
    ("shape", "size", "mode"),
    [
        ((300, 200), 128, "antialias"),
        ((300, 200), 128, "nearest"),
        ((64, 64), 512, "antialias"),
        ((64, 80), (32, 48), "nearest"),
        ((100, 100), 100, "antialias"),
    ],
)
def test_resize_shapes_and_range(
    shape: tuple[int, int], size: int | tuple[int, int], mode: str
) -> None:
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    out = resize_image(image, size, mode)  # type: ignore[arg-type]
    expected = (size, size) if isinstance(size, int) else size
    assert out.shape == expected and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    if mode == "nearest":
        assert np.isin(out, image).all()


def test_antialias_resize_does_not_alias_fine_texture() -> None:
    stripes = np.tile(np.array([0.0, 1.0], dtype=np.float32), (512, 256))
    smooth = resize_image(stripes, 128, "antialias")
    nearest = resize_image(stripes, 128, "nearest")
    assert smooth.std() < 0.05 and smooth.mean() == pytest.approx(0.5, abs=0.02)
    # Nearest-neighbour turns the stripes into a flat wrong value or a coarse pattern.
    assert abs(float(nearest.mean()) - 0.5) > 0.4 or nearest.std() > 0.4


@pytest.mark.parametrize(
    ("shape", "expected"),
    [((100, 100), (92, 92)), ((1000, 800), (800, 800)), ((500, 1000), (460, 460))],
)
def test_covidnet_crop(shape: tuple[int, int], expected: tuple[int, int]) -> None:
    image = np.arange(shape[0] * shape[1], dtype=np.float32).reshape(shape)
    cropped = covidnet_crop(image)
    assert cropped.shape == expected
    top = round(shape[0] * 0.08)
    left = (shape[1] - expected[1]) // 2
    assert cropped[0, 0] == image[top + (shape[0] - top - expected[0]) // 2, left]


@pytest.mark.parametrize("covidnet", [False, True])
def test_prepare_png_dicom_and_dataset(tmp_path: Path, covidnet: bool) -> None:
    phantom = make_phantom("COVID-19", 128, 6)
    png = write_png(phantom, tmp_path / "p.png", bit_depth=16)
    dcm = tmp_path / "p.dcm"
    ds = write_dicom(phantom, dcm, bits_stored=16, photometric="MONOCHROME1")
    outputs = [
        prepare(source, 64, covidnet=covidnet) for source in (png, dcm, ds, pydicom.dcmread(dcm))
    ]
    for out in outputs:
        assert out.shape == (1, 64, 64) and out.dtype == torch.float32
        assert float((out - outputs[0]).abs().max()) < 1e-3


# --------------------------------------------------------------------------------------------
# MONAI transforms.


def test_load_radiograph_returns_meta_tensor(tmp_path: Path) -> None:
    path = write_png(make_phantom("normal", (100, 80), 1), tmp_path / "n.png")
    out = LoadRadiograph(size=48)(str(path))
    assert isinstance(out, MetaTensor)
    assert out.shape == (1, 48, 48)
    assert out.meta["filename_or_obj"] == str(path)
    assert list(out.meta["spatial_shape"]) == [100, 80]


@pytest.mark.parametrize("kwargs", [{"resize_mode": "bicubic"}, {"fallback_window": "auto"}])
def test_load_radiograph_rejects_bad_options(kwargs: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="must be"):
        LoadRadiograph(**kwargs)  # type: ignore[arg-type]


def test_dict_transform_in_monai_dataset_and_loader(tmp_path: Path) -> None:
    items = []
    for i, label in enumerate(("normal", "pneumonia", "COVID-19")):
        path = tmp_path / f"{i}.dcm"
        write_dicom(make_phantom(label, 96, i), path, modality="DX")
        items.append({"image": str(path), "label": i})
    dataset = MonaiDataset(items, transform=Compose([LoadRadiographd(keys="image", size=64)]))
    batch = next(iter(DataLoader(dataset, batch_size=3)))
    assert batch["image"].shape == (3, 1, 64, 64)
    assert batch["label"].tolist() == [0, 1, 2]


def test_transform_instantiated_from_bundle_config(tmp_path: Path) -> None:
    path = write_png(make_phantom("normal", 64, 1), tmp_path / "n.png")
    parser = ConfigParser(
        {
            "load": {
                "_target_": "monai_bundle.scripts.preprocessing.LoadRadiographd",
                "keys": ["image"],
                "size": 32,
            }
        }
    )
    transform = parser.get_parsed_content("load")
    assert transform({"image": str(path)})["image"].shape == (1, 32, 32)
