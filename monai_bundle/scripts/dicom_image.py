"""Grayscale DICOM radiographs to float32 images in [0, 1], MONOCHROME2 sense, native size.

The grayscale pipeline of PS3.4 N.2.1 / PS3.3 C.11:

1. check the header and the stored pixel data against each other and against the decode
   limits (:mod:`.pixel_guard`), then decode the stored values, in any transfer syntax pydicom
   can decode here (uncompressed, RLE, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000);
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

This module imports neither torch nor MONAI, so that a small process (the worker's decoder)
can run it alone.  Bad input raises ``InvalidImageError`` (a ``ValueError``) naming the reason.
"""

from __future__ import annotations

import os
from typing import Any, Final, Literal

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi

from .pixel_guard import DEFAULT_MAX_PIXELS, InvalidImageError, check_header, check_pixel_data

__all__ = [
    "DEFER_SIZE",
    "FallbackWindow",
    "Image2D",
    "decode_stored",
    "image_header_problems",
    "is_dicom_file",
    "load_dicom_image",
    "read_dataset",
]

Image2D = NDArray[np.float32]
Source = str | os.PathLike[str] | Dataset
FallbackWindow = Literal["minmax", "percentile"]

PERCENTILE_WINDOW: Final = (0.5, 99.5)
# PS3.10 7.1: a 128-byte preamble, then the prefix "DICM".
DICOM_PREAMBLE_LENGTH: Final = 128
DICOM_PREFIX: Final = b"DICM"
#: Values longer than this are left in the file until used, so that the pixel data can be
#: checked (:mod:`.pixel_guard`) before it is read.
DEFER_SIZE: Final = 64 * 1024
# What malformed LUT or window attributes raise inside pydicom and numpy.
_HEADER_ERRORS = (AttributeError, KeyError, IndexError, TypeError, ValueError, NotImplementedError)


def is_dicom_file(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` starts with the PS3.10 preamble and the ``DICM`` prefix."""
    with open(path, "rb") as handle:
        header = handle.read(DICOM_PREAMBLE_LENGTH + len(DICOM_PREFIX))
    return header[DICOM_PREAMBLE_LENGTH:] == DICOM_PREFIX


def read_dataset(source: Source) -> Dataset:
    """``source`` itself, or the file read with large values (the pixel data) deferred."""
    if isinstance(source, Dataset):
        return source
    try:
        return pydicom.dcmread(source, defer_size=DEFER_SIZE)
    except InvalidDicomError as err:
        raise InvalidImageError(f"not a DICOM Part 10 file: {err}") from err


def _check(ds: Dataset, max_pixels: int) -> None:
    try:
        check_header(ds, max_pixels)
    except InvalidImageError:
        raise
    except (TypeError, ValueError) as err:  # e.g. Rows or Number of Frames that is no number
        raise InvalidImageError(f"unusable image header: {err}") from err


def decode_stored(source: Source, max_pixels: int = DEFAULT_MAX_PIXELS) -> NDArray[Any]:
    """The stored values of one grayscale frame, after every check of :mod:`.pixel_guard`."""
    ds = read_dataset(source)
    _check(ds, max_pixels)
    check_pixel_data(ds)
    return _decode(ds)


def _decode(ds: Dataset) -> NDArray[Any]:
    try:
        pixels = ds.pixel_array
    except MemoryError:
        raise
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


def load_dicom_image(
    source: Source,
    *,
    fallback_window: FallbackWindow = "minmax",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image2D:
    """Decode a grayscale DICOM image to float32 HxW in [0, 1], MONOCHROME2 sense, native size.

    ``source`` is a path or a ``pydicom.Dataset``.  Raises ``InvalidImageError`` for input that
    is not one grayscale frame of sane size within ``max_pixels``, whose pixel data does not
    match its header, or that cannot be decoded.
    """
    ds = read_dataset(source)
    stored = decode_stored(ds, max_pixels)
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


def image_header_problems(ds: Dataset, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[str]:
    """Why the pixel data of ``ds`` cannot be model input, from the header alone (empty list:
    it can): pixel data present, one grayscale frame of a sane size within ``max_pixels``.
    Nothing is decoded or read, and nothing raises.

    Whether the image shows a frontal chest is not this bundle's call: the DICOM node applies
    its selection rules (``dicom_node.core.chest``) before the model sees an image.
    """
    if "PixelData" not in ds:
        other = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        return [f"no pixel data{f' ({other[0]} is not supported)' if other else ''}"]
    try:
        _check(ds, max_pixels)
    except InvalidImageError as err:
        return [str(err)]
    return []
