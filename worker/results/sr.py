"""CoroNet's result as a DICOM Comprehensive 3D SR (PS3.3 A.35.13), built with highdicom.

Content tree (PS3.16 TID 1500 "Measurement Report")::

    Imaging Measurement Report
     ├ Language, observation context: device observer (TID 1002/1004)
     ├ Procedure reported: (399208008, SCT, "Plain chest X-ray")
     └ Imaging Measurements
        └ Measurement Group (TID 1501)
           ├ Tracking Identifier / Tracking Unique Identifier (TID 4108)
           ├ Algorithm Name / Version / Parameters, incl. weights SHA-256 (TID 4019)
           ├ NUM "<Class> probability" = 100 p {%}      one per class (TID 300)
           │   ├ HAS CONCEPT MOD Finding = <class code>                 (TID 300 row 2)
           │   └ INFERRED FROM SCOORD POINT Image Region = image centre (TID 300, TID 320)
           │       └ SELECTED FROM IMAGE -> source image
           ├ NUM "Classes not evaluated" = n {classes}   instead, when unassessable; same SCOORD
           ├ CODE Classification = <predicted class> | Not Evaluated     (TID 1501 row 11)
           ├ TEXT Reason not assessable = <reason>   only when unassessable (TID 1501 row 12)
           ├ TEXT Comment = "AI result - not for diagnostic use; predicted: <class>"  (row 12)
           ├ TEXT Comment = "Reason: <reason>"   only when unassessable, one per reason
           ├ IMAGE Source of Measurement -> source image
           └ IMAGE Best illustration of finding -> heatmap SC, when there is one

The probabilities are shaped for viewers as well as for programs.  OHIF 3.13, for one, shows a
TID 1501 group only when its NUMs are inferred from image coordinates, labels each NUM with its
concept name's meaning and its unit's code, and lists the group's Comments above them.  So each
class has its own concept name (a declared private scheme: no standard code means "probability
of COVID-19"), percent is the unit, and every NUM is inferred from one point of the source
image, its centre (:mod:`worker.results.region`).  The class stays coded in a
standard scheme through the Finding concept modifier, which is what :func:`read_sr` reads.

When the image was not assessed, the group has no probability but one NUM "Classes not
evaluated" (all of them), inferred from the centre of the image, so that a viewer draws the
group, and the Comments give the reasons, so that it shows why.

:func:`build_sr` writes it; :func:`read_sr` reads it back into an :class:`SRSummary`.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Literal

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    CodedConcept,
    Comprehensive3DSR,
    ContentSequence,
    CoordinatesForMeasurement,
    DeviceObserverIdentifyingAttributes,
    GraphicTypeValues,
    ImageContentItem,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
    ValueTypeValues,
)
from highdicom.sr.utils import find_content_items
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import Comprehensive3DSRStorage

from dicom_node.core.errors import ResultError
from monai_bundle.scripts.classes import CLASSES, ModelClass
from worker.results import equipment
from worker.results.outcome import (
    WEIGHTS_SHA256_PARAMETER,
    AlgorithmInfo,
    Attribution,
    Prediction,
    Unassessable,
)
from worker.results.region import ImagePoint, image_centre
from worker.results.source import copy_study_attributes, missing_attributes, source_header
from worker.results.uids import KIND_SR, KIND_SR_SERIES, KIND_SR_TRACKING, derived_uid

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Coded concepts
# ---------------------------------------------------------------------------------------------

#: Procedure reported (TID 1500 row 4; CID 100 is extensible).  SNOMED CT 399208008 "Plain
#: chest X-ray" names the examination without a projection or number of views.  The LOINC
#: codes commit to one (36572-6 "XR Chest PA and Lateral", 24648-8 "XR Chest PA upright",
#: 30745-4 "XR Chest 2 Views"), while the model accepts a single frontal view, PA or AP, so
#: they could misstate what was acquired.
PROCEDURE_CHEST_RADIOGRAPH: Final = CodedConcept("399208008", "SCT", "Plain chest X-ray")

#: The model's classes are coded concepts from the bundle config (``classes`` in
#: ``configs/inference.json``; SNOMED CT for the demo bundle: 17621005 Normal, 233604007
#: Pneumonia, CoroNet's non-COVID pneumonia class, and 840539006 COVID-19).

#: Concept name of the coded qualitative evaluation that carries the predicted class.
CLASSIFICATION: Final = codes.SCT.Classification  # 278201002
#: Value of that evaluation when the image was not assessed.
NOT_EVALUATED: Final = codes.SCT.NotEvaluated  # 373121007

#: Class probabilities: one NUM per class, named by a concept of :data:`CODING_SCHEME_CORONET`
#: ("<class meaning> probability", code ``PROB-<class code>``), in UCUM percent, post-coordinated
#: with the class's standard code by a TID 300 row 2 concept modifier named (121071, DCM,
#: "Finding").
PROBABILITY_CODE_PREFIX: Final = "PROB-"
PROBABILITY_UNIT: Final = codes.UCUM.Percent  # ("%", UCUM, "Percent")
PROBABILITY_OF: Final = codes.DCM.Finding
PERCENT: Final = 100.0
#: Concept name of the point each probability is inferred from (TID 320).
IMAGE_REGION: Final = codes.DCM.ImageRegion  # 111030

#: Free-text notice that the content is machine output (TID 1501 row 12).
COMMENT: Final = codes.DCM.Comment
AI_NOTICE: Final = "AI result - not for diagnostic use"

#: Purpose of reference of the heatmap image (CID 7003).
HEATMAP_PURPOSE: Final = codes.DCM.BestIllustrationOfFinding  # 121080

#: Private coding scheme, declared in the Coding Scheme Identification Sequence (PS3.3
#: C.12.1.1.2), for the concepts no standard terminology offers: the probability of each class
#: and why an image was not assessed.
CODING_SCHEME_CORONET: Final = "99CORONET"
REASON_NOT_ASSESSABLE: Final = CodedConcept(
    "CN0001", CODING_SCHEME_CORONET, "Reason image was not assessed"
)
#: When the image was not assessed: how many classes were not, all of them (a private concept,
#: in UCUM "{classes}", a unity with an annotation).  NUMs without a value (PS3.3 C.18.1) would
#: say it too, but highdicom cannot read them, a group without any NUM crashes OHIF 3.13, and
#: OHIF shows a value of 0 as blank.
CLASSES_NOT_EVALUATED: Final = CodedConcept(
    "CN0002", CODING_SCHEME_CORONET, "Classes not evaluated"
)
CLASSES_UNIT: Final = CodedConcept("{classes}", "UCUM", "classes")

SEPARATE: Final = "SEPARATE"
TRACKING_IDENTIFIER: Final = "CoroNet chest radiograph classification"
INSTANCE_NUMBER: Final = 1


_LO_MAX: Final = 64  # PS3.5 6.2, Long String
_SH_MAX: Final = 16  # PS3.5 6.2, Short String
_IS_MAX: Final = 2**31  # PS3.5 6.2, Integer String

OnUnassessable = Literal["report", "skip"]


def coronet_coding_scheme() -> CodingSchemeIdentificationItem:
    """Coding Scheme Identification item declaring :data:`CODING_SCHEME_CORONET`."""
    return CodingSchemeIdentificationItem(
        designator=CODING_SCHEME_CORONET,
        name="CoroNet private codes",
        version="1",
        responsible_organization=equipment.MANUFACTURER,
    )


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def build_sr(
    source: Dataset,
    outcome: Prediction | Unassessable,
    algorithm: AlgorithmInfo,
    *,
    series_number: int,
    series_description: str,
    heatmap_sc: Dataset | None = None,
    on_unassessable: OnUnassessable = "report",
    institution_name: str | None = None,
    classes: Sequence[ModelClass] = CLASSES,
    attribution: Attribution | None = None,
) -> Comprehensive3DSR | None:
    """Build the SR for one source image, or ``None`` when it is unassessable and skipped.

    The SR joins the source's Patient and Study, in a series of its own; its Series and SOP
    Instance UIDs are derived from the source SOP Instance UID and the model version
    (:mod:`worker.results.uids`).  ``heatmap_sc`` is the Secondary
    Capture holding the attribution map, referenced as evidence and from the measurement group.
    ``classes`` are the loaded bundle's classes with their codes; ``attribution`` says what
    deleting the heatmap did to the predicted class (a Comment, see :func:`comments`).  Raises
    :class:`~dicom_node.core.errors.ResultError` on invalid input, also when highdicom refuses
    a value.
    """
    if isinstance(series_number, bool) or not 0 <= series_number < _IS_MAX:
        raise ResultError(
            f"series_number must be an integer in [0, {_IS_MAX}), not {series_number!r}"
        )
    if not series_description.strip() or len(series_description) > _LO_MAX:
        raise ResultError(f"series_description must be 1 to {_LO_MAX} characters (LO)")
    if on_unassessable not in ("report", "skip"):
        raise ResultError(f"on_unassessable must be 'report' or 'skip', not {on_unassessable!r}")
    if not isinstance(outcome, Prediction | Unassessable):
        raise ResultError(f"outcome must be Prediction or Unassessable, not {type(outcome)!r}")
    header = source_header(source)
    if isinstance(outcome, Unassessable) and on_unassessable == "skip":
        logger.info("image not assessable (%d reasons); no SR made", len(outcome.reasons))
        return None
    if heatmap_sc is not None:
        _check_heatmap(heatmap_sc, header)
    point = _anchor(header, outcome)
    try:
        sr = _build(
            header,
            outcome,
            algorithm,
            series_number=series_number,
            series_description=series_description,
            heatmap_sc=heatmap_sc,
            institution_name=institution_name,
            findings=_findings(classes),
            point=point,
            attribution=attribution,
        )
    except (TypeError, ValueError) as err:  # highdicom validates every value it is given
        raise ResultError(f"cannot build the SR: {err}") from err
    logger.info(
        "built SR (%s)", "prediction" if isinstance(outcome, Prediction) else "unassessable"
    )
    return sr


def _build(
    header: Dataset,
    outcome: Prediction | Unassessable,
    algorithm: AlgorithmInfo,
    *,
    series_number: int,
    series_description: str,
    heatmap_sc: Dataset | None,
    institution_name: str | None,
    findings: Mapping[str, CodedConcept],
    point: ImagePoint | None,
    attribution: Attribution | None,
) -> Comprehensive3DSR:
    evidence = [header] if heatmap_sc is None else [header, heatmap_sc]
    group = _measurement_group(header, outcome, algorithm, heatmap_sc, findings, point, attribution)
    report = MeasurementReport(
        observation_context=_observation_context(),
        procedure_reported=PROCEDURE_CHEST_RADIOGRAPH,
        imaging_measurements=[group],
    )
    now = datetime.datetime.now().astimezone()
    sr = Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=derived_uid(header.SOPInstanceUID, algorithm.version, KIND_SR_SERIES),
        series_number=series_number,
        sop_instance_uid=derived_uid(header.SOPInstanceUID, algorithm.version, KIND_SR),
        instance_number=INSTANCE_NUMBER,
        manufacturer=equipment.MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=institution_name,
        series_description=series_description,
        manufacturer_model_name=equipment.MANUFACTURER_MODEL_NAME,
        device_serial_number=equipment.DEVICE_SERIAL_NUMBER,
        coding_schemes=[equipment.ihe_coding_scheme(), coronet_coding_scheme()],
        content_date=now.date(),
        content_time=now.time().replace(tzinfo=None),
        series_date=now.date(),
        series_time=now.time().replace(tzinfo=None),
    )
    copy_study_attributes(header, sr)
    # Set here: highdicom types this argument as a one-element tuple.
    sr.add_new("SoftwareVersions", "LO", list(equipment.software_versions(algorithm.version)))
    # highdicom only accepts DCM purposes of reference; IHE AIR asks for 99IHE Newcode1.
    sr["ContributingEquipmentSequence"].value.append(
        equipment.contributing_equipment_item(
            algorithm.version, contribution_time=now, institution_name=institution_name
        )
    )
    return sr


def _findings(classes: Sequence[ModelClass]) -> Mapping[str, CodedConcept]:
    """Class name -> coded finding, from the bundle's classes."""
    return MappingProxyType({c.name: CodedConcept(c.code, c.scheme, c.meaning) for c in classes})


