"""Typed outcomes of one CoroNet run, validated at construction.

These plain dataclasses are what inference hands to the DICOM writers
(:mod:`worker.results.sr`, :mod:`worker.results.sc`).  They hold no torch objects, so they can
be built, pickled and tested without the model.  An invalid value raises
:class:`~dicom_node.core.errors.ResultError` when the object is made, so a result that cannot
be true (probabilities that do not sum to one, a predicted class that is not the most likely)
never reaches a DICOM object.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from dicom_node.core.errors import ResultError

#: Largest tolerated distance of the summed class probabilities from 1.
PROBABILITY_SUM_TOLERANCE = 1e-3

#: Parameter key under which the weights digest is recorded (TID 4019 "Algorithm Parameters").
WEIGHTS_SHA256_PARAMETER = "weights_sha256"

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _frozen_mapping(values: Mapping[str, str] | Mapping[str, float]) -> Mapping[str, object]:
    return MappingProxyType(dict(values))


@dataclass(frozen=True)
class Prediction:
    """Class probabilities for one image and the predicted (most probable) class.

    ``probabilities`` must name exactly ``class_names``, each value in [0, 1], summing to 1
    within :data:`PROBABILITY_SUM_TOLERANCE`; ``predicted`` must have the highest probability.
    """

    class_names: tuple[str, ...]
    probabilities: Mapping[str, float]
    predicted: str

    def __post_init__(self) -> None:
        if isinstance(self.class_names, str):
            raise ResultError("class_names must be a sequence of names, not one string")
        names = tuple(self.class_names)
        if not names:
            raise ResultError("class_names must not be empty")
        if any(not isinstance(n, str) or not n.strip() for n in names):
            raise ResultError(f"class names must be non-empty strings, got {names!r}")
        if len(set(names)) != len(names):
            raise ResultError(f"class names must be unique, got {names!r}")
        if set(self.probabilities) != set(names):
            raise ResultError(
                f"probabilities name {sorted(self.probabilities)!r}, "
                f"expected exactly the classes {sorted(names)!r}"
            )
        probs: dict[str, float] = {}
        for name in names:
            value = float(self.probabilities[name])
            if not math.isfinite(value) or not 0.0 <= value <= 1.0:
                raise ResultError(f"probability of {name!r} is {value!r}, outside [0, 1]")
            probs[name] = value
        total = math.fsum(probs.values())
        if abs(total - 1.0) > PROBABILITY_SUM_TOLERANCE:
            raise ResultError(
                f"probabilities sum to {total:.6f}, not 1 (tolerance {PROBABILITY_SUM_TOLERANCE})"
            )
        if self.predicted not in probs:
            raise ResultError(f"predicted class {self.predicted!r} is not one of {names!r}")
        best = max(probs.values())
        if probs[self.predicted] < best:
            raise ResultError(
                f"predicted class {self.predicted!r} (p={probs[self.predicted]:.6f}) is not "
                f"the most probable class (p={best:.6f})"
            )
        object.__setattr__(self, "class_names", names)
        object.__setattr__(self, "probabilities", _frozen_mapping(probs))


@dataclass(frozen=True)
class Attribution:
    """What the heatmap of ``class_name`` did to that class's probability: before and after
    deleting (blurring) what the map highlights, and whether that drop makes it informative.
    """

    class_name: str
    probability_before: float
    probability_after: float
    informative: bool

    def __post_init__(self) -> None:
        for name in ("probability_before", "probability_after"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or not 0.0 <= value <= 1.0:
                raise ResultError(f"attribution {name} is {value!r}, outside [0, 1]")

    def describe(self) -> str:
        """The map in words, e.g. for an SR comment or the SC's caption."""
        verdict = "informative" if self.informative else "NOT informative"
        return (
            f"heatmap {verdict}: deleting it takes {self.class_name} from "
            f"{percent(self.probability_before)} to {percent(self.probability_after)}"
        )


def percent(probability: float) -> str:
    """A probability as the SR's viewers show it: percent with two decimals."""
    return f"{100.0 * probability:.2f} %"


@dataclass(frozen=True)
class AlgorithmInfo:
    """Identification of the algorithm that produced a result (PS3.16 TID 4019).

    ``version`` is the model version string (e.g. ``"0.1.0+demo-phantom"``);
    ``weights_sha256`` is the lower-case hex SHA-256 of the weights file; ``parameters`` are
    further ``name -> value`` settings worth recording (e.g. input size); ``caveat`` is what
    every result of these weights must say in words (the demo weights: "trained on synthetic
    phantoms, not patient data"), empty when nothing.
    """

    name: str
    version: str
    weights_sha256: str
    parameters: Mapping[str, str] = field(default_factory=dict)
    caveat: str = ""

    def __post_init__(self) -> None:
        for label, value in (("name", self.name), ("version", self.version)):
            if not isinstance(value, str) or not value.strip():
                raise ResultError(f"algorithm {label} must be a non-empty string")
        if not isinstance(self.weights_sha256, str) or not _SHA256_HEX.fullmatch(
            self.weights_sha256
        ):
            raise ResultError("weights_sha256 must be 64 lower-case hexadecimal characters")
        params: dict[str, str] = {}
        for key, value in self.parameters.items():
            if not isinstance(key, str) or not key.strip() or "=" in key:
                raise ResultError(f"parameter name {key!r} must be non-empty and contain no '='")
            if not isinstance(value, str):
                raise ResultError(f"parameter {key!r} must be a string, got {type(value).__name__}")
            if key == WEIGHTS_SHA256_PARAMETER:
                raise ResultError(f"{key!r} is recorded from weights_sha256; do not repeat it")
            params[key] = value
        object.__setattr__(self, "parameters", _frozen_mapping(params))

    def parameter_strings(self) -> tuple[str, ...]:
        """``name=value`` texts for TID 4019 "Algorithm Parameters", weights digest first."""
        items = [f"{WEIGHTS_SHA256_PARAMETER}={self.weights_sha256}"]
        items.extend(f"{key}={self.parameters[key]}" for key in sorted(self.parameters))
        return tuple(items)


@dataclass(frozen=True)
class Unassessable:
    """An image the model must not assess (not a frontal chest view, failed checks, ...).

    ``reasons`` are short human-readable texts, at least one.
    """

    reasons: tuple[str, ...]

    def __post_init__(self) -> None:
        if isinstance(self.reasons, str):
            raise ResultError("reasons must be a sequence of texts, not one string")
        reasons = tuple(self.reasons)
        if not reasons:
            raise ResultError("an unassessable result needs at least one reason")
        if any(not isinstance(r, str) or not r.strip() for r in reasons):
            raise ResultError(f"reasons must be non-empty strings, got {reasons!r}")
        object.__setattr__(self, "reasons", reasons)
