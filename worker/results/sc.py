"""CoroNet's attribution map as a DICOM Secondary Capture Image (PS3.3 A.8.1), built with highdicom.

The pixel data is the RGB rendering of :mod:`worker.results.render`, for people, not data for
machines (hence Secondary Capture and ``BurnedInAnnotation YES``).  The SC joins the source's
Patient and Study in a new series (PS3.3 C.7.3.1), references the source in the Source Image
Sequence (PS3.3 C.7.6.1.1.4), and names this software in the General Equipment, SC Equipment
(PS3.3 C.8.6.1) and Contributing Equipment (PS3.3 C.12.1.1.5) attributes.  Its SOP Instance UID
is derived from the source's and the model version, its Series Instance UID from the study's
and the model version (:mod:`worker.results.uids`), so a re-run replaces it.
"""

from __future__ import annotations

import datetime
import logging
import warnings
from typing import Final

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.core.errors import ResultError
from worker.results import equipment
from worker.results.outcome import AlgorithmInfo, Attribution, Prediction
from worker.results.render import METHOD, render_overlay
from worker.results.source import copy_study_attributes, source_header
from worker.results.uids import KIND_SC, KIND_SC_SERIES, derived_uid, series_uid

logger = logging.getLogger(__name__)

__all__ = ["build_sc"]

DERIVATION_DESCRIPTION: Final = (
    f"CoroNet attribution map by {METHOD}, blended over the source image; "
    "RGB rendering with burned-in text, not for diagnostic use"
)

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


def build_sc(
    source: Dataset,
    heatmap: NDArray[np.floating],
    prediction: Prediction,
    algorithm: AlgorithmInfo,
    *,
    series_number: int,
    series_description: str,
    source_image: NDArray[np.floating],
    institution_name: str | None = None,
    attribution: Attribution | None = None,
) -> hd.sc.SCImage:
    """Build the heatmap Secondary Capture for ``source``, a chest CR/DX image the model assessed
    (the caller applied :mod:`dicom_node.core.chest`; a prediction exists only for such images).

    ``heatmap`` is float in [0, 1], any size, resized to the source's aspect ratio;
    ``source_image`` is the radiograph as float [0, 1] in the MONOCHROME2 sense, as the bundle's
    ``load_dicom_image`` decoded it (the worker's decoder process): the SC never decodes the
    source again.  The caption says the algorithm's caveat and, with ``attribution``, what
    deleting the map did to the class's probability, in yellow when the map is not
    informative.  Raises :class:`~dicom_node.core.errors.ResultError` for invalid arguments.
    """
    if isinstance(series_number, bool) or not isinstance(series_number, int):
        raise ResultError(f"series_number must be an integer, not {series_number!r}")
    if not 0 <= series_number < _IS_MAX:
        raise ResultError(f"series_number must be in [0, {_IS_MAX}), not {series_number}")
    if not series_description.strip() or len(series_description) > _LO_MAX:
        raise ResultError(f"series_description must be 1 to {_LO_MAX} characters (LO)")
    if not isinstance(prediction, Prediction):
        raise ResultError(f"prediction must be a Prediction, not {type(prediction).__name__}")
    header = source_header(source)
    try:
        rows, columns = int(source.Rows), int(source.Columns)
    except (AttributeError, TypeError, ValueError) as err:
        raise ResultError(f"source image has no usable Rows and Columns: {err}") from err
    warned, notes = caption_remarks(algorithm, attribution)
    pixels = render_overlay(
        source_image,
        heatmap,
        prediction,
        shape=(rows, columns),
        model_version=algorithm.version,
        warnings=warned,
        notes=notes,
    )
    now = datetime.datetime.now().astimezone()
    with warnings.catch_warnings():
        # The patient and physician names are copied from the source as they are; highdicom's
        # advice about single-component names concerns the modality, not us.
        warnings.filterwarnings("ignore", message=PERSON_NAME_WARNING, category=UserWarning)
        try:
            sc = _build(
                header, pixels, algorithm, series_number, series_description, institution_name, now
            )
        except (TypeError, ValueError) as err:  # highdicom validates every value it is given
            raise ResultError(f"cannot build the SC: {err}") from err
    _finish(sc, header, algorithm, now, institution_name)
    logger.info("built heatmap SC (%dx%d RGB)", sc.Rows, sc.Columns)
    return sc


def caption_remarks(
    algorithm: AlgorithmInfo, attribution: Attribution | None
) -> tuple[list[str], list[str]]:
    """The caption's warnings (yellow: the algorithm's caveat, a map that is not informative)
    and notes (white: what deleting an informative map did)."""
    warned = [algorithm.caveat[:1].upper() + algorithm.caveat[1:]] if algorithm.caveat else []
    notes: list[str] = []
    if attribution is not None:
        (notes if attribution.informative else warned).append(attribution.describe())
    return warned, notes


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
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation=RGB,
        bits_allocated=BITS_ALLOCATED,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid(source.StudyInstanceUID, algorithm.version, KIND_SC_SERIES),
        series_number=series_number,
        sop_instance_uid=derived_uid(source.SOPInstanceUID, algorithm.version, KIND_SC),
        instance_number=INSTANCE_NUMBER,
        manufacturer=equipment.MANUFACTURER,
        # Replaced below by the source's value, or emptied when the source has none.
        patient_orientation=("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=series_description,
        manufacturer_model_name=equipment.MANUFACTURER_MODEL_NAME,
        device_serial_number=equipment.DEVICE_SERIAL_NUMBER,
        institution_name=institution_name,
        coding_schemes=[equipment.ihe_coding_scheme()],
        content_date=now.date(),
        content_time=now.time().replace(tzinfo=None),
        series_date=now.date(),
        series_time=now.time().replace(tzinfo=None),
    )


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
    copy_study_attributes(source, sc)
    sc.ImageType = list(IMAGE_TYPE)
    sc.ConversionType = CONVERSION_TYPE_WORKSTATION
    sc.BurnedInAnnotation = BURNED_IN_ANNOTATION
    sc.BodyPartExamined = BODY_PART_CHEST
    sc.LossyImageCompression = LOSSY_COMPRESSION_NONE
    sc.DerivationDescription = DERIVATION_DESCRIPTION
    versions = list(equipment.software_versions(algorithm.version))
    sc.add_new("SoftwareVersions", "LO", versions)
    sc.SecondaryCaptureDeviceManufacturer = equipment.MANUFACTURER
    sc.SecondaryCaptureDeviceManufacturerModelName = equipment.MANUFACTURER_MODEL_NAME
    sc.SecondaryCaptureDeviceSoftwareVersions = versions

    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    reference.PurposeOfReferenceCodeSequence = [SOURCE_PURPOSE]
    sc.SourceImageSequence = [reference]

    # highdicom only accepts DCM purposes of reference; IHE AIR asks for 99IHE Newcode1.
    item = equipment.contributing_equipment_item(
        algorithm.version, contribution_time=now, institution_name=institution_name
    )
    if "ContributingEquipmentSequence" not in sc:
        sc.add_new("ContributingEquipmentSequence", "SQ", [])
    sc["ContributingEquipmentSequence"].value.append(item)
