"""CoroNet as a DICOM device: who made a result object, and with what software.

Every object the worker writes (SR, heatmap SC) names this software in the General and
Enhanced General Equipment attributes (PS3.3 C.7.5.1), as the device observer of an SR
(PS3.16 TID 1004) and in the Contributing Equipment Sequence (PS3.3 C.12.1.1.5), so a
reader can always tell an AI result from a human report.
"""

from __future__ import annotations

import datetime
from typing import Final

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.valuerep import DT

from dicom_node import __version__ as PACKAGE_VERSION
from dicom_node.core.errors import ResultError

MANUFACTURER: Final = "CoroNet open-source project"
MANUFACTURER_MODEL_NAME: Final = "CoroNet DICOM node"
PACKAGE_NAME: Final = "coronet-dicom-node"

#: Device Observer Name (TID 1004 row 2).
DEVICE_OBSERVER_NAME: Final = "CoroNet"
#: Device Observer UID (TID 1004 row 1): generated once with ``generate_uid(prefix=None)``;
#: it identifies this software product, so it never changes.
DEVICE_OBSERVER_UID: Final = "2.25.147698318026177397950993067766891227300"
#: Device Serial Number.  Software has no hardware serial; every installation reports the
#: same product identifier, and the software versions tell releases apart.
DEVICE_SERIAL_NUMBER: Final = "CORONET-OSS-1"

#: Description written to the Contributing Equipment item of every result.
CONTRIBUTION_DESCRIPTION: Final = "CoroNet chest radiograph classification (AI result)"

#: IHE AI Results (AIR) Purpose of Reference for the equipment that ran the algorithm.
CODING_SCHEME_IHE: Final = "99IHE"
PURPOSE_PROCESSING_ALGORITHM: Final = CodedConcept(
    value="Newcode1", scheme_designator=CODING_SCHEME_IHE, meaning="Processing Algorithm"
)

_LO_MAX = 64  # PS3.5 6.2: Long String holds at most 64 characters


def ihe_coding_scheme() -> CodingSchemeIdentificationItem:
    """Coding Scheme Identification item declaring ``99IHE`` (PS3.3 C.12.1.1.2)."""
    return CodingSchemeIdentificationItem(
        designator=CODING_SCHEME_IHE,
        name="IHE proposed codes",
        responsible_organization="IHE International",
    )


def software_versions(model_version: str) -> tuple[str, str]:
    """Software Versions (0018,1020): this package's version and the model's version."""
    values = (f"{PACKAGE_NAME} {PACKAGE_VERSION}", f"model {model_version}")
    for value in values:
        if len(value) > _LO_MAX or "\\" in value:
            raise ResultError(f"software version {value!r} does not fit an LO value")
    return values


def contributing_equipment_item(
    model_version: str,
    *,
    contribution_time: datetime.datetime,
    institution_name: str | None = None,
) -> Dataset:
    """Contributing Equipment Sequence item for this software as the processing algorithm.

    IHE AIR asks for Purpose of Reference (Newcode1, 99IHE, "Processing Algorithm"); the
    caller must also declare :func:`ihe_coding_scheme` in the Coding Scheme Identification
    Sequence.
    """
    item = Dataset()
    item.Manufacturer = MANUFACTURER
    if institution_name is not None:
        item.InstitutionName = institution_name
    item.ManufacturerModelName = MANUFACTURER_MODEL_NAME
    item.DeviceSerialNumber = DEVICE_SERIAL_NUMBER
    item.SoftwareVersions = list(software_versions(model_version))
    item.PurposeOfReferenceCodeSequence = [PURPOSE_PROCESSING_ALGORITHM]
    item.ContributionDateTime = DT(contribution_time)
    item.ContributionDescription = CONTRIBUTION_DESCRIPTION
    return item