def _anchor(header: Dataset, outcome: Prediction | Unassessable) -> ImagePoint | None:
    """The point the probabilities are inferred from (:mod:`worker.results.region`); ``None``
    for an unassessed source without a usable size (no image a viewer could show)."""
    try:
        rows, columns = int(header.Rows), int(header.Columns)
    except (AttributeError, TypeError, ValueError):
        rows = columns = 0
    if rows < 1 or columns < 1:
        if isinstance(outcome, Prediction):
            raise ResultError("source image has no usable Rows and Columns")
        return None
    return image_centre(rows, columns)


def _check_heatmap(heatmap_sc: Dataset, source: Dataset) -> None:
    missing = missing_attributes(heatmap_sc)
    if missing:
        raise ResultError(f"heatmap SC lacks required attributes: {', '.join(missing)}")
    if heatmap_sc.StudyInstanceUID != source.StudyInstanceUID:
        raise ResultError("heatmap SC belongs to another study than the source image")
    if heatmap_sc.SOPInstanceUID == source.SOPInstanceUID:
        raise ResultError("heatmap SC has the source image's SOP Instance UID")


def _observation_context() -> ObservationContext:
    """TID 1001 with this software as the device observer (TID 1002, 1004)."""
    attributes = DeviceObserverIdentifyingAttributes(
        uid=equipment.DEVICE_OBSERVER_UID,
        name=equipment.DEVICE_OBSERVER_NAME,
        manufacturer_name=equipment.MANUFACTURER,
        model_name=equipment.MANUFACTURER_MODEL_NAME,
        serial_number=equipment.DEVICE_SERIAL_NUMBER,
    )
    observer = ObserverContext(
        observer_type=CodedConcept.from_code(codes.cid270.Device),
        observer_identifying_attributes=attributes,
    )
    return ObservationContext(observer_device_context=observer)


