"""The model's classes, read from the bundle's own ``configs/inference.json``: the one definition.

``class_names`` there is the output order of the network; ``classes`` gives each class its
coded concept (for the DICOM SR) and says whether it is a finding with a location in the image
(a lesion an attribution map should point at).  Everything else in this bundle and in the
worker reads the classes from here or from the loaded bundle, never from a literal list.

This module imports no torch, so it is cheap to import.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

#: Root of the bundle this module belongs to (``<bundle>/scripts/classes.py``).
BUNDLE_ROOT: Final = Path(__file__).resolve().parent.parent
INFERENCE_CONFIG: Final = Path("configs") / "inference.json"


@dataclass(frozen=True)
class ModelClass:
    """One output class: its name, its coded concept (code, scheme, meaning), and whether it is
    a localised finding."""

    name: str
    code: str
    scheme: str
    meaning: str
    lesion: bool


def _field(entry: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    value = entry.get(key)
    if not isinstance(value, kind) or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{where}: {key} must be a non-empty {kind.__name__}")
    return value


def load_classes(bundle_root: str | Path = BUNDLE_ROOT) -> tuple[ModelClass, ...]:
    """The classes of the bundle at ``bundle_root``, in output order; ValueError if the config
    is inconsistent (a class without a code, or a code without a class)."""
    path = Path(bundle_root) / INFERENCE_CONFIG
    config = json.loads(path.read_text(encoding="utf-8"))
    names = config.get("class_names")
    details = config.get("classes")
    if not isinstance(names, list) or not names or not isinstance(details, dict):
        raise ValueError(f"{path}: needs a class_names list and a classes mapping")
    if sorted(map(str, names)) != sorted(details):
        raise ValueError(f"{path}: class_names {names} and classes {sorted(details)} differ")
    classes = []
    for name in names:
        entry = details[name]
        where = f"{path}: classes.{name}"
        classes.append(
            ModelClass(
                name=str(name),
                code=_field(entry, "code", str, where),
                scheme=_field(entry, "scheme", str, where),
                meaning=_field(entry, "meaning", str, where),
                lesion=_field(entry, "lesion", bool, where),
            )
        )
    return tuple(classes)


def load_class_names(bundle_root: str | Path = BUNDLE_ROOT) -> list[str]:
    """The class names in output order (for configs: ``{"_target_": ...}``)."""
    return [c.name for c in load_classes(bundle_root)]


#: The classes of this bundle.
CLASSES: Final = load_classes()
CLASS_NAMES: Final = tuple(c.name for c in CLASSES)
NUM_CLASSES: Final = len(CLASSES)
LESION_CLASSES: Final = tuple(c.name for c in CLASSES if c.lesion)
