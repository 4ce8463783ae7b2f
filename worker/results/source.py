"""What every result object (SR and SC) needs from its source image, and the one copy of it.

:func:`source_header` is the source's header as the result builders see it: every attribute but
the pixel data, checked for the Type 1 UIDs a derived object must reference, with the Type 2
Patient and Study attributes present (empty when the source lacks them).
"""

from __future__ import annotations

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

PIXEL_KEYWORDS: Final = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def missing_attributes(dataset: Dataset) -> list[str]:
    """The :data:`REQUIRED_SOURCE_ATTRIBUTES` that ``dataset`` lacks or leaves empty."""
    return [kw for kw in REQUIRED_SOURCE_ATTRIBUTES if not dataset.get(kw)]


def source_header(source: Dataset, what: str = "source image") -> Dataset:
    """The source's attributes without pixel data, Type 2 Patient/Study attributes present.

    Raises :class:`ResultError` when a required UID is missing.
    """
    missing = missing_attributes(source)
    if missing:
        raise ResultError(f"{what} lacks required attributes: {', '.join(missing)}")
    header = Dataset()
    for element in source:
        if element.keyword not in PIXEL_KEYWORDS:
            header.add(element)
    for keyword in TYPE2_COPIED_ATTRIBUTES:
        if keyword not in header:
            logger.debug("source has no %s; the result records it empty", keyword)
            setattr(header, keyword, None)
    return header