def _finding_code(class_name: str, findings: Mapping[str, CodedConcept]) -> CodedConcept:
    try:
        return findings[class_name]
    except KeyError:
        raise ResultError(
            f"no coded finding for class {class_name!r}; known: {sorted(findings)}"
        ) from None


def probability_concept(finding: CodedConcept) -> CodedConcept:
    """The private concept "<finding> probability" (:data:`CODING_SCHEME_CORONET`)."""
    value = f"{PROBABILITY_CODE_PREFIX}{finding.value}"
    if len(value) > _SH_MAX:
        raise ResultError(f"class code {finding.value!r} is too long for a probability code")
    return CodedConcept(value, CODING_SCHEME_CORONET, f"{finding.meaning} probability")


def _inferred_from(point: ImagePoint, source: Dataset) -> CoordinatesForMeasurement:
    """INFERRED FROM SCOORD POINT "Image Region", SELECTED FROM the source (TID 320)."""
    return CoordinatesForMeasurement(
        graphic_type=GraphicTypeValues.POINT,
        graphic_data=np.array([[point.column, point.row]]),
        source_image=SourceImageForRegion.from_source_image(source),
        purpose=IMAGE_REGION,
    )


def _probability(
    finding: CodedConcept, probability: float, source: Dataset, point: ImagePoint
) -> Measurement:
    """TID 300 NUM "<class> probability" in percent, inferred from ``point`` of the source."""
    measurement = Measurement(
        name=probability_concept(finding),
        value=PERCENT * float(probability),
        unit=PROBABILITY_UNIT,
        referenced_coordinates=[_inferred_from(point, source)],
    )
    modifier = CodeContentItem(
        name=PROBABILITY_OF,
        value=finding,
        relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD,
    )
    num = measurement[0]
    num.ContentSequence = ContentSequence([modifier, *num.ContentSequence])
    return measurement


