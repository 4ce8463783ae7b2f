"""DICOM test data: pydicom-data's real radiographs, copies with fresh UIDs, comparisons."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from monai_bundle.scripts.phantoms import make_phantom, phantom_dataset


def testdata(name: str) -> Path:
    """A file of pydicom's test data (installed with pydicom-data; never downloaded)."""
    path = get_testdata_file(name)
    assert isinstance(path, str), f"pydicom test file {name} is missing"
    return Path(path)


RG1_UNCR = testdata("RG1_UNCR.dcm")
RG1_J2KR = testdata("RG1_J2KR.dcm")
CT_SMALL = testdata("CT_small.dcm")
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"


def make_instance(
    source: Path,
    target: Path,
    *,
    study_uid: str | None = None,
    fix_pixel_spacing: bool = True,
    **attributes: Any,
) -> Dataset:
    """Copy ``source`` with fresh UIDs (or ``study_uid``) and the given header changes.

    RG1's Pixel Spacing is ``0\\0``, which dciodvfy reports as an error; ``fix_pixel_spacing``
    gives it a plausible value so that the copies are valid CR objects.
    """
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if fix_pixel_spacing and "PixelSpacing" in ds:
        ds.PixelSpacing = [0.171, 0.171]
    return _edited_and_saved(ds, attributes, target)


def _edited_and_saved(ds: Dataset, attributes: dict[str, Any], target: Path) -> Dataset:
    """Set each attribute of ``attributes`` on ``ds`` (``None`` deletes it), save to ``target``."""
    for keyword, value in attributes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    return ds


TRAILING_PADDING = 0xFFFCFFFC


def same_content(a: Path, b: Path) -> bool:
    """Whether two files hold the same data set, pixel data included.

    The file meta and Data Set Trailing Padding (FFFC,FFFC), which senders may drop
    (PS3.10 7.2), are not content.
    """
    first, second = pydicom.dcmread(a), pydicom.dcmread(b)
    for ds in (first, second):
        if TRAILING_PADDING in ds:
            del ds[TRAILING_PADDING]
    return bool(first == second) and first.PixelData == second.PixelData


#: The seed of :func:`phantom_cr`'s default phantom: far from every training and test seed.
PHANTOM_SEED = 20_261_130


def phantom_cr(
    target: Path,
    label: str = "COVID-19",
    seed: int = PHANTOM_SEED,
    *,
    size: int = 512,
    study_uid: str | None = None,
    **attributes: Any,
) -> Dataset:
    """A synthetic phantom (not clinical data) as a CR frontal chest with fresh UIDs: the kind
    of image the demo weights were trained on, so the model assesses it (a real radiograph
    such as RG1 is refused by the demo weights' gate).  ``attributes`` change the header."""
    ds = phantom_dataset(
        make_phantom(label, size, seed),
        study_uid=study_uid or generate_uid(),
        series_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
    )
    return _edited_and_saved(ds, attributes, target)
