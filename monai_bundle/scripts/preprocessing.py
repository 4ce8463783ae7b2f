"""Load chest radiographs (DICOM CR/DX, PNG, JPEG) as CoroNet input: 1 x S x S float32 in [0, 1].

DICOM follows the grayscale pipeline of PS3.4 N.2.1 / PS3.3 C.11:

1. decode the stored values, in any transfer syntax pydicom can decode here (uncompressed,
   RLE, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000);
2. Modality LUT or rescale (PS3.3 C.11.1), with ``pydicom.pixels.apply_modality_lut``;
3. VOI: the first VOI LUT (PS3.3 C.11.2.1.1, ``pydicom.pixels.apply_voi``) scaled by the LUT's
   own output extremes; else the first window (PS3.3 C.11.2.1.2 and C.11.2.1.3: LINEAR,
   LINEAR_EXACT, SIGMOID), computed here straight to [0, 1] because pydicom's windowing scales
   to a range derived from Bits Stored and the rescale, which flips for negative slopes; else a
   fallback window: min-max of the modality values (default: keeps every value, and is how
   most public PNG conversions were made) or the ``PERCENTILE_WINDOW`` percentiles (robust to
   burned-in markers);
4. MONOCHROME1 is inverted (PS3.3 C.7.6.3.1.2), so the output is always in the MONOCHROME2
   sense: lungs dark, bone bright.  Presentation LUT Shape is not applied on top: for DX it
   only restates the photometric interpretation (PS3.3 C.8.11.3.1.4).

PNG and JPEG (training sets such as COVIDx) are scaled by the nominal maximum of their bit
depth (255 or 65535).  An RGB file is accepted only when it is grayscale in disguise.

Resizing (``resize_image``) goes to a square S x S without keeping the aspect ratio, as the
CoroNet authors did (they trained at 512 x 512).  They used nearest-neighbour; the default here
is antialiased bilinear (area-like) because nearest-neighbour subsampling of a ~2000 px image
aliases noise and fine texture (ground glass, vessels), and its output jumps with one-pixel
shifts.  ``mode="nearest"`` reproduces the authors' choice.  Training and inference must use the
same mode: both go through ``prepare`` / ``LoadRadiograph``.

Bad input raises ``InvalidImageError`` (a ``ValueError``) naming the reason.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import ImageMetaKey, MetaKeys
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi

__all__ = [
    "DEFAULT_SIZE",
    "MAX_SIDE",
    "MIN_SIDE",
    "InvalidImageError",
    "LoadRadiograph",
    "LoadRadiographd",
    "covidnet_crop",
    "image_header_problems",
    "is_dicom_file",
    "load_dicom_image",
    "load_image",
    "load_raster_image",
    "prepare",
    "resize_image",
]

logger = logging.getLogger(__name__)

Image2D = NDArray[np.float32]
Source = str | os.PathLike[str] | Dataset
ResizeMode = Literal["antialias", "nearest"]
FallbackWindow = Literal["minmax", "percentile"]

DEFAULT_SIZE = 512
MIN_SIDE = 64
MAX_SIDE = 8192
PERCENTILE_WINDOW = (0.5, 99.5)
GRAYSCALE_PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")
# PS3.10 7.1: a 128-byte preamble, then the prefix "DICM".
DICOM_PREAMBLE_LENGTH = 128
DICOM_PREFIX = b"DICM"
RASTER_FORMATS = ("PNG", "JPEG")
# RGB files: a pixel is gray when its channels differ by at most this many levels (JPEG's
# chroma subsampling leaves small differences in gray images); the file is gray when at most
# COLOUR_PIXEL_FRACTION of its pixels are not (e.g. a small coloured arrow or label).
RGB_GRAY_TOLERANCE = {"PNG": 0, "JPEG": 8}
COLOUR_PIXEL_FRACTION = 0.005
# ITU-R BT.601 luma, used only for RGB files that pass the gray test.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# COVID-Net pre-processing: drop the top 8 % of rows (burned-in text), then a central square.
COVIDNET_TOP_FRACTION = 0.08
# What malformed LUT or window attributes raise inside pydicom and numpy.
_HEADER_ERRORS = (AttributeError, KeyError, IndexError, TypeError, ValueError, NotImplementedError)


class InvalidImageError(ValueError):
    """An input cannot be used as a grayscale chest radiograph; the message says why."""


# --------------------------------------------------------------------------------------------
# DICOM.


def is_dicom_file(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` starts with the PS3.10 preamble and the ``DICM`` prefix."""
    with open(path, "rb") as handle:
        header = handle.read(DICOM_PREAMBLE_LENGTH + len(DICOM_PREFIX))
    return header[DICOM_PREAMBLE_LENGTH:] == DICOM_PREFIX