def _none_evaluated(count: int, source: Dataset, point: ImagePoint) -> Measurement:
    """TID 300 NUM "Classes not evaluated" = ``count``, inferred from ``point`` of the source."""
    return Measurement(
        name=CLASSES_NOT_EVALUATED,
        value=count,
        unit=CLASSES_UNIT,
        referenced_coordinates=[_inferred_from(point, source)],
    )


def comments(
    outcome: Prediction | Unassessable,
    findings: Mapping[str, CodedConcept],
    caveat: str = "",
    attribution: Attribution | None = None,
) -> list[str]:
    """The group's Comments (TID 1501 row 12): the notice with the result in words; a heatmap
    that is not informative (``attribution``) and the algorithm's ``caveat`` joined in one more;
    then the reasons an image was not evaluated.

    Viewers show them as lines: OHIF 3.13 draws at most five lines per group, the Comments
    first, then the probabilities, so a prediction has room for one more Comment, and a line
    much longer than the notice runs out of the viewport.  The SC's caption gives the
    heatmap's probabilities before and after deletion.
    """
    powerless = attribution is not None and not attribution.informative
    remarks = "; ".join(
        text for text in ("heatmap NOT informative" if powerless else "", caveat) if text
    )
    extra = [remarks[:1].upper() + remarks[1:]] if remarks else []
    if isinstance(outcome, Prediction):
        predicted = _finding_code(outcome.predicted, findings).meaning
        return [f"{AI_NOTICE}; predicted: {predicted}", *extra]
    return [f"{AI_NOTICE}; not evaluated", *extra, *(f"Reason: {r}" for r in outcome.reasons)]


