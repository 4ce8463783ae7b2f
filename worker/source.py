"""What every result object (SR and SC) needs from its source image and copies from it."""

from __future__ import annotations

from typing import Final

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
