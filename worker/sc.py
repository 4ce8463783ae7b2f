"""CoroNet's attribution map as a DICOM Secondary Capture Image (PS3.3 A.8.1), built with highdicom.

The pixel data is an RGB rendering for people, not data for machines (hence Secondary Capture
and ``BurnedInAnnotation YES``)::

    +------------------------------------------+-----+
    | AI attribution map - not for diagnostic use    |   header band: notice, predicted class,
    | Predicted: COVID-19 (p = 0.93)                 |   every class probability, method
    | normal 0.02 | pneumonia 0.05 | COVID-19 0.93   |
    +------------------------------------------+-----+
    |                                          | 1.0 |
    |   radiograph (grayscale) with the        |     |   colour bar (viridis: yellow =
    |   heatmap blended on top, same aspect    |     |   most salient, as in the paper's
    |   ratio as the source                    | 0.0 |   figure 2)
    +------------------------------------------+-----+

The SC joins the source's Patient and Study in a new series (PS3.3 C.7.3.1), references the
source in the Source Image Sequence (PS3.3 C.7.6.1.1.4), and names this software in the General
Equipment, SC Equipment (PS3.3 C.8.6.1) and Contributing Equipment (PS3.3 C.12.1.1.5) attributes.
Its SOP Instance UID is derived from the source's and the model version, its Series Instance
UID from the study's and the model version (``worker.uids``), so a re-run replaces it.

:func:`build_sc` makes the DICOM object; :func:`render_overlay` only the RGB array and
:func:`save_png` writes such an array as PNG (``coronet infer --png``).
"""

from __future__ import annotations

import datetime
import logging
import warnings
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Final

import highdicom as hd
import matplotlib as mpl
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from monai_bundle.scripts.preprocessing import (
    InvalidImageError,
    check_chest_radiograph,
    load_dicom_image,
)
from worker import device
from worker.results import AlgorithmInfo, Prediction
from worker.source import REQUIRED_SOURCE_ATTRIBUTES, TYPE2_COPIED_ATTRIBUTES
from worker.uids import KIND_SC, KIND_SC_SERIES, derived_uid, series_uid

logger = logging.getLogger(__name__)

__all__ = [
    "AI_NOTICE",
    "DEFAULT_SERIES_DESCRIPTION",
    "build_sc",
    "output_shape",
    "render_overlay",
    "save_png",
]

#: Burned into every rendering (and the reason for ``BurnedInAnnotation YES``).
AI_NOTICE: Final = "AI attribution map - not for diagnostic use"
#: Suggested Series Description of the heatmap series.
DEFAULT_SERIES_DESCRIPTION: Final = "CoroNet AI heatmap - not for diagnostic use"
#: How the map was made, for the Derivation Description (PS3.3 C.7.6.1.1.4) and the header.
METHOD: Final = "meaningful perturbation (Fong & Vedaldi 2017)"
DERIVATION_DESCRIPTION: Final = (
    f"CoroNet attribution map by {METHOD}, blended over the source image; "
    "RGB rendering with burned-in text, not for diagnostic use"
)

#: Rendering: perceptual colormap (yellow = salient, as in the paper's figure 2); the colour is
#: blended over the grayscale radiograph with an opacity of ``MAX_ALPHA * value``, so regions
#: without attribution show the plain radiograph (the colour bar shows the same blend over mid
#: gray); the image area's long side is the source's clamped to [MIN_LONG_SIDE, MAX_LONG_SIDE].
COLORMAP: Final = "viridis"
MAX_ALPHA: Final = 0.6
LEGEND_GRAY: Final = 0.5
MIN_LONG_SIDE: Final = 512
MAX_LONG_SIDE: Final = 1024
_FONT_FRACTION = 0.028  # font size as a fraction of the image width
_MIN_FONT_PX = 10

#: DICOM values (PS3.3 C.8.6.1, C.7.6.1, C.8.6.2).
CONVERSION_TYPE_WORKSTATION: Final = "WSD"
IMAGE_TYPE: Final = ("DERIVED", "SECONDARY")
BURNED_IN_ANNOTATION: Final = "YES"
BODY_PART_CHEST: Final = "CHEST"
LOSSY_COMPRESSION_NONE: Final = "00"
RGB: Final = "RGB"
PERSON_NAME_WARNING: Final = ".*unlikely to represent the intended person name"
BITS_ALLOCATED: Final = 8
INSTANCE_NUMBER: Final = 1
#: Purpose of the Source Image Sequence item (CID 7202).
SOURCE_PURPOSE: Final = hd.sr.CodedConcept.from_code(
    codes.DCM.SourceImageForImageProcessingOperation  # 121322
)