def _measurement_group(
    source: Dataset,
    outcome: Prediction | Unassessable,
    algorithm: AlgorithmInfo,
    heatmap_sc: Dataset | None,
    findings: Mapping[str, CodedConcept],
    point: ImagePoint | None,
    attribution: Attribution | None = None,
) -> MeasurementsAndQualitativeEvaluations:
    tracking = TrackingIdentifier(
        uid=derived_uid(source.SOPInstanceUID, algorithm.version, KIND_SR_TRACKING),
        identifier=TRACKING_IDENTIFIER,
    )
    algorithm_id = AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=list(algorithm.parameter_strings()),
    )
    result: CodedConcept | Code
    measurements: list[Measurement] | None = None
    if isinstance(outcome, Prediction):
        result = _finding_code(outcome.predicted, findings)
        if point is not None:
            measurements = [
                _probability(_finding_code(name, findings), p, source, point)
                for name, p in outcome.probabilities.items()
            ]
    else:
        result = NOT_EVALUATED
        if point is not None:
            measurements = [_none_evaluated(len(findings), source, point)]
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        algorithm_id=algorithm_id,
        measurements=measurements,
        qualitative_evaluations=[QualitativeEvaluation(name=CLASSIFICATION, value=result)],
        source_images=[SourceImageForMeasurementGroup.from_source_image(source)],
    )
    # The group's items are separate statements, not one flowing text (PS3.3 C.18.8.1.4);
    # viewers such as dsr2html then show each concept name with its value.
    group[0].ContinuityOfContent = SEPARATE
    items = group[0].ContentSequence
    if isinstance(outcome, Unassessable):
        items.extend(_text(REASON_NOT_ASSESSABLE, reason) for reason in outcome.reasons)
    remarks = comments(outcome, findings, algorithm.caveat, attribution)
    items.extend(_text(COMMENT, comment) for comment in remarks)
    if heatmap_sc is not None:
        items.append(
            ImageContentItem(
                name=HEATMAP_PURPOSE,
                referenced_sop_class_uid=heatmap_sc.SOPClassUID,
                referenced_sop_instance_uid=heatmap_sc.SOPInstanceUID,
                relationship_type=RelationshipTypeValues.CONTAINS,
            )
        )
    return group


