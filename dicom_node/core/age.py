"""The patient's age at the examination, from the header, for the model card's age limit.

Patient's Age (0010,1010) is an Age String (PS3.5 6.2, VR AS): three digits and one of
``D`` (days), ``W`` (weeks), ``M`` (months) or ``Y`` (years), e.g. ``045Y`` or ``018M``.  When it
is absent, the age is computed from Patient's Birth Date (0010,0030) and the Study Date
(0008,0020), else the Acquisition Date (0008,0022).  An age that is not stated, or is not
valid, is unknown: the model card allows it (most archives anonymise it away).  A reason names
the age, never the dates.
"""

from __future__ import annotations

import datetime
import re
from typing import Final

from pydicom.dataset import Dataset

_AGE_STRING: Final = re.compile(r"(\d{3})([DWMY])")
_DAYS_PER: Final = {"D": 1.0, "W": 7.0, "M": 365.25 / 12, "Y": 365.25}
_DATE: Final = re.compile(r"(\d{4})(\d{2})(\d{2})")


def parse_age_string(value: object) -> float | None:
    """Years for an Age String such as ``045Y`` or ``006M``; ``None`` if it is not one."""
    match = _AGE_STRING.fullmatch(str(value).strip().upper()) if value is not None else None
    if match is None:
        return None
    return int(match.group(1)) * _DAYS_PER[match.group(2)] / _DAYS_PER["Y"]


def _date(value: object) -> datetime.date | None:
    match = _DATE.fullmatch(str(value).strip()) if value else None
    if match is None:
        return None
    try:
        return datetime.date(*(int(part) for part in match.groups()))
    except ValueError:
        return None


def patient_age_years(dataset: Dataset) -> float | None:
    """The patient's age in years at the examination, or ``None`` when it is not known."""
    stated = parse_age_string(dataset.get("PatientAge"))
    if stated is not None:
        return stated
    birth = _date(dataset.get("PatientBirthDate"))
    examined = _date(dataset.get("StudyDate")) or _date(dataset.get("AcquisitionDate"))
    if birth is None or examined is None or examined < birth:
        return None
    return (examined - birth).days / _DAYS_PER["Y"]


def age_reasons(dataset: Dataset, minimum_years: float | None) -> list[str]:
    """Why the patient is too young for the model (below ``minimum_years``); empty when the age
    is at least the minimum, unknown, or no minimum applies."""
    if minimum_years is None:
        return []
    age = patient_age_years(dataset)
    if age is None or age >= minimum_years:
        return []
    return [f"patient age {age:.1f} years is below the model's minimum of {minimum_years:g} years"]
