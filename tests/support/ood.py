"""Images the model never saw, each written as a frontal chest CR so that only the image content
can tell: real radiographs (pydicom-data's adult PA chest RG1 in both polarities), other body
parts and modalities re-tagged CR/CHEST/PA (CT_small, MR_small, the knee RG3), uniform noise, a
step image, and phantoms at the wrong polarity.  Built at run time from what pydicom ships;
nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Final

import numpy as np
import pydicom
from pydicom.uid import UID, generate_uid

from monai_bundle.scripts.phantoms import Phantom, make_phantom, phantom_dataset
from tests.support.dicom_data import CR_IMAGE_STORAGE, CT_SMALL, RG1_UNCR, testdata

MR_SMALL: Final = testdata("MR_small.dcm")
RG3_UNCR: Final = testdata("RG3_UNCR.dcm")  # a knee radiograph
CHEST_PA: Final = {"Modality": "CR", "BodyPartExamined": "CHEST", "ViewPosition": "PA"}
#: Phantom seeds of the wrong-polarity images, far from those of training and tests.
WRONG_POLARITY_SEEDS: Final = (700_001, 700_002, 700_003)
SYNTHETIC_SIZE: Final = 256


def retagged(source: Path, target: Path, *, invert: bool = False) -> Path:
    """``source`` as a CR frontal chest with fresh UIDs; ``invert`` flips its polarity (the
    pixel values stay, MONOCHROME1 and MONOCHROME2 swap)."""
    ds = pydicom.dcmread(source)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(CR_IMAGE_STORAGE)
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in CHEST_PA.items():
        setattr(ds, keyword, value)
    for keyword in ("PatientAge", "PatientBirthDate"):  # the image alone must be refused
        if keyword in ds:
            delattr(ds, keyword)
    if "PixelSpacing" in ds and [float(v) for v in ds.PixelSpacing] == [0.0, 0.0]:
        ds.PixelSpacing = [0.171, 0.171]  # RG1's 0\0 is not a plausible spacing
    if invert:
        flipped = {"MONOCHROME1": "MONOCHROME2", "MONOCHROME2": "MONOCHROME1"}
        ds.PhotometricInterpretation = flipped[ds.PhotometricInterpretation]
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    return target


def synthetic(image: np.ndarray, target: Path, seed: int, *, wrong_polarity: bool = False) -> Path:
    """A CR frontal chest instance holding ``image`` (float in [0, 1], MONOCHROME2 sense);
    ``wrong_polarity`` tags it MONOCHROME1 without inverting the values."""
    empty = np.zeros(image.shape, dtype=bool)
    phantom = Phantom(image.astype(np.float32), empty, "normal", seed, empty)
    ds = phantom_dataset(phantom, study_uid=generate_uid(), sop_instance_uid=generate_uid())
    if wrong_polarity:
        ds.PhotometricInterpretation = "MONOCHROME1"
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    return target


def _noise(target: Path) -> Path:
    rng = np.random.default_rng(0)
    return synthetic(rng.random((SYNTHETIC_SIZE, SYNTHETIC_SIZE)), target, 1)


def _step(target: Path) -> Path:
    image = np.zeros((SYNTHETIC_SIZE, SYNTHETIC_SIZE))
    image[:, SYNTHETIC_SIZE // 2 :] = 1.0
    return synthetic(image, target, 2)


def _wrong_polarity(seed: int) -> Callable[[Path], Path]:
    def write(target: Path) -> Path:
        phantom = make_phantom("normal", SYNTHETIC_SIZE, seed)
        return synthetic(phantom.image, target, seed, wrong_polarity=True)

    return write


#: Every kind of image the gate must refuse, by name.
KINDS: Final[dict[str, Callable[[Path], Path]]] = {
    "RG1 chest": lambda target: retagged(RG1_UNCR, target),
    "RG1 chest, inverted": lambda target: retagged(RG1_UNCR, target, invert=True),
    "CT_small": lambda target: retagged(CT_SMALL, target),
    "MR_small": lambda target: retagged(MR_SMALL, target),
    "RG3 knee": lambda target: retagged(RG3_UNCR, target),
    "uniform noise": _noise,
    "step image": _step,
    **{f"phantom {seed}, wrong polarity": _wrong_polarity(seed) for seed in WRONG_POLARITY_SEEDS},
}


def write_ood_set(folder: Path) -> dict[str, Path]:
    """Write every kind into ``folder``; returns ``{name: file}``."""
    return {
        name: write(folder / f"ood-{index:02d}.dcm")
        for index, (name, write) in enumerate(KINDS.items())
    }
