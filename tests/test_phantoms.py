"""Synthetic phantoms: anatomy, lesions, determinism, PNG/DICOM writers, data sets and CLI."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from monai_bundle.scripts.datasets import MASK_SUFFIX
from monai_bundle.scripts.phantoms import (
    CLASS_NAMES,
    CR_IMAGE_STORAGE,
    DX_IMAGE_STORAGE_FOR_PRESENTATION,
    PHANTOM_PATIENT_NAME,
    generate_dataset,
    image_seed,
    main,
    make_phantom,
    phantom_dataset,
    write_dicom,
    write_mask_png,
    write_png,
)
from monai_bundle.scripts.preprocessing import load_dicom_image, load_image

DCIODVFY = shutil.which("dciodvfy")


def dciodvfy_errors(path: Path) -> list[str]:
    """The 'Error' lines dciodvfy prints for ``path`` (its exit status is not reliable)."""
    assert DCIODVFY is not None
    result = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, check=False)
    return [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]


@pytest.mark.parametrize(
    ("label", "size"),
    [(label, size) for label in CLASS_NAMES for size in (64, 128, (96, 80), 256)],
)
def test_phantom_shape_range_and_mask(label: str, size: int | tuple[int, int]) -> None:
    phantom = make_phantom(label, size, seed=3)
    shape = (size, size) if isinstance(size, int) else size
    assert phantom.image.shape == shape
    assert phantom.image.dtype == np.float32
    assert phantom.lesion_mask.shape == shape
    assert phantom.lesion_mask.dtype == np.bool_
    assert 0.0 <= phantom.image.min() < 0.2
    assert 0.6 < phantom.image.max() <= 1.0
    assert phantom.label == label
    if label == "normal":
        assert not phantom.lesion_mask.any()
    else:
        assert phantom.lesion_mask.any()


@pytest.mark.parametrize("label", CLASS_NAMES)
def test_same_seed_same_image_other_seed_other_image(label: str) -> None:
    first = make_phantom(label, 128, seed=11)
    again = make_phantom(label, 128, seed=11)
    other = make_phantom(label, 128, seed=12)
    np.testing.assert_array_equal(first.image, again.image)
    np.testing.assert_array_equal(first.lesion_mask, again.lesion_mask)
    assert np.abs(first.image - other.image).mean() > 0.01


@pytest.mark.parametrize("seed", range(6))
def test_anatomy_lungs_dark_mediastinum_bright(seed: int) -> None:
    image = make_phantom("normal", 256, seed).image
    right_lung = image[100:140, 50:80].mean()
    left_lung = image[100:140, 176:206].mean()
    mediastinum = image[100:140, 120:136].mean()
    abdomen = image[225:250, 60:196].mean()
    outside = image[20:60, 0:4].mean()
    assert right_lung < mediastinum - 0.2
    assert left_lung < mediastinum - 0.2
    assert right_lung < abdomen - 0.2
    assert outside < right_lung


# Minimum mean brightening inside the lesion mask, over several seeds: consolidation is dense,
# ground glass is subtle but well above the noise (sd <= 0.016).
@pytest.mark.parametrize(
    ("label", "min_contrast", "max_contrast"),
    [
        ("pneumonia", 0.15, 0.40),
        ("COVID-19", 0.03, 0.12),
    ],
)
def test_lesions_visible_inside_mask(label: str, min_contrast: float, max_contrast: float) -> None:
    for seed in range(8):
        normal = make_phantom("normal", 128, seed)
        sick = make_phantom(label, 128, seed)
        mask = sick.lesion_mask
        contrast = float((sick.image - normal.image)[mask].mean())
        assert min_contrast < contrast < max_contrast, (seed, contrast)
        # Same seed, same patient: away from the lesion the images agree closely.
        far = ~_dilate(mask, 12)
        assert float(np.abs(sick.image - normal.image)[far].mean()) < 0.01


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


@pytest.mark.parametrize("seed", range(8))
def test_covid_bilateral_peripheral_lower_zone(seed: int) -> None:
    mask = make_phantom("COVID-19", 256, seed).lesion_mask
    rows, cols = np.nonzero(mask)
    assert (cols < 128).any() and (cols >= 128).any(), "ground glass must be bilateral"
    # Peripheral: far from the midline; lower zone: below the hila.
    assert np.abs(cols - 127.5).mean() > 60
    assert rows.mean() > 0.45 * 256


@pytest.mark.parametrize("seed", range(8))
def test_pneumonia_is_one_focal_region_in_one_lung(seed: int) -> None:
    mask = make_phantom("pneumonia", 256, seed).lesion_mask
    cols = np.nonzero(mask)[1]
    assert (cols < 128).all() or (cols >= 128).all(), "consolidation must be in one lung"
    assert 0.005 < mask.mean() < 0.2


@pytest.mark.parametrize(
    ("label", "size", "seed"),
    [("flu", 64, 0), ("normal", 32, 0), ("normal", 5000, 0), ("normal", 64, -1)],
)
def test_make_phantom_rejects_bad_arguments(label: str, size: int, seed: int) -> None:
    with pytest.raises(ValueError):
        make_phantom(label, size, seed)


def test_generation_is_fast_at_256() -> None:
    make_phantom("COVID-19", 256, 0)
    times = []
    for seed in range(9):
        start = time.process_time()
        make_phantom(CLASS_NAMES[seed % 3], 256, seed)
        times.append(time.process_time() - start)
    # The minimum is robust to other processes sharing the CPU.
    assert min(times) < 0.05, times


@pytest.mark.parametrize("bit_depth", [8, 16])
def test_write_png_round_trip(tmp_path: Path, bit_depth: int) -> None:
    phantom = make_phantom("pneumonia", 96, 4)
    path = write_png(phantom, tmp_path / "p.png", bit_depth=bit_depth)  # type: ignore[arg-type]
    back = load_image(path)
    assert back.shape == (96, 96)
    assert np.abs(back - phantom.image).max() <= 0.5 / (2**bit_depth - 1) + 1e-6
    mask_path = write_mask_png(phantom, tmp_path / f"p{MASK_SUFFIX}.png")
    mask = np.asarray(Image.open(mask_path))
    np.testing.assert_array_equal(mask > 127, phantom.lesion_mask)


DICOM_CASES = [
    *itertools.product(("CR", "DX"), ("MONOCHROME1", "MONOCHROME2"), (12, 16)),
    ("CR", "MONOCHROME2", 8),
    ("DX", "MONOCHROME1", 8),
    ("DX", "MONOCHROME2", 14),
]


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) is not installed")
@pytest.mark.parametrize(("modality", "photometric", "bits"), DICOM_CASES)
def test_write_dicom_valid_and_round_trips(
    tmp_path: Path, modality: str, photometric: str, bits: int
) -> None:
    phantom = make_phantom("COVID-19", 128, 5)
    path = tmp_path / "phantom.dcm"
    write_dicom(
        phantom,
        path,
        modality=modality,  # type: ignore[arg-type]
        photometric=photometric,  # type: ignore[arg-type]
        bits_stored=bits,
    )
    assert dciodvfy_errors(path) == []
    ds = pydicom.dcmread(path)
    expected_sop = CR_IMAGE_STORAGE if modality == "CR" else DX_IMAGE_STORAGE_FOR_PRESENTATION
    assert ds.SOPClassUID == expected_sop
    assert ds.file_meta.MediaStorageSOPClassUID == expected_sop
    assert ds.Modality == modality
    assert ds.PhotometricInterpretation == photometric
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (8 if bits == 8 else 16, bits, bits - 1)
    assert ds.PixelRepresentation == 0
    assert str(ds.PatientName) == PHANTOM_PATIENT_NAME
    assert "NOT CLINICAL" in ds.SeriesDescription and "NOT CLINICAL" in ds.ImageComments
    assert (ds.BodyPartExamined, ds.ViewPosition) == ("CHEST", "PA")
    assert list(ds.PatientOrientation) == ["L", "F"]
    assert ds.pixel_array.max() <= 2**bits - 1
    if modality == "DX":
        assert ds.PresentationIntentType == "FOR PRESENTATION"
        expected_shape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
        assert ds.PresentationLUTShape == expected_shape
    # The pre-processing pipeline gives the phantom image back, up to quantisation.
    back = load_dicom_image(path)
    assert np.abs(back - phantom.image).max() <= 0.5 / (2**bits - 1) + 1e-6


@pytest.mark.parametrize("view", ["PA", "AP", "LL"])
def test_dicom_uids_deterministic_and_distinct(view: str) -> None:
    phantom = make_phantom("normal", 64, 1)
    first = phantom_dataset(phantom, view_position=view)
    again = phantom_dataset(phantom, view_position=view)
    other = phantom_dataset(phantom, view_position=view, photometric="MONOCHROME1")
    assert first.SOPInstanceUID == again.SOPInstanceUID
    assert first.SOPInstanceUID != other.SOPInstanceUID
    assert first.StudyInstanceUID == other.StudyInstanceUID
    assert first.SOPInstanceUID.startswith("2.25.") and len(first.SOPInstanceUID) <= 64
    assert first.ViewPosition == view


@pytest.mark.parametrize(
    "kwargs",
    [{"modality": "CT"}, {"photometric": "RGB"}, {"bits_stored": 7}, {"bits_stored": 17}],
)
def test_phantom_dataset_rejects_bad_encoding(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        phantom_dataset(make_phantom("normal", 64, 0), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["png", "dcm"])
def test_generate_dataset_layout(tmp_path: Path, fmt: str) -> None:
    counts = {"normal": 3, "pneumonia": 2, "COVID-19": 1}
    written = generate_dataset(tmp_path, counts, size=64, seed=7, fmt=fmt)  # type: ignore[arg-type]
    assert len(written) == 6
    for item in written:
        assert item.image.parent == tmp_path / item.label
        assert item.image.suffix == f".{fmt}"
        assert item.mask == item.image.with_name(f"{item.image.stem}{MASK_SUFFIX}.png")
        assert item.image.is_file() and item.mask.is_file()
    for label in CLASS_NAMES:
        seeds = [w.seed for w in written if w.label == label]
        assert seeds == [image_seed(7, label, i) for i in range(counts[label])]
    lines = (tmp_path / "phantoms.txt").read_text().splitlines()
    assert len(lines) == 6
    assert all(len(line.split()) == 4 and line.endswith(" phantom") for line in lines)
    # Deterministic: a second run, in two worker processes, writes the same files in order.
    again = generate_dataset(tmp_path / "again", counts, size=64, seed=7, fmt=fmt, workers=2)  # type: ignore[arg-type]
    assert [w.seed for w in again] == [w.seed for w in written]
    for a, b in zip(written, again, strict=True):
        np.testing.assert_array_equal(load_image(a.image), load_image(b.image))
    assert (tmp_path / "again" / "phantoms.txt").read_text().splitlines() == [
        line.replace(str(tmp_path), str(tmp_path / "again")) for line in lines
    ]


@pytest.mark.parametrize(
    ("splits", "expected"),
    [
        ({"train": 0.8, "test": 0.2}, {"train": 8, "test": 2}),
        ({"train": 0.5, "val": 0.25, "test": 0.25}, {"train": 5, "val": 3, "test": 2}),
    ],
)
def test_generate_dataset_splits(
    tmp_path: Path, splits: dict[str, float], expected: dict[str, int]
) -> None:
    written = generate_dataset(tmp_path, {"normal": 10}, size=64, seed=1, splits=splits)
    per_split = {name: sum(1 for w in written if w.split == name) for name in splits}
    assert per_split == expected
    for name, n in expected.items():
        images = [
            p
            for p in (tmp_path / name / "normal").glob("*.png")
            if not p.stem.endswith(MASK_SUFFIX)
        ]
        assert len(images) == n
        assert len((tmp_path / f"{name}.txt").read_text().splitlines()) == n


@pytest.mark.parametrize("bad", [{"flu": 1}, {"normal": 1, "COVID": 2}])
def test_generate_dataset_rejects_unknown_class(tmp_path: Path, bad: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="unknown class"):
        generate_dataset(tmp_path, bad, size=64)


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) is not installed")
def test_cli_writes_valid_dicom(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(
        [
            "--out",
            str(tmp_path),
            "--n",
            "1",
            "--size",
            "64",
            "--format",
            "dcm",
            "--modality",
            "DX",
            "--photometric",
            "MONOCHROME1",
            "--bits-stored",
            "14",
            "--no-progress",
        ]
    )
    assert status == 0
    assert "not clinical" in capsys.readouterr().out
    files = sorted(tmp_path.glob("*/*.dcm"))
    assert [f.parent.name for f in files] == sorted(CLASS_NAMES)
    for path in files:
        assert dciodvfy_errors(path) == []
        ds = pydicom.dcmread(path)
        assert (ds.Modality, ds.PhotometricInterpretation, ds.BitsStored) == (
            "DX",
            "MONOCHROME1",
            14,
        )


@pytest.mark.parametrize(
    ("argv", "status"),
    [
        (["--help"], 0),
        (["--n", "1"], 2),
        (["--out", "x", "--format", "tif"], 2),
        (["--out", "x", "--splits", "train"], 2),
    ],
)
def test_cli_help_and_usage_errors(argv: list[str], status: int) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == status
