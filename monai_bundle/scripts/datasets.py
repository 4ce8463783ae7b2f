"""Data set readers for CoroNet: COVIDx split files and class folders.

Both readers return a list of items ``{"image": str path, "label": int}`` (COVIDx items also
carry ``"patient_id"`` and ``"source"``), ready for ``monai.data.Dataset`` / ``CacheDataset``
with ``LoadRadiographd(keys="image")``; ``radiograph_dataset`` builds that pairing.  Labels
index ``CLASS_NAMES``, the model's output order.

Errors in the input (unknown labels or class folders, malformed lines, missing files) raise
``DatasetError`` (a ``ValueError``) naming the file and line or folder.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .classes import CLASS_NAMES

if TYPE_CHECKING:
    from monai.data import Dataset as MonaiDataset

__all__ = [
    "BINARY_LABELS",
    "CLASS_NAMES",
    "IMAGE_SUFFIXES",
    "MASK_SUFFIX",
    "DatasetError",
    "class_counts",
    "mask_path_for",
    "radiograph_dataset",
    "read_class_folders",
    "read_covidx_split",
    "split_items",
]

logger = logging.getLogger(__name__)

Item = dict[str, Any]

# Newer COVIDx releases (v8 and later) are binary: COVID-19 positive or negative.
BINARY_LABELS: tuple[str, ...] = ("positive", "negative")
# Phantom lesion masks sit beside their image as "<stem>_mask.png"; readers skip them.
MASK_SUFFIX = "_mask"
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
# COVIDx split lines: <patient id> <filename> <label> [<source>]
COVIDX_MIN_FIELDS = 3
COVIDX_MAX_FIELDS = 4


class DatasetError(ValueError):
    """A split file or folder tree does not describe a valid 3-class data set."""


def _did_you_mean(value: str, choices: Iterable[str]) -> str:
    """MONAI-style hint: the choice equal to ``value`` up to case, or the closest one."""
    folded = {c.casefold(): c for c in choices}
    close = difflib.get_close_matches(value.casefold(), list(folded), n=1, cutoff=0.6)
    return f"; did you mean {folded[close[0]]!r}?" if close else ""


def _label_index(label: str, where: str) -> int:
    if label in CLASS_NAMES:
        return CLASS_NAMES.index(label)
    if label.casefold() in BINARY_LABELS:
        raise DatasetError(
            f"{where}: label {label!r} comes from a binary COVIDx split (positive/negative); "
            f"CoroNet's 3-class task needs a 3-class split file with labels {CLASS_NAMES}"
        )
    raise DatasetError(
        f"{where}: unknown label {label!r}, expected one of {CLASS_NAMES}"
        + _did_you_mean(label, CLASS_NAMES)
    )


def read_covidx_split(
    split_file: str | os.PathLike[str],
    image_dir: str | os.PathLike[str],
    *,
    check_files: bool = True,
) -> list[Item]:
    """Read a COVIDx split file: one ``<patient id> <filename> <label> [<source>]`` per line.

    Labels must be exactly ``normal``, ``pneumonia`` or ``COVID-19`` (a near miss such as
    ``covid-19`` is an error that suggests the right spelling); binary ``positive``/``negative``
    files are refused with an explanation.  Blank lines are skipped.  File names resolve
    against ``image_dir``; with ``check_files`` every image must exist.
    """
    split_path = Path(split_file)
    root = Path(image_dir)
    items: list[Item] = []
    seen: set[str] = set()
    duplicates = 0
    with split_path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"{split_path.name} line {number}"
            if not COVIDX_MIN_FIELDS <= len(fields) <= COVIDX_MAX_FIELDS:
                raise DatasetError(
                    f"{where}: expected '<patient id> <filename> <label> [<source>]', "
                    f"got {len(fields)} fields"
                )
            patient_id, filename, label = fields[:3]
            source = fields[3] if len(fields) == COVIDX_MAX_FIELDS else ""
            index = _label_index(label, where)
            path = root / filename
            if check_files and not path.is_file():
                raise DatasetError(f"{where}: image {filename!r} not found in {root}")
            if filename in seen:
                duplicates += 1
                logger.warning("%s: image listed again; keeping the first entry", where)
                continue
            seen.add(filename)
            items.append(
                {"image": str(path), "label": index, "patient_id": patient_id, "source": source}
            )
    logger.info(
        "read %d items from %s (%d duplicates skipped): %s",
        len(items),
        split_path.name,
        duplicates,
        class_counts(items),
    )
    return items


def _is_mask(path: Path) -> bool:
    return path.stem.endswith(MASK_SUFFIX)


def mask_path_for(image: str | os.PathLike[str]) -> Path:
    """Where the phantom generator puts the lesion mask of ``image``."""
    path = Path(image)
    return path.with_name(f"{path.stem}{MASK_SUFFIX}.png")


def read_class_folders(root: str | os.PathLike[str], *, with_masks: bool = False) -> list[Item]:
    """Read ``root/<class>/<image>`` for class folders named as in ``CLASS_NAMES``.

    Images are ``IMAGE_SUFFIXES`` files (any case) and suffix-less DICOM files; masks
    (``*_mask.png``), hidden files and other files are skipped.  A folder that is not a class
    name is an error (with a suggestion); a missing class folder is allowed.  With
    ``with_masks`` every image must have its mask (see ``mask_path_for``), added as ``"mask"``.
    Items are sorted by class, then path.
    """
    from .preprocessing import is_dicom_file

    base = Path(root)
    if not base.is_dir():
        raise DatasetError(f"{base} is not a folder")
    folders = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in folders if p.name not in CLASS_NAMES]
    if unknown:
        hints = "".join(_did_you_mean(name, CLASS_NAMES) for name in unknown[:1])
        raise DatasetError(
            f"{base}: unknown class folder(s) {unknown}; expected {CLASS_NAMES}{hints}"
        )
    items: list[Item] = []
    for index, name in enumerate(CLASS_NAMES):
        folder = base / name
        if not folder.is_dir():
            logger.warning("%s: no folder for class %s", base, name)
            continue
        for path in sorted(folder.iterdir()):
            if not path.is_file() or path.name.startswith(".") or _is_mask(path):
                continue
            suffix = path.suffix.lower()
            if suffix not in IMAGE_SUFFIXES and not (suffix == "" and is_dicom_file(path)):
                logger.debug("skipping %s: not an image file", path.name)
                continue
            item: Item = {"image": str(path), "label": index}
            if with_masks:
                mask = mask_path_for(path)
                if not mask.is_file():
                    raise DatasetError(f"{path}: mask {mask.name} not found")
                item["mask"] = str(mask)
            items.append(item)
    logger.info("read %d items from class folders: %s", len(items), class_counts(items))
    return items


def class_counts(items: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Number of items per class name, in ``CLASS_NAMES`` order (zeros included)."""
    counter = Counter(int(item["label"]) for item in items)
    return {name: counter.get(index, 0) for index, name in enumerate(CLASS_NAMES)}