def _read_dataset(source: Source) -> Dataset:
    if isinstance(source, Dataset):
        return source
    try:
        return pydicom.dcmread(source)
    except InvalidDicomError as err:
        raise InvalidImageError(f"not a DICOM Part 10 file: {err}") from err


def _check_header(ds: Dataset) -> None:
    """Reject, before decoding, what cannot be a single grayscale frame of sane size."""
    if "PixelData" not in ds:
        other = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        detail = f" ({other[0]} is not supported)" if other else ""
        raise InvalidImageError(f"no pixel data{detail}")
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
    _check_size(int(ds.get("Rows", 0)), int(ds.get("Columns", 0)))


def _check_size(rows: int, columns: int) -> None:
    for name, side in (("rows", rows), ("columns", columns)):
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise InvalidImageError(
                f"absurd size {rows}x{columns}: {name} must be in [{MIN_SIDE}, {MAX_SIDE}] px"
            )


def _decode(ds: Dataset) -> NDArray[Any]:
    try:
        pixels = ds.pixel_array
    except Exception as err:  # decoder plugins raise many types; all mean "cannot decode"
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", "unknown transfer syntax")
        raise InvalidImageError(f"undecodable pixel data ({name}): {err}") from err
    if pixels.ndim != 2:
        raise InvalidImageError(f"not a 2-D image: decoded shape {pixels.shape}")
    return pixels


def _window(values: NDArray[np.float64], center: float, width: float, function: str) -> Any:
    """VOI window to [0, 1] (PS3.3 C.11.2.1.2.1 LINEAR, C.11.2.1.3 LINEAR_EXACT and SIGMOID)."""
    if function == "LINEAR":
        if width < 1:
            raise InvalidImageError(f"invalid Window Width {width} (must be >= 1 for LINEAR)")
        if width == 1:
            return (values > center - 0.5).astype(np.float64)
        return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    if width <= 0:
        raise InvalidImageError(f"invalid Window Width {width} (must be > 0 for {function})")
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    raise InvalidImageError(f"unsupported VOI LUT Function {function!r}")


def _first(value: Any) -> float:
    """First value of a possibly multi-valued DS element (the default VOI, PS3.3 C.11.2.1.2)."""
    if isinstance(value, list | tuple | MultiValue):
        value = value[0]
    return float(value)


def _voi_lut(modality_values: NDArray[Any], ds: Dataset) -> NDArray[np.float64]:
    item = ds.VOILUTSequence[0]
    entries = int(item.LUTDescriptor[0]) or 2**16
    first = int(item.LUTDescriptor[1])
    # VOI LUT inputs are integers: truncate a non-integral modality output (PS3.3 C.11.2.1.1).
    inputs = np.floor(modality_values).astype(np.int64)
    mapped = apply_voi(inputs, ds).astype(np.float64)
    table = apply_voi(np.arange(first, first + entries, dtype=np.int64), ds)
    low, high = float(table.min()), float(table.max())
    if high <= low:
        raise InvalidImageError("constant VOI LUT")
    return (mapped - low) / (high - low)


