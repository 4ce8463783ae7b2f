"""The attribution map rendered for people: an RGB picture with the radiograph, the map, a colour
bar and burned-in text::

    +------------------------------------------+-----+
    |                                          | 1.0 |
    |   radiograph (grayscale) with the        |     |   colour bar (viridis: yellow =
    |   heatmap blended on top, same aspect    |     |   most salient, as in the paper's
    |   ratio as the source                    | 0.0 |   figure 2)
    +------------------------------------------+-----+
    |      AI attribution map - not for diagnostic use |   caption band: notice, predicted
    |          Predicted: COVID-19 (93.00 %)           |   class, every class probability,
    |  normal 2.00 % | pneumonia 5.00 % | COVID-19 ... |   method, model; centred
    +------------------------------------------+-----+

The text sits in a band below the image, centred, in the middle :data:`TEXT_WIDTH` of the
width: viewers draw their own overlays in the corners of the viewport and, for a Secondary
Capture (Modality ``OT``), OHIF opens its cine player over the top centre, so neither the top of
the picture nor its corners are safe for text.

:func:`render_overlay` makes the array, :func:`save_png` writes it as PNG (``coronet infer
--png``); :mod:`worker.results.sc` wraps it in a DICOM Secondary Capture.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Final

import matplotlib as mpl
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont

from dicom_node.core.errors import ResultError
from worker.results.outcome import Prediction, percent

__all__ = ["AI_NOTICE", "METHOD", "TEXT_WIDTH", "output_shape", "render_overlay", "save_png"]

#: Burned into every rendering (and the reason for ``BurnedInAnnotation YES`` in the SC).
AI_NOTICE: Final = "AI attribution map - not for diagnostic use"
#: How the map was made, for the caption band and the SC's Derivation Description.
METHOD: Final = "meaningful perturbation (Fong & Vedaldi 2017)"

#: Perceptual colormap (yellow = salient, as in the paper's figure 2); the colour is blended
#: over the grayscale radiograph with an opacity of ``MAX_ALPHA * value``, so regions without
#: attribution show the plain radiograph (the colour bar shows the same blend over mid gray);
#: the image area's long side is the source's clamped to [MIN_LONG_SIDE, MAX_LONG_SIDE].
COLORMAP: Final = "viridis"
MAX_ALPHA: Final = 0.6
LEGEND_GRAY: Final = 0.5
MIN_LONG_SIDE: Final = 512
MAX_LONG_SIDE: Final = 1024
_YELLOW: Final = (255, 255, 0)
_WHITE: Final = (255, 255, 255)
#: The share of the picture's width the caption's lines may use, centred.
TEXT_WIDTH: Final = 0.7
_FONT_FRACTION = 0.028  # font size as a fraction of the image width
_MIN_FONT_PX = 10
_HEATMAP_TOLERANCE = 1e-4


def output_shape(rows: int, columns: int) -> tuple[int, int]:
    """Image-area size (rows, columns) for a source of ``rows x columns``: same aspect ratio,
    long side clamped to [MIN_LONG_SIDE, MAX_LONG_SIDE]."""
    if rows < 1 or columns < 1:
        raise ResultError(f"image size must be positive, got {rows}x{columns}")
    long_side = min(max(rows, columns, MIN_LONG_SIDE), MAX_LONG_SIDE)
    scale = long_side / max(rows, columns)
    return max(1, round(rows * scale)), max(1, round(columns * scale))


def _check_image(name: str, array: NDArray[np.floating], tolerance: float = 0.0) -> None:
    if not isinstance(array, np.ndarray):
        raise ResultError(f"{name} must be a numpy array, not {type(array).__name__}")
    if array.ndim != 2:
        raise ResultError(f"{name} must be a 2-D (H x W) array, got shape {array.shape}")
    if min(array.shape) < 2:
        raise ResultError(f"{name} is too small: {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ResultError(f"{name} must be floating point in [0, 1], got dtype {array.dtype}")
    if not np.isfinite(array).all():
        raise ResultError(f"{name} contains NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if low < -tolerance or high > 1.0 + tolerance:
        raise ResultError(f"{name} values must lie in [0, 1], got [{low:.4g}, {high:.4g}]")


def _resize(array: NDArray[np.floating], shape: tuple[int, int]) -> NDArray[np.float32]:
    image = Image.fromarray(np.asarray(array, dtype=np.float32), mode="F")
    resized = image.resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def _blend(gray: NDArray[np.float32], heat: NDArray[np.float32]) -> NDArray[np.float32]:
    """Colormapped ``heat`` over ``gray`` with opacity ``MAX_ALPHA * heat`` (H x W x 3)."""
    colour = mpl.colormaps[COLORMAP](heat)[..., :3].astype(np.float32)
    alpha = (MAX_ALPHA * heat)[..., None]
    return (1.0 - alpha) * gray[..., None] + alpha * colour


def _to_uint8(rgb: NDArray[np.float32]) -> NDArray[np.uint8]:
    return (np.clip(rgb, 0.0, 1.0) * 255.0).round().astype(np.uint8)


@cache
def _font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    """DejaVu Sans from matplotlib's own data: the same glyphs on every machine."""
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    return ImageFont.truetype(str(Path(mpl.get_data_path()) / "fonts" / "ttf" / name), size)