def split_items(
    items: Sequence[Item],
    val_fraction: float,
    seed: int = 0,
    *,
    group_key: str | None = "patient_id",
) -> tuple[list[Item], list[Item]]:
    """Stratified, deterministic (train, val) split.

    Each class gives about ``val_fraction`` of its items to validation, and at least one when
    it has two or more.  When every item has ``group_key`` (COVIDx patient IDs), whole groups
    move together, so no patient is in both parts; a group goes with the class of its first
    item.  Order within each part follows ``items``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    grouped = group_key is not None and all(group_key in item for item in items)
    groups: dict[str, list[int]] = defaultdict(list)
    for position, item in enumerate(items):
        key = f"g:{item[group_key]}" if grouped and group_key else f"i:{position}"
        groups[key].append(position)
    by_class: dict[int, list[str]] = defaultdict(list)
    for key, members in groups.items():
        by_class[int(items[members[0]]["label"])].append(key)
    rng = np.random.default_rng(seed)
    val_positions: set[int] = set()
    for label in sorted(by_class):
        keys = sorted(by_class[label])
        size = sum(len(groups[k]) for k in keys)
        target = round(size * val_fraction)
        if val_fraction > 0 and size >= 2:
            target = max(target, 1)
        taken = 0
        for k in rng.permutation(len(keys)):
            if taken >= target:
                break
            members = groups[keys[int(k)]]
            if taken + len(members) > target and taken > 0:
                continue
            val_positions.update(members)
            taken += len(members)
    train = [item for i, item in enumerate(items) if i not in val_positions]
    val = [item for i, item in enumerate(items) if i in val_positions]
    return train, val


def radiograph_dataset(
    items: Sequence[Item],
    *,
    size: int = 512,
    covidnet: bool = False,
    extra: Sequence[Callable[..., Any]] = (),
    cache: bool = False,
    num_workers: int = 0,
) -> MonaiDataset:
    """A ``monai.data.Dataset`` (``CacheDataset`` with ``cache``) that loads ``"image"`` with
    ``LoadRadiographd`` (1 x size x size in [0, 1]) and then applies ``extra`` transforms."""
    from monai.data import CacheDataset, Dataset
    from monai.transforms import Compose

    from .preprocessing import LoadRadiographd

    transform = Compose([LoadRadiographd(keys="image", size=size, covidnet=covidnet), *extra])
    if cache:
        return CacheDataset(
            data=list(items), transform=transform, num_workers=num_workers, progress=False
        )
    return Dataset(data=list(items), transform=transform)