def _apply_voi(values: NDArray[np.float64], ds: Dataset, fallback: FallbackWindow) -> Any:
    """VOI LUT if present, else the first window, else the fallback window (PS3.3 C.11.2)."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    try:
        if ds.get("VOILUTSequence"):
            return _voi_lut(values, ds)
        if center not in (None, "") and width not in (None, ""):
            function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
            return _window(values, _first(center), _first(width), function)
    except InvalidImageError:
        raise
    except _HEADER_ERRORS as err:
        raise InvalidImageError(f"invalid VOI LUT or window: {err}") from err
    return _fallback_window(values, fallback)


def _fallback_window(values: NDArray[np.float64], fallback: FallbackWindow) -> Any:
    if fallback == "minmax":
        low, high = float(values.min()), float(values.max())
    elif fallback == "percentile":
        low, high = (float(v) for v in np.percentile(values, PERCENTILE_WINDOW))
        if high <= low:
            low, high = float(values.min()), float(values.max())
    else:
        raise ValueError(f"fallback_window must be 'minmax' or 'percentile', got {fallback!r}")
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def load_dicom_image(source: Source, *, fallback_window: FallbackWindow = "minmax") -> Image2D:
    """Decode a grayscale DICOM image to float32 HxW in [0, 1], MONOCHROME2 sense, native size.

    ``source`` is a path or a ``pydicom.Dataset``.  Raises ``InvalidImageError`` for input that
    is not one grayscale frame of sane size, or whose pixel data cannot be decoded.
    """
    ds = _read_dataset(source)
    _check_header(ds)
    stored = _decode(ds)
    try:
        values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    except _HEADER_ERRORS as err:
        raise InvalidImageError(f"invalid Modality LUT or rescale: {err}") from err
    if float(values.min()) == float(values.max()):
        raise InvalidImageError(f"constant image (every pixel is {float(values.min()):g})")
    display = _apply_voi(values, ds, fallback_window)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        display = 1.0 - display
    image = np.asarray(display, dtype=np.float32)
    if float(image.min()) == float(image.max()):
        raise InvalidImageError("constant image after the VOI window (window outside the data)")
    return image


def image_header_problems(ds: Dataset) -> list[str]:
    """Why the pixel data of ``ds`` cannot be model input, from the header alone (empty list:
    it can): one grayscale frame of a sane size.  Nothing is decoded and nothing raises.

    Whether the image shows a frontal chest is not this bundle's call: the DICOM node applies
    its selection rules (``dicom_node.core.chest``) before the model sees an image.
    """
    try:
        _check_header(ds)
    except InvalidImageError as err:
        return [str(err)]
    except (TypeError, ValueError) as err:  # e.g. Rows that is not a number
        return [f"unusable image header: {err}"]
    return []


# --------------------------------------------------------------------------------------------
# PNG and JPEG.


def _gray_from_colour(pixels: NDArray[Any], file_format: str) -> NDArray[Any]:
    """Grayscale of an RGB array, or ``InvalidImageError`` if it is truly in colour."""
    rgb = pixels[..., :3].astype(np.int32)
    spread = rgb.max(axis=-1) - rgb.min(axis=-1)
    coloured = float(np.mean(spread > RGB_GRAY_TOLERANCE[file_format]))
    if coloured > COLOUR_PIXEL_FRACTION:
        raise InvalidImageError(
            f"colour image: {coloured:.1%} of pixels have unequal RGB channels; "
            "expected a grayscale radiograph"
        )
    if not spread.any():
        return pixels[..., 0]
    return np.tensordot(rgb.astype(np.float64), np.asarray(LUMA_WEIGHTS), axes=([-1], [0]))


def _drop_alpha(pixels: NDArray[Any]) -> NDArray[Any]:
    alpha = pixels[..., -1]
    if alpha.min() != alpha.max() or alpha.min() == 0:
        raise InvalidImageError("image has transparency; expected an opaque radiograph")
    colour = pixels[..., :-1]
    return colour[..., 0] if colour.shape[-1] == 1 else colour


def load_raster_image(path: str | os.PathLike[str]) -> Image2D:
    """Read a PNG (8/16-bit) or JPEG (8-bit) as float32 HxW in [0, 1].

    Values are divided by the bit depth's nominal maximum.  RGB(A), LA and palette files are
    accepted when they are gray (see ``RGB_GRAY_TOLERANCE``); colour is rejected.
    """
    try:
        with Image.open(path) as img:
            file_format = str(img.format)
            if file_format not in RASTER_FORMATS:
                raise InvalidImageError(f"unsupported image format {file_format}")
            _check_size(img.height, img.width)
            mode = img.mode
            if mode == "P":
                pixels = np.asarray(img.convert("RGBA"))
                mode = "RGBA"
            else:
                pixels = np.asarray(img)
    except Image.DecompressionBombError as err:
        raise InvalidImageError(f"absurd size: {err}") from err
    except (UnidentifiedImageError, OSError) as err:
        raise InvalidImageError(f"not a readable PNG or JPEG file: {err}") from err
    if mode in ("LA", "RGBA"):
        pixels = _drop_alpha(pixels)
        mode = mode[:-1]
    if mode == "L":
        maximum = 255.0
    elif mode.startswith("I;16") or mode == "I":
        if pixels.min() < 0 or pixels.max() > 65535:
            raise InvalidImageError(f"integer image outside 0..65535 (mode {mode})")
        maximum = 65535.0
    elif mode == "RGB":
        pixels = _gray_from_colour(pixels, file_format)
        maximum = 255.0
    else:
        raise InvalidImageError(f"unsupported image mode {mode!r}; expected grayscale")
    if pixels.ndim != 2:
        raise InvalidImageError(f"not a 2-D image: shape {pixels.shape}")
    image = (np.asarray(pixels, dtype=np.float64) / maximum).astype(np.float32)
    if float(image.min()) == float(image.max()):
        raise InvalidImageError(f"constant image (every pixel is {float(image.min()):g})")
    return image


def load_image(
    path: str | os.PathLike[str], *, fallback_window: FallbackWindow = "minmax"
) -> Image2D:
    """Load a DICOM (detected by its PS3.10 ``DICM`` prefix, whatever the suffix), PNG or JPEG
    file as float32 HxW in [0, 1], MONOCHROME2 sense, native size."""
    if is_dicom_file(path):
        return load_dicom_image(path, fallback_window=fallback_window)
    return load_raster_image(path)


# --------------------------------------------------------------------------------------------
# Geometry.


def covidnet_crop(image: Image2D, top_fraction: float = COVIDNET_TOP_FRACTION) -> Image2D:
    """COVID-Net pre-processing (optional): drop the top ``top_fraction`` of the rows, then keep
    the central square.  Resize afterwards with ``resize_image``."""
    if not 0.0 <= top_fraction < 1.0:
        raise ValueError(f"top_fraction must be in [0, 1), got {top_fraction}")
    cropped = image[round(image.shape[0] * top_fraction) :, :]
    rows, cols = cropped.shape
    side = min(rows, cols)
    top, left = (rows - side) // 2, (cols - side) // 2
    return np.ascontiguousarray(cropped[top : top + side, left : left + side])


def resize_image(
    image: Image2D, size: int | tuple[int, int] = DEFAULT_SIZE, mode: ResizeMode = "antialias"
) -> Image2D:
    """Resize HxW to ``size`` (square if an int) without keeping the aspect ratio.

    ``antialias``: bilinear with an antialiasing filter when shrinking (area-like); ``nearest``:
    the CoroNet authors' nearest-neighbour.  Values stay in the input's range.
    """
    height, width = (size, size) if isinstance(size, int) else size
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive, got {size}")
    if image.ndim != 2:
        raise ValueError(f"expected an HxW image, got shape {image.shape}")
    if image.shape == (height, width):
        return image.astype(np.float32, copy=False)
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    if mode == "antialias":
        out = F.interpolate(
            tensor, size=(height, width), mode="bilinear", align_corners=False, antialias=True
        )
    elif mode == "nearest":
        out = F.interpolate(tensor, size=(height, width), mode="nearest-exact")
    else:
        raise ValueError(f"mode must be 'antialias' or 'nearest', got {mode!r}")
    result: Image2D = out[0, 0].clamp_(0.0, 1.0).numpy()
    return result


def prepare(
    source: Source,
    size: int = DEFAULT_SIZE,
    *,
    resize_mode: ResizeMode = "antialias",
    covidnet: bool = False,
    fallback_window: FallbackWindow = "minmax",
) -> torch.Tensor:
    """Load ``source`` (path or ``pydicom.Dataset``) and return the model input, 1 x S x S
    float32 in [0, 1].  ``covidnet`` applies ``covidnet_crop`` before resizing."""
    if isinstance(source, Dataset):
        image = load_dicom_image(source, fallback_window=fallback_window)
    else:
        image = load_image(source, fallback_window=fallback_window)
    if covidnet:
        image = covidnet_crop(image)
    return torch.from_numpy(resize_image(image, size, resize_mode).copy())[None]


# --------------------------------------------------------------------------------------------
# MONAI transforms.


def _describe(source: Source) -> str:
    if isinstance(source, Dataset):
        return "<pydicom.Dataset>"
    return str(Path(source))


class LoadRadiograph(Transform):
    """MONAI transform: path or ``pydicom.Dataset`` -> ``MetaTensor`` 1 x S x S in [0, 1].

    The meta data holds ``filename_or_obj`` and the native ``spatial_shape``.  Usable in a
    bundle config as ``{"_target_": "scripts.preprocessing.LoadRadiograph", "size": 512}``.
    """

    def __init__(
        self,
        size: int = DEFAULT_SIZE,
        resize_mode: ResizeMode = "antialias",
        covidnet: bool = False,
        fallback_window: FallbackWindow = "minmax",
    ) -> None:
        if resize_mode not in ("antialias", "nearest"):
            raise ValueError(f"resize_mode must be 'antialias' or 'nearest', not {resize_mode!r}")
        if fallback_window not in ("minmax", "percentile"):
            raise ValueError(
                f"fallback_window must be 'minmax' or 'percentile', not {fallback_window!r}"
            )
        self.size = size
        self.resize_mode: ResizeMode = resize_mode
        self.covidnet = covidnet
        self.fallback_window: FallbackWindow = fallback_window

    def __call__(self, data: Source) -> MetaTensor:
        if isinstance(data, Dataset):
            image = load_dicom_image(data, fallback_window=self.fallback_window)
        else:
            image = load_image(data, fallback_window=self.fallback_window)
        native_shape = image.shape
        if self.covidnet:
            image = covidnet_crop(image)
        tensor = torch.from_numpy(resize_image(image, self.size, self.resize_mode).copy())[None]
        meta = {
            ImageMetaKey.FILENAME_OR_OBJ: _describe(data),
            MetaKeys.SPATIAL_SHAPE: np.asarray(native_shape),
        }
        return MetaTensor(tensor, meta=meta)


class LoadRadiographd(MapTransform):
    """Dictionary version of ``LoadRadiograph``: replaces each of ``keys`` (a path or a
    ``pydicom.Dataset``) by its 1 x S x S ``MetaTensor``."""

    def __init__(
        self,
        keys: KeysCollection,
        size: int = DEFAULT_SIZE,
        resize_mode: ResizeMode = "antialias",
        covidnet: bool = False,
        fallback_window: FallbackWindow = "minmax",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadRadiograph(size, resize_mode, covidnet, fallback_window)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        for key in self.key_iterator(out):
            out[key] = self.loader(out[key])
        return out
