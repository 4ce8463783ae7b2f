"""Load chest radiographs (DICOM CR/DX, PNG, JPEG) as CoroNet input: 1 x S x S float32 in [0, 1].

DICOM goes through :mod:`.dicom_image` (the grayscale pipeline of PS3.4 N.2.1, after the
decode limits of :mod:`.pixel_guard`); its names are re-exported here.  ``LoadRadiograph`` also
takes an image that was already decoded that way (a float32 HxW array in [0, 1], MONOCHROME2
sense), which is how the worker hands over what its decoder process made.

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
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import ImageMetaKey, MetaKeys
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError
from pydicom.dataset import Dataset

from .dicom_image import (
    FallbackWindow,
    Image2D,
    image_header_problems,
    is_dicom_file,
    load_dicom_image,
)
from .pixel_guard import MAX_SIDE, MIN_SIDE, InvalidImageError, check_size

__all__ = [
    "DEFAULT_SIZE",
    "MAX_SIDE",
    "MIN_SIDE",
    "InvalidImageError",
    "LoadRadiograph",
    "LoadRadiographd",
    "covidnet_crop",
    "decoded_image",
    "image_header_problems",
    "is_dicom_file",
    "load_dicom_image",
    "load_image",
    "load_raster_image",
    "prepare",
    "resize_image",
]

logger = logging.getLogger(__name__)

Source = str | os.PathLike[str] | Dataset
ResizeMode = Literal["antialias", "nearest"]

DEFAULT_SIZE = 512
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
            check_size(img.height, img.width)
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


def _describe(source: Source | NDArray[Any]) -> str:
    if isinstance(source, Dataset):
        return "<pydicom.Dataset>"
    if isinstance(source, np.ndarray):
        return "<decoded image>"
    return str(Path(source))


def decoded_image(image: NDArray[Any]) -> Image2D:
    """An image already loaded by ``load_dicom_image`` or ``load_image``, checked: float32
    HxW with values in [0, 1]."""
    if image.dtype != np.float32 or image.ndim != 2:
        raise InvalidImageError(
            f"a decoded image must be float32 HxW, got {image.dtype} {image.shape}"
        )
    check_size(*image.shape)
    if not (float(image.min()) >= 0.0 and float(image.max()) <= 1.0):
        raise InvalidImageError("a decoded image must hold values in [0, 1]")
    return image


class LoadRadiograph(Transform):
    """MONAI transform: path, ``pydicom.Dataset`` or decoded image (:func:`decoded_image`) ->
    ``MetaTensor`` 1 x S x S in [0, 1].

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

    def __call__(self, data: Source | NDArray[Any]) -> MetaTensor:
        if isinstance(data, np.ndarray):
            image = decoded_image(data)
        elif isinstance(data, Dataset):
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
    """Dictionary version of ``LoadRadiograph``: replaces each of ``keys`` (a path, a
    ``pydicom.Dataset`` or a decoded image) by its 1 x S x S ``MetaTensor``."""

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
