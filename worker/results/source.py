"""What every result object (SR and SC) needs from its source image, and the one copy of it.

:func:`source_header` is the source's header as the result builders see it: every attribute but
the pixel data, checked for the Type 1 UIDs a derived object must reference, with the Type 2
Patient and Study attributes present (empty when the source lacks them).

:func:`copy_study_attributes` puts the source's Patient and Study attributes into a result, so
that the source, its SR and its SC agree on them (``dcentvfy`` checks that): highdicom copies
only some of them, and not the same ones for an SR and an SC.
"""

from __future__ import annotations

import copy
import logging
from typing import Final

from pydicom.dataset import Dataset

from dicom_node.core.errors import ResultError

logger = logging.getLogger(__name__)

#: Type 1 attributes the source must carry (PS3.3 C.12.1, C.7.2.1, C.7.3.1).
REQUIRED_SOURCE_ATTRIBUTES: Final = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
)

#: Type 2 Patient and Study attributes copied to the results; absent ones are copied empty
#: (unknown), as Type 2 allows, never invented (PS3.3 C.7.1.1, C.7.2.1).
TYPE2_COPIED_ATTRIBUTES: Final = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)

#: Attributes of the Patient and Study entities (PS3.3 C.7.1.1 Patient, C.7.2.1 General Study,
#: C.7.2.2 Patient Study) that a result carries as its source has them.
STUDY_LEVEL_ATTRIBUTES: Final = (
    *TYPE2_COPIED_ATTRIBUTES,
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence",
    "PatientComments",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "ReferringPhysicianIdentificationSequence",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "RequestingService",
    "ProcedureCodeSequence",
    "ReasonForPerformedProcedureCodeSequence",
    "ReferencedStudySequence",
    "AdmittingDiagnosesDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "Occupation",
    "AdditionalPatientHistory",
)

#: Pixel Data, Float Pixel Data, Double Float Pixel Data: never copied, and skipped by tag, so
#: that a deferred pixel data value stays unread.
PIXEL_TAGS: Final = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})


def missing_attributes(dataset: Dataset) -> list[str]:
    """The :data:`REQUIRED_SOURCE_ATTRIBUTES` that ``dataset`` lacks or leaves empty."""
    return [kw for kw in REQUIRED_SOURCE_ATTRIBUTES if not dataset.get(kw)]


def source_header(source: Dataset, what: str = "source image") -> Dataset:
    """The source's attributes without pixel data, Type 2 Patient/Study attributes present.

    The pixel data is never read, so ``source`` may be a header read with its pixel data
    deferred (``dcmread(..., defer_size=...)``).

    Raises :class:`ResultError` when a required UID is missing.
    """
    missing = missing_attributes(source)
    if missing:
        raise ResultError(f"{what} lacks required attributes: {', '.join(missing)}")
    header = Dataset()
    tags = list(source.keys())  # not ``for element in source``: that would load every value
    for tag in tags:
        if tag not in PIXEL_TAGS:
            header.add(source[tag])
    for keyword in TYPE2_COPIED_ATTRIBUTES:
        if keyword not in header:
            logger.debug("source has no %s; the result records it empty", keyword)
            setattr(header, keyword, None)
    return header


def copy_study_attributes(header: Dataset, result: Dataset) -> None:
    """Give ``result`` the :data:`STUDY_LEVEL_ATTRIBUTES` of ``header`` (a
    :func:`source_header`), replacing its own."""
    for keyword in STUDY_LEVEL_ATTRIBUTES:
        if keyword in header:
            result.add(copy.deepcopy(header[keyword]))