def _text(name: CodedConcept | Code, value: str) -> TextContentItem:
    return TextContentItem(
        name=name, value=value, relationship_type=RelationshipTypeValues.CONTAINS
    )


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SRSummary:
    """What a CoroNet SR says, as read back by :func:`read_sr`.

    ``predicted`` is ``None`` and ``probabilities`` empty when the image was not assessed;
    then ``unassessable_reasons`` says why.  ``comments`` are the group's Comments, the notice
    first; ``region`` is the point of the source image the probabilities are inferred from.
    """

    sop_instance_uid: str
    study_instance_uid: str
    predicted: str | None
    probabilities: Mapping[str, float]
    algorithm_name: str
    algorithm_version: str
    weights_sha256: str
    algorithm_parameters: Mapping[str, str]
    source_sop_instance_uid: str
    heatmap_sop_instance_uid: str | None
    unassessable_reasons: tuple[str, ...]
    comments: tuple[str, ...] = ()
    region: ImagePoint | None = None


def read_sr(ds: Dataset, classes: Sequence[ModelClass] = CLASSES) -> SRSummary:
    """Parse a CoroNet SR (e.g. from ``pydicom.dcmread``) with highdicom's TID 1500 reader.

    ``classes`` map the coded findings back to class names.  Raises
    :class:`~dicom_node.core.errors.ResultError` when ``ds`` is not such an SR or its content
    is inconsistent.
    """
    findings = _findings(classes)
    if ds.get("SOPClassUID") != Comprehensive3DSRStorage:
        raise ResultError("dataset is not a Comprehensive 3D SR")
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    report = sr.content
    if not isinstance(report, MeasurementReport):
        raise ResultError("SR content is not a TID 1500 Measurement Report")
    groups = report.get_image_measurement_groups()
    if len(groups) != 1:
        raise ResultError(f"expected one measurement group, found {len(groups)}")
    group = groups[0]
    root = group[0]

    parameters = dict(_split_parameter(p) for p in _texts(root, codes.DCM.AlgorithmParameters))
    weights_sha256 = parameters.pop(WEIGHTS_SHA256_PARAMETER, None)
    if weights_sha256 is None:
        raise ResultError("SR records no weights SHA-256 among the algorithm parameters")

    evaluations = group.get_qualitative_evaluations(name=CLASSIFICATION)
    if len(evaluations) != 1:
        raise ResultError(f"expected one classification, found {len(evaluations)}")
    result = evaluations[0][0].value
    if not isinstance(result, CodedConcept):
        raise ResultError("the classification is not a coded value")
    predicted = None if result == NOT_EVALUATED else _class_for(result, findings)

    probabilities, regions = _probabilities(root, findings)
    if len(set(regions)) > 1:
        raise ResultError("the probabilities are inferred from different image regions")

    reasons = tuple(_texts(root, REASON_NOT_ASSESSABLE))
    if predicted is None:
        if probabilities or not reasons:
            raise ResultError("an unassessed image must have reasons and no probabilities")
    else:
        # Re-validates sum, range and argmax of what was read.
        Prediction(tuple(probabilities), probabilities, predicted)

    sources = group.source_images
    if len(sources) != 1:
        raise ResultError(f"expected one source image, found {len(sources)}")
    heatmaps = find_content_items(root, name=HEATMAP_PURPOSE, value_type=ValueTypeValues.IMAGE)
    if len(heatmaps) > 1:
        raise ResultError(f"expected at most one heatmap reference, found {len(heatmaps)}")

    return SRSummary(
        sop_instance_uid=str(sr.SOPInstanceUID),
        study_instance_uid=str(sr.StudyInstanceUID),
        predicted=predicted,
        probabilities=MappingProxyType(probabilities),
        algorithm_name=_single_text(root, codes.DCM.AlgorithmName),
        algorithm_version=_single_text(root, codes.DCM.AlgorithmVersion),
        weights_sha256=weights_sha256,
        algorithm_parameters=MappingProxyType(parameters),
        source_sop_instance_uid=str(sources[0].referenced_sop_instance_uid),
        heatmap_sop_instance_uid=(
            str(heatmaps[0].referenced_sop_instance_uid) if heatmaps else None
        ),
        unassessable_reasons=reasons,
        comments=tuple(_texts(root, COMMENT)),
        region=regions[0] if regions else None,
    )


