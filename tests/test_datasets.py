"""Data set readers: COVIDx split files, class folders, splitting, MONAI datasets."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from monai.data import DataLoader

from monai_bundle.scripts.datasets import (
    CLASS_NAMES,
    DatasetError,
    class_counts,
    mask_path_for,
    radiograph_dataset,
    read_class_folders,
    read_covidx_split,
    split_items,
)
from monai_bundle.scripts.phantoms import generate_dataset, make_phantom, write_dicom, write_png


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.png", "b.png", "c.jpg", "d.png"):
        (folder / name).write_bytes(b"")  # the reader checks existence, not content
    return folder


def write_split(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "train_COVIDx.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1 a.png normal rsna\n", [("a.png", 0, "1", "rsna")]),
        ("p1 a.png pneumonia\n", [("a.png", 1, "p1", "")]),
        (
            "7 a.png COVID-19 cohen\n\n   \n8\tb.png  normal   rsna\n",
            [("a.png", 2, "7", "cohen"), ("b.png", 0, "8", "rsna")],
        ),
        (
            "1 a.png normal x\n2 c.jpg pneumonia x\n3 d.png COVID-19 x",
            [("a.png", 0, "1", "x"), ("c.jpg", 1, "2", "x"), ("d.png", 2, "3", "x")],
        ),
    ],
)
def test_covidx_good_lines(
    tmp_path: Path, image_dir: Path, text: str, expected: list[tuple[str, int, str, str]]
) -> None:
    items = read_covidx_split(write_split(tmp_path, text), image_dir)
    assert [
        (Path(i["image"]).name, i["label"], i["patient_id"], i["source"]) for i in items
    ] == expected
    assert all(Path(i["image"]).parent == image_dir for i in items)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1 a.png\n", "line 1: expected '<patient id> <filename> <label> \\[<source>\\]', got 2"),
        ("1 a.png normal rsna extra\n", "line 1: .* got 5 fields"),
        (
            "1 a.png normal\n2 b.png covid\n",
            "line 2: unknown label 'covid'.*did you mean 'COVID-19'",
        ),
        ("1 a.png covid-19\n", "line 1: unknown label 'covid-19'.*did you mean 'COVID-19'"),
        ("1 a.png Normal\n", "did you mean 'normal'"),
        ("1 a.png flu\n", "line 1: unknown label 'flu', expected one of"),
        ("1 a.png positive rsna\n", "line 1: label 'positive' comes from a binary COVIDx split"),
        ("\n\n1 a.png negative\n", "line 3: .*3-class split file"),
        ("1 missing.png normal\n", "line 1: image 'missing.png' not found"),
    ],
)
def test_covidx_bad_lines(tmp_path: Path, image_dir: Path, text: str, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        read_covidx_split(write_split(tmp_path, text), image_dir)


def test_covidx_unchecked_files_and_duplicates(
    tmp_path: Path, image_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = "1 missing.png normal\n1 missing.png normal\n2 b.png COVID-19\n"
    with caplog.at_level(logging.WARNING):
        items = read_covidx_split(write_split(tmp_path, text), image_dir, check_files=False)
    assert [i["label"] for i in items] == [0, 2]
    assert "line 2: image listed again" in caplog.text


def test_covidx_split_written_by_phantom_generator(tmp_path: Path) -> None:
    counts = {"normal": 4, "pneumonia": 3, "COVID-19": 2}
    generate_dataset(tmp_path, counts, size=64, splits={"train": 0.5, "test": 0.5})
    train = read_covidx_split(tmp_path / "train.txt", tmp_path)
    test = read_covidx_split(tmp_path / "test.txt", tmp_path)
    assert sum(class_counts(train + test).values()) == 9
    assert class_counts(train + test) == counts
    assert {i["image"] for i in train} == {
        i["image"] for i in read_class_folders(tmp_path / "train")
    }


# --------------------------------------------------------------------------------------------
# Class folders.


@pytest.mark.parametrize("fmt", ["png", "dcm"])
def test_class_folders_from_phantoms(tmp_path: Path, fmt: str) -> None:
    counts = {"normal": 2, "pneumonia": 3, "COVID-19": 1}
    generate_dataset(tmp_path, counts, size=64, fmt=fmt)  # type: ignore[arg-type]
    (tmp_path / "normal" / "README.txt").write_text("not an image")
    (tmp_path / "normal" / ".hidden.png").write_bytes(b"")
    (tmp_path / ".cache").mkdir()
    items = read_class_folders(tmp_path)
    assert class_counts(items) == counts
    assert [i["label"] for i in items] == [0, 0, 1, 1, 1, 2]
    assert all(Path(i["image"]).suffix == f".{fmt}" for i in items)
    assert not any("_mask" in i["image"] for i in items)
    with_masks = read_class_folders(tmp_path, with_masks=True)
    assert all(Path(i["mask"]) == mask_path_for(i["image"]) for i in with_masks)


def test_class_folders_mixed_suffixes_and_suffixless_dicom(tmp_path: Path) -> None:
    for label in CLASS_NAMES:
        (tmp_path / label).mkdir()
    write_png(make_phantom("normal", 64, 0), tmp_path / "normal" / "x.PNG")
    (tmp_path / "normal" / "y.jpeg").write_bytes(b"")
    write_dicom(make_phantom("pneumonia", 64, 0), tmp_path / "pneumonia" / "IM0001")
    (tmp_path / "pneumonia" / "notes").write_text("plain text, no suffix")
    items = read_class_folders(tmp_path)
    assert [(Path(i["image"]).name, i["label"]) for i in items] == [
        ("x.PNG", 0),
        ("y.jpeg", 0),
        ("IM0001", 1),
    ]


@pytest.mark.parametrize(
    ("folder", "message"),
    [
        ("covid", "unknown class folder\\(s\\) \\['covid'\\].*did you mean 'COVID-19'"),
        ("Normal", "did you mean 'normal'"),
        ("viral", "unknown class folder\\(s\\) \\['viral'\\]"),
    ],
)
def test_class_folders_unknown_folder(tmp_path: Path, folder: str, message: str) -> None:
    (tmp_path / "normal").mkdir()
    (tmp_path / folder).mkdir()
    with pytest.raises(DatasetError, match=message):
        read_class_folders(tmp_path)


def test_class_folders_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="is not a folder"):
        read_class_folders(tmp_path / "nowhere")
    (tmp_path / "normal").mkdir()
    write_png(make_phantom("normal", 64, 0), tmp_path / "normal" / "a.png")
    with pytest.raises(DatasetError, match=r"mask a_mask\.png not found"):
        read_class_folders(tmp_path, with_masks=True)


# --------------------------------------------------------------------------------------------
# Counting and splitting.


def items_for(counts: dict[int, int], patients: int | None = None) -> list[dict[str, object]]:
    items: list[dict[str, object]] = []
    for label, n in counts.items():
        for i in range(n):
            item: dict[str, object] = {"image": f"{label}-{i}.png", "label": label}
            if patients:
                item["patient_id"] = f"{label}-p{i % patients}"
            items.append(item)
    return items


def test_class_counts_in_class_order() -> None:
    assert class_counts(items_for({2: 3, 0: 1})) == {"normal": 1, "pneumonia": 0, "COVID-19": 3}
    assert class_counts([]) == dict.fromkeys(CLASS_NAMES, 0)


@pytest.mark.parametrize(
    ("counts", "fraction", "expected_val"),
    [
        ({0: 100, 1: 50, 2: 10}, 0.2, {"normal": 20, "pneumonia": 10, "COVID-19": 2}),
        ({0: 10, 1: 10, 2: 2}, 0.5, {"normal": 5, "pneumonia": 5, "COVID-19": 1}),
        ({0: 30, 1: 3, 2: 2}, 0.1, {"normal": 3, "pneumonia": 1, "COVID-19": 1}),
        ({0: 5, 1: 1}, 0.2, {"normal": 1, "pneumonia": 0, "COVID-19": 0}),
        ({0: 5, 1: 5}, 0.0, {"normal": 0, "pneumonia": 0, "COVID-19": 0}),
    ],
)
def test_split_is_stratified_complete_and_deterministic(
    counts: dict[int, int], fraction: float, expected_val: dict[str, int]
) -> None:
    items = items_for(counts)
    train, val = split_items(items, fraction, seed=3)
    assert class_counts(val) == expected_val
    assert sorted(map(str, train + val)) == sorted(map(str, items))
    assert split_items(items, fraction, seed=3) == (train, val)
    if fraction and len(items) > 10:
        assert split_items(items, fraction, seed=4)[1] != val


def test_split_keeps_patients_together() -> None:
    items = items_for({0: 60, 1: 40, 2: 12}, patients=4)
    train, val = split_items(items, 0.25, seed=0)
    train_patients = {i["patient_id"] for i in train}
    val_patients = {i["patient_id"] for i in val}
    assert train_patients.isdisjoint(val_patients)
    assert all(n > 0 for n in class_counts(val).values())
    # Without groups each item moves alone.
    _, val_items = split_items(items, 0.25, seed=0, group_key=None)
    assert class_counts(val_items) == {"normal": 15, "pneumonia": 10, "COVID-19": 3}


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_split_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        split_items(items_for({0: 4}), fraction)


# --------------------------------------------------------------------------------------------
# MONAI datasets.


@pytest.mark.parametrize("cache", [False, True])
def test_radiograph_dataset_loads_batches(tmp_path: Path, cache: bool) -> None:
    generate_dataset(tmp_path, {"normal": 2, "pneumonia": 1, "COVID-19": 1}, size=64, fmt="dcm")
    items = read_class_folders(tmp_path)
    dataset = radiograph_dataset(items, size=32, cache=cache)
    assert len(dataset) == 4
    first = dataset[0]
    assert first["image"].shape == (1, 32, 32) and first["label"] == 0
    batch = next(iter(DataLoader(dataset, batch_size=4)))
    assert batch["image"].shape == (4, 1, 32, 32)
    assert batch["image"].dtype == torch.float32
    assert batch["label"].tolist() == [0, 0, 1, 2]
    assert float(batch["image"].min()) >= 0.0 and float(batch["image"].max()) <= 1.0