_LO_MAX: Final = 64  # PS3.5 6.2, Long String
_IS_MAX: Final = 2**31  # PS3.5 6.2, Integer String
_HEATMAP_TOLERANCE = 1e-4


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def output_shape(rows: int, columns: int) -> tuple[int, int]:
    """Image-area size (rows, columns) for a source of ``rows x columns``: same aspect ratio,
    long side clamped to [MIN_LONG_SIDE, MAX_LONG_SIDE]."""
    if rows < 1 or columns < 1:
        raise ValueError(f"image size must be positive, got {rows}x{columns}")
    long_side = min(max(rows, columns, MIN_LONG_SIDE), MAX_LONG_SIDE)
    scale = long_side / max(rows, columns)
    return max(1, round(rows * scale)), max(1, round(columns * scale))


def _check_image(name: str, array: NDArray[np.floating], tolerance: float = 0.0) -> None:
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, not {type(array).__name__}")
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H x W) array, got shape {array.shape}")
    if min(array.shape) < 2:
        raise ValueError(f"{name} is too small: {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{name} must be floating point in [0, 1], got dtype {array.dtype}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if low < -tolerance or high > 1.0 + tolerance:
        raise ValueError(f"{name} values must lie in [0, 1], got [{low:.4g}, {high:.4g}]")


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


def _text_lines(prediction: Prediction | None, model_version: str | None) -> list[str]:
    lines: list[str] = []
    if prediction is not None:
        p = prediction.probabilities[prediction.predicted]
        lines.append(f"Predicted: {prediction.predicted} (p = {p:.2f})")
        lines.append(
            "Probabilities: "
            + " | ".join(f"{n} {prediction.probabilities[n]:.2f}" for n in prediction.class_names)
        )
    method = f"Map: {METHOD}"
    if prediction is not None:
        method += f", class {prediction.predicted}"
    lines.append(method + (f"; model {model_version}" if model_version else ""))
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
) -> NDArray[np.uint8]:
    """RGB rendering (``H x W x 3`` uint8) of ``heatmap`` over the radiograph ``image``.

    ``image`` is float in [0, 1], MONOCHROME2 sense; ``heatmap`` is float in [0, 1] of any size
    (high = salient).  Both are resized to an image area of ``output_shape(*shape)``; ``shape``
    (rows, columns) gives the aspect ratio and defaults to ``image.shape``.  A header band with
    :data:`AI_NOTICE`, the prediction and its probabilities is added above, a colour bar right.
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
    lines = _text_lines(prediction, model_version)
    notice_font = _fitted_font([AI_NOTICE], total_width - 2 * pad, font_px, bold=True)
    text_font = _fitted_font(lines, total_width - 2 * pad, font_px, bold=False)
    line_height = round(max(notice_font.size, text_font.size) * 1.3)
    header_height = pad * 2 + line_height * (1 + len(lines))

    canvas = Image.new("RGB", (total_width, header_height + rows), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, pad), AI_NOTICE, font=notice_font, fill=(255, 255, 0))
    for index, line in enumerate(lines, start=1):
        draw.text((pad, pad + index * line_height), line, font=text_font, fill=(255, 255, 255))
    canvas.paste(body, (0, header_height))
    tick_font = _fitted_font(["0.5"], bar_width // 2, font_px, bold=False)
    canvas.paste(_colour_bar(rows, bar_width, tick_font), (cols, header_height))
    return np.asarray(canvas, dtype=np.uint8).copy()


def save_png(rgb: NDArray[np.uint8], path: str | Path) -> Path:
    """Write an ``H x W x 3`` uint8 rendering (e.g. from :func:`render_overlay`) as PNG."""
    if (
        not isinstance(rgb, np.ndarray)
        or rgb.dtype != np.uint8
        or rgb.ndim != 3
        or rgb.shape[2] != 3
    ):
        raise ValueError("save_png expects an H x W x 3 uint8 array")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb, "RGB").save(path, format="PNG")
    return path


# ---------------------------------------------------------------------------------------------
# DICOM
# ---------------------------------------------------------------------------------------------


def build_sc(
    source: Dataset,
    heatmap: NDArray[np.floating],
    prediction: Prediction,
    algorithm: AlgorithmInfo,
    *,
    series_number: int,
    series_description: str = DEFAULT_SERIES_DESCRIPTION,
    source_image: NDArray[np.floating] | None = None,
    institution_name: str | None = None,
) -> hd.sc.SCImage:
    """Build the heatmap Secondary Capture for ``source`` (a chest CR/DX image with pixels).

    ``heatmap`` is float in [0, 1], any size, resized to the source's aspect ratio;
    ``source_image`` is the radiograph as float [0, 1] in the MONOCHROME2 sense (decoded from
    ``source`` with ``preprocessing.load_dicom_image`` when ``None``).  Raises
    ``InvalidImageError`` (a ``ValueError``) when ``source`` is not a decodable frontal chest
    CR/DX image, ``ValueError`` or ``TypeError`` for other invalid arguments.
    """
    if isinstance(series_number, bool) or not isinstance(series_number, int):
        raise ValueError(f"series_number must be an integer, not {series_number!r}")
    if not 0 <= series_number < _IS_MAX:
        raise ValueError(f"series_number must be in [0, {_IS_MAX}), not {series_number}")
    if not series_description.strip() or len(series_description) > _LO_MAX:
        raise ValueError(f"series_description must be 1 to {_LO_MAX} characters (LO)")
    if not isinstance(prediction, Prediction):
        raise TypeError(f"prediction must be a Prediction, not {type(prediction).__name__}")
    missing = [kw for kw in REQUIRED_SOURCE_ATTRIBUTES if not source.get(kw)]
    if missing:
        raise ValueError(f"source image lacks required attributes: {', '.join(missing)}")
    reasons = check_chest_radiograph(source)
    if reasons:
        raise InvalidImageError("source is not a frontal chest radiograph: " + "; ".join(reasons))
    if source_image is None:
        source_image = load_dicom_image(source)
    rows, columns = int(source.Rows), int(source.Columns)
    pixels = render_overlay(
        source_image,
        heatmap,
        prediction,
        shape=(rows, columns),
        model_version=algorithm.version,
    )
    now = datetime.datetime.now().astimezone()
    with warnings.catch_warnings():
        # The patient and physician names are copied from the source as they are; highdicom's
        # advice about single-component names concerns the modality, not us.
        warnings.filterwarnings("ignore", message=PERSON_NAME_WARNING, category=UserWarning)
        sc = _build(
            source, pixels, algorithm, series_number, series_description, institution_name, now
        )
    _finish(sc, source, algorithm, now, institution_name)
    logger.info("built heatmap SC (%dx%d RGB)", sc.Rows, sc.Columns)
    return sc


def _build(
    source: Dataset,
    pixels: NDArray[np.uint8],
    algorithm: AlgorithmInfo,
    series_number: int,
    series_description: str,
    institution_name: str | None,
    now: datetime.datetime,
) -> hd.sc.SCImage:
    return hd.sc.SCImage.from_ref_dataset(
        ref_dataset=_reference_header(source),
        pixel_array=pixels,
        photometric_interpretation=RGB,
        bits_allocated=BITS_ALLOCATED,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid(source.StudyInstanceUID, algorithm.version, KIND_SC_SERIES),
        series_number=series_number,
        sop_instance_uid=derived_uid(source.SOPInstanceUID, algorithm.version, KIND_SC),
        instance_number=INSTANCE_NUMBER,
        manufacturer=device.MANUFACTURER,
        # Replaced below by the source's value, or emptied when the source has none.
        patient_orientation=("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=series_description,
        manufacturer_model_name=device.MANUFACTURER_MODEL_NAME,
        device_serial_number=device.DEVICE_SERIAL_NUMBER,
        institution_name=institution_name,
        coding_schemes=[device.ihe_coding_scheme()],
        content_date=now.date(),
        content_time=now.time().replace(tzinfo=None),
        series_date=now.date(),
        series_time=now.time().replace(tzinfo=None),
    )


def _reference_header(source: Dataset) -> Dataset:
    """The source's attributes without pixel data; absent Type 2 Patient/Study attributes are
    added empty (unknown), never invented (PS3.3 C.7.1.1, C.7.2.1)."""
    header = Dataset()
    for element in source:
        if element.keyword not in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            header.add(element)
    for keyword in TYPE2_COPIED_ATTRIBUTES:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


def _finish(
    sc: hd.sc.SCImage,
    source: Dataset,
    algorithm: AlgorithmInfo,
    now: datetime.datetime,
    institution_name: str | None,
) -> None:
    """Attributes highdicom's constructor does not take (PS3.3 C.7.6.1, C.8.6.1, C.12.1.1.5)."""
    # Type 2C (PS3.3 C.7.6.1): the source's orientation, or empty (unknown), never guessed.
    orientation = source.get("PatientOrientation")
    known = orientation is not None and len(orientation) == 2
    sc["PatientOrientation"].value = list(orientation) if known else None
    sc.ImageType = list(IMAGE_TYPE)
    sc.ConversionType = CONVERSION_TYPE_WORKSTATION
    sc.BurnedInAnnotation = BURNED_IN_ANNOTATION
    sc.BodyPartExamined = BODY_PART_CHEST
    sc.LossyImageCompression = LOSSY_COMPRESSION_NONE
    sc.DerivationDescription = DERIVATION_DESCRIPTION
    versions = list(device.software_versions(algorithm.version))
    sc.add_new("SoftwareVersions", "LO", versions)
    sc.SecondaryCaptureDeviceManufacturer = device.MANUFACTURER
    sc.SecondaryCaptureDeviceManufacturerModelName = device.MANUFACTURER_MODEL_NAME
    sc.SecondaryCaptureDeviceSoftwareVersions = versions

    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    reference.PurposeOfReferenceCodeSequence = [SOURCE_PURPOSE]
    sc.SourceImageSequence = [reference]

    # highdicom only accepts DCM purposes of reference; IHE AIR asks for 99IHE Newcode1.
    item = device.contributing_equipment_item(
        algorithm.version, contribution_time=now, institution_name=institution_name
    )
    if "ContributingEquipmentSequence" not in sc:
        sc.add_new("ContributingEquipmentSequence", "SQ", [])
    sc["ContributingEquipmentSequence"].value.append(item)