def _fitted_font(lines: Sequence[str], width: int, size: int, bold: bool) -> ImageFont.FreeTypeFont:
    """The largest font up to ``size`` px in which every line fits ``width``."""
    while size > _MIN_FONT_PX:
        font = _font(size, bold)
        if max(font.getlength(line) for line in lines) <= width:
            return font
        size -= 1
    return _font(_MIN_FONT_PX, bold)


#: Where a caption line may be broken, best first.
_BREAKS: Final = (" | ", ", ")


def _wrapped(lines: Sequence[str], font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """``lines``, each too wide for ``width`` broken after its separators (:data:`_BREAKS`)."""
    out: list[str] = []
    for line in lines:
        separator = next((b for b in _BREAKS if b in line), None)
        if font.getlength(line) <= width or separator is None:
            out.append(line)
            continue
        current = ""
        for part in line.split(separator):
            candidate = f"{current}{separator}{part}" if current else part
            if current and font.getlength(candidate) > width:
                out.append(current)
                current = part
            else:
                current = candidate
        out.append(current)
    return out


def _text_lines(prediction: Prediction | None, model_version: str | None) -> list[str]:
    lines: list[str] = []
    if prediction is not None:
        p = prediction.probabilities[prediction.predicted]
        lines.append(f"Predicted: {prediction.predicted} ({percent(p)})")
        lines.append(
            " | ".join(
                f"{n} {percent(prediction.probabilities[n])}" for n in prediction.class_names
            )
        )
    lines.append(f"Map: {METHOD}")
    if prediction is not None or model_version:
        details = [f"class {prediction.predicted}"] if prediction is not None else []
        details += [f"model {model_version}"] if model_version else []
        lines.append(", ".join(details))
    return lines


def _colour_bar(height: int, width: int, font: ImageFont.FreeTypeFont) -> Image.Image:
    """Vertical colour bar, 1 at the top, with tick labels, on black."""
    bar = Image.new("RGB", (width, height), (0, 0, 0))
    margin = max(4, height // 40)
    bar_w = max(8, width // 3)
    ramp = np.linspace(1.0, 0.0, height - 2 * margin, dtype=np.float32)[:, None]
    strip = _to_uint8(_blend(np.full_like(ramp, LEGEND_GRAY), ramp))
    strip = np.repeat(strip, bar_w, axis=1)
    left = max(2, width // 10)
    bar.paste(Image.fromarray(strip, mode="RGB"), (left, margin))
    draw = ImageDraw.Draw(bar)
    for value in (1.0, 0.5, 0.0):
        y = margin + round((1.0 - value) * (height - 2 * margin - 1))
        draw.line([(left + bar_w, y), (left + bar_w + 3, y)], fill=(255, 255, 255))
        text_y = min(max(y, margin + font.size // 2), height - margin - font.size // 2)
        draw.text(
            (left + bar_w + 5, text_y), f"{value:.1f}", font=font, fill=(255, 255, 255), anchor="lm"
        )
    return bar


def render_overlay(
    image: NDArray[np.floating],
    heatmap: NDArray[np.floating],
    prediction: Prediction | None = None,
    *,
    shape: tuple[int, int] | None = None,
    model_version: str | None = None,
    warnings: Sequence[str] = (),
    notes: Sequence[str] = (),
) -> NDArray[np.uint8]:
    """RGB rendering (``H x W x 3`` uint8) of ``heatmap`` over the radiograph ``image``.

    ``image`` is float in [0, 1], MONOCHROME2 sense; ``heatmap`` is float in [0, 1] of any size
    (high = salient).  Both are resized to an image area of ``output_shape(*shape)``, at the top
    left; ``shape`` (rows, columns) gives the aspect ratio and defaults to ``image.shape``.  A
    colour bar is added right, a caption band below: :data:`AI_NOTICE` and the ``warnings``
    in yellow, then the prediction, its probabilities and the ``notes`` in white.
    """
    _check_image("image", image)
    _check_image("heatmap", heatmap, _HEATMAP_TOLERANCE)
    rows, cols = output_shape(*(shape if shape is not None else image.shape))
    gray = _resize(image, (rows, cols))
    heat = _resize(heatmap, (rows, cols))
    body = Image.fromarray(_to_uint8(_blend(gray, heat)), "RGB")

    bar_width = max(48, cols // 9)
    total_width = cols + bar_width
    font_px = max(_MIN_FONT_PX, round(total_width * _FONT_FRACTION))
    pad = max(4, font_px // 2)
    text_width = round(total_width * TEXT_WIDTH)
    notice_font = _fitted_font([AI_NOTICE], text_width, font_px, bold=True)
    lines = [*_text_lines(prediction, model_version), *notes]
    text_font = _fitted_font([*lines, *warnings], text_width, font_px, bold=False)
    lines = _wrapped(lines, text_font, text_width)
    warned = _wrapped(list(warnings), text_font, text_width)
    line_height = round(max(notice_font.size, text_font.size) * 1.3)
    band_height = pad * 2 + line_height * (1 + len(warned) + len(lines))

    canvas = Image.new("RGB", (total_width, rows + band_height), (0, 0, 0))
    canvas.paste(body, (0, 0))
    tick_font = _fitted_font(["0.5"], bar_width // 2, font_px, bold=False)
    canvas.paste(_colour_bar(rows, bar_width, tick_font), (cols, 0))
    draw = ImageDraw.Draw(canvas)
    middle = total_width / 2
    top = rows + pad
    draw.text((middle, top), AI_NOTICE, font=notice_font, fill=_YELLOW, anchor="ma")
    coloured = [(line, _YELLOW) for line in warned] + [(line, _WHITE) for line in lines]
    for index, (line, colour) in enumerate(coloured, start=1):
        y = top + index * line_height
        draw.text((middle, y), line, font=text_font, fill=colour, anchor="ma")
    return np.asarray(canvas, dtype=np.uint8).copy()


def save_png(rgb: NDArray[np.uint8], path: str | Path) -> Path:
    """Write an ``H x W x 3`` uint8 rendering (e.g. from :func:`render_overlay`) as PNG."""
    if (
        not isinstance(rgb, np.ndarray)
        or rgb.dtype != np.uint8
        or rgb.ndim != 3
        or rgb.shape[2] != 3
    ):
        raise ResultError("save_png expects an H x W x 3 uint8 array")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb, "RGB").save(path, format="PNG")
    return path