def _probabilities(
    root: Dataset, findings: Mapping[str, CodedConcept]
) -> tuple[dict[str, float], list[ImagePoint]]:
    """Class -> probability of the group's NUMs, and the points they are inferred from."""
    probabilities: dict[str, float] = {}
    regions: list[ImagePoint] = []
    for num in find_content_items(root, value_type=ValueTypeValues.NUM):
        regions.extend(_points(num))
        if num.name == CLASSES_NOT_EVALUATED:
            if num.value != len(findings):
                raise ResultError("not all classes are counted as not evaluated")
            continue
        modifiers = find_content_items(num, name=PROBABILITY_OF, value_type=ValueTypeValues.CODE)
        if len(modifiers) != 1:
            raise ResultError("a probability is not tied to exactly one class")
        finding = modifiers[0].value
        class_name = _class_for(finding, findings)
        if num.name != probability_concept(finding):
            raise ResultError(f"the probability of {class_name!r} has another concept name")
        if num.unit != PROBABILITY_UNIT:
            raise ResultError(f"the probability of {class_name!r} is not in percent")
        if class_name in probabilities:
            raise ResultError(f"two probabilities for class {class_name!r}")
        probabilities[class_name] = num.value / PERCENT
    return probabilities, regions


def _points(num: Dataset) -> list[ImagePoint]:
    """The SCOORD points a NUM is inferred from."""
    items = find_content_items(num, name=IMAGE_REGION, value_type=ValueTypeValues.SCOORD)
    points = []
    for item in items:
        if item.GraphicType != GraphicTypeValues.POINT.value:
            raise ResultError(f"image region is a {item.GraphicType}, not a POINT")
        column, row = (float(v) for v in item.GraphicData)
        points.append(ImagePoint(column=column, row=row))
    return points


def _texts(root: Dataset, name: CodedConcept | Code) -> list[str]:
    items = find_content_items(root, name=name, value_type=ValueTypeValues.TEXT)
    return [str(item.value) for item in items]


def _single_text(root: Dataset, name: CodedConcept | Code) -> str:
    values = _texts(root, name)
    if len(values) != 1:
        raise ResultError(f"expected one {name.meaning!r}, found {len(values)}")
    return values[0]


def _split_parameter(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise ResultError(f"algorithm parameter {text!r} is not 'name=value'")
    return key, value


def _class_for(code: CodedConcept | Code, findings: Mapping[str, CodedConcept]) -> str:
    for class_name, finding in findings.items():
        if finding == code:
            return class_name
    raise ResultError(f"unknown class code ({code.value}, {code.scheme_designator})")


__all__ = [
    "AI_NOTICE",
    "SRSummary",
    "build_sr",
    "read_sr",
]
