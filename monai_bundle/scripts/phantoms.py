"""Synthetic chest-radiograph phantoms with known lesion masks.

SYNTHETIC DATA FOR TESTS AND DEMO WEIGHTS ONLY. These images are drawn from simple geometric
models of a frontal (PA) chest radiograph; they are not clinical data, they are not derived from
any patient, and nothing learned from them says anything about real patients.  Every DICOM file
written here says so in PatientName, SeriesDescription and ImageComments.

Classes (``CLASS_NAMES`` order is the model's output order):

- ``normal``: anatomy only.
- ``pneumonia``: one focal lobar consolidation in one lung (dense, fairly well-defined, with a
  sharp fissural margin and air-bronchogram-like lucent streaks).
- ``COVID-19``: bilateral, peripheral, lower-zone ground-glass opacities (several hazy,
  low-contrast patches along the lateral pleura of both lower zones).

Images are float32 in [0, 1] in the MONOCHROME2 sense (lungs dark, bone bright).  Generation is
vectorised numpy and deterministic: the same ``(label, size, seed)`` gives the same image, and
the same seed gives the same anatomy whatever the label, so the lesion is the only difference.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
)
from tqdm import tqdm

from .datasets import CLASS_NAMES, MASK_SUFFIX

__all__ = [
    "CLASS_NAMES",
    "DicomOptions",
    "GeneratedImage",
    "Phantom",
    "generate_dataset",
    "image_seed",
    "main",
    "make_phantom",
    "phantom_dataset",
    "write_dicom",
    "write_mask_png",
    "write_png",
]

logger = logging.getLogger(__name__)

Float = NDArray[np.floating[Any]]
Modality = Literal["CR", "DX"]
Photometric = Literal["MONOCHROME1", "MONOCHROME2"]
ImageFormat = Literal["png", "dcm"]

# SOP classes, PS3.4 Annex B.5.
CR_IMAGE_STORAGE: UID = ComputedRadiographyImageStorage
DX_IMAGE_STORAGE_FOR_PRESENTATION: UID = DigitalXRayImageStorageForPresentation
SOP_CLASS_FOR_MODALITY: dict[str, UID] = {
    "CR": CR_IMAGE_STORAGE,
    "DX": DX_IMAGE_STORAGE_FOR_PRESENTATION,
}
# Anatomic region (CID 4031) and view codes (CID 4010) for ViewPosition terms (PS3.3 C.8.11.5).
CHEST_CODE: Code = codes.cid4031.Chest
VIEW_CODES: dict[str, Code] = {
    "PA": codes.cid4010.PosteroAnterior,
    "AP": codes.cid4010.AnteroPosterior,
    "LL": codes.cid4010.LeftLateral,
    "RL": codes.cid4010.RightLateral,
}
MIN_BITS_STORED = 8
MAX_BITS_STORED = 16
PHANTOM_PATIENT_NAME = "PHANTOM^SYNTHETIC"
PHANTOM_DATE = "20200101"
PHANTOM_TIME = "120000"
MANUFACTURER = "CoroNet phantom generator"
MODEL_NAME = "coronet-phantoms"
SOFTWARE_VERSION = "coronet-phantoms 1"
NOT_CLINICAL = "SYNTHETIC PHANTOM - NOT CLINICAL DATA"
# Physical width of the simulated detector field, used for ImagerPixelSpacing.
FIELD_OF_VIEW_MM = 430.0
MIN_SIZE = 64
MAX_SIZE = 4096


@dataclass(frozen=True)
class Phantom:
    """A synthetic radiograph: ``image`` float32 HxW in [0, 1] (MONOCHROME2 sense),
    ``lesion_mask`` bool HxW (all False for ``normal``), ``label`` one of ``CLASS_NAMES``,
    ``lung_mask`` bool HxW, the two lung fields (heart and mediastinum cut out)."""

    image: NDArray[np.float32]
    lesion_mask: NDArray[np.bool_]
    label: str
    seed: int
    lung_mask: NDArray[np.bool_]


# --------------------------------------------------------------------------------------------
# Small vectorised helpers.


def _band(d: Float, edge: float) -> Float:
    """Soft inside-indicator of ``d > 0``: a linear ramp about ``2 * edge`` wide."""
    return np.clip(d * np.float32(0.5 / edge) + np.float32(0.5), 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, cells: int, shape: tuple[int, int]) -> Float:
    """Smooth zero-mean noise (unit variance at the knots) with ``cells`` features per side.

    A small white-noise grid is upsampled separably with smoothstep weights (C1 continuous, so
    no creases at the knots).  Gathers and lerps only: no BLAS call, whose thread start-up costs
    more than the arithmetic at these sizes.
    """
    grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    rows_lo, rows_hi, rows_w = _knots(shape[0], cells)
    cols_lo, cols_hi, cols_w = _knots(shape[1], cells)
    low, high = grid[rows_lo], grid[rows_hi]
    by_rows = low + (high - low) * rows_w[:, None]
    left, right = by_rows[:, cols_lo], by_rows[:, cols_hi]
    return left + (right - left) * cols_w[None, :]


def _knots(n_out: int, cells: int) -> tuple[NDArray[np.intp], NDArray[np.intp], Float]:
    position = np.linspace(0.0, cells, n_out, endpoint=False, dtype=np.float32)
    floor = np.floor(position)
    frac = position - floor
    low = floor.astype(np.intp)
    return low, low + 1, frac * frac * (3.0 - 2.0 * frac)


def _periodic_lookup(table: Float, phase: Float) -> Float:
    """Linear interpolation in a periodic 1-D table at ``phase >= 0`` (units of entries)."""
    floor = np.floor(phase)
    frac = phase - floor
    i0 = floor.astype(np.intp)
    low = np.take(table, i0, mode="wrap")
    high = np.take(table, i0 + 1, mode="wrap")
    return low + (high - low) * frac


def _size_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, int) else size
    for side in (height, width):
        if not MIN_SIZE <= side <= MAX_SIZE:
            raise ValueError(f"phantom size {side} px is outside [{MIN_SIZE}, {MAX_SIZE}]")
    return int(height), int(width)


# --------------------------------------------------------------------------------------------
# Anatomy.


@dataclass
class _Frame:
    """Anatomical coordinates of every pixel: X in [-1, 1] left->right of the image (patient's
    right -> left), Y in [-1, 1] top -> bottom; ``edge`` is about 1 px in these units."""

    x: Float
    y: Float
    edge: float
    shape: tuple[int, int]


def _frame(shape: tuple[int, int], rng: np.random.Generator) -> _Frame:
    height, width = shape
    angle = math.radians(rng.uniform(-3.0, 3.0))
    scale = rng.uniform(0.92, 1.04)
    shift_x, shift_y = rng.uniform(-0.04, 0.04, size=2)
    cols = np.linspace(-1.0, 1.0, width, dtype=np.float32) - np.float32(shift_x)
    rows = np.linspace(-1.0, 1.0, height, dtype=np.float32) - np.float32(shift_y)
    cos, sin = np.float32(math.cos(angle) / scale), np.float32(math.sin(angle) / scale)
    x = cos * cols[None, :] + sin * rows[:, None]
    y = cos * rows[:, None] - sin * cols[None, :]
    return _Frame(x=x, y=y, edge=2.0 / (min(height, width) * scale), shape=shape)


@dataclass
class _Lung:
    """Boundaries of one lung in lateral coordinate t = side * X (t > 0 away from midline)."""

    side: int
    apex_y: float
    apex_t: float
    dome_y: float
    dome_t: float
    lateral_t: float
    medial_t: float
    hilum: tuple[float, float]

    def lateral_border(self, y: Float | float) -> Float:
        return np.asarray(self.lateral_t - 0.42 * (y - 0.15) ** 2, dtype=np.float32)


def _lungs(rng: np.random.Generator) -> tuple[_Lung, _Lung]:
    common_dome = rng.uniform(0.42, 0.56)
    lungs = []
    for side in (-1, 1):
        # The right hemidiaphragm (image left, side -1) usually sits a little higher.
        dome = common_dome + (0.0 if side == 1 else -0.05) + rng.uniform(-0.02, 0.02)
        lungs.append(
            _Lung(
                side=side,
                apex_y=rng.uniform(-0.78, -0.70),
                apex_t=rng.uniform(0.34, 0.42),
                dome_y=dome,
                dome_t=rng.uniform(0.30, 0.40),
                lateral_t=rng.uniform(0.80, 0.88),
                medial_t=rng.uniform(0.07, 0.10),
                hilum=(rng.uniform(0.17, 0.23), rng.uniform(-0.14, -0.02)),
            )
        )
    return lungs[0], lungs[1]


def _lung_field(lung: _Lung, f: _Frame) -> Float:
    """Soft mask of the lung envelope (before the heart and mediastinum are cut out)."""
    t = lung.side * f.x
    y = f.y
    inside_top = y - (lung.apex_y + 1.3 * (t - lung.apex_t) ** 2)
    inside_bottom = (lung.dome_y + 0.95 * (t - lung.dome_t) ** 2) - y
    inside_lateral = lung.lateral_border(y) - t
    inside_medial = t - lung.medial_t
    d = np.minimum(np.minimum(inside_top, inside_bottom), np.minimum(inside_lateral, inside_medial))
    return _band(d, f.edge)


def _ellipse(
    f: _Frame,
    centre: tuple[float, float],
    radii: tuple[float, float],
    edge_scale: float,
    angle: float = 0.0,
) -> Float:
    """Soft ellipse mask; ``angle`` (radians) turns its first axis clockwise on screen."""
    cos, sin = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    dx, dy = f.x - centre[0], f.y - centre[1]
    u = (cos * dx + sin * dy) / radii[0]
    v = (cos * dy - sin * dx) / radii[1]
    # 1 - r ~ (1 - r^2) / 2 near the border: good enough for a soft edge, and no sqrt.
    return _band((1.0 - u * u - v * v) * np.float32(0.5 * min(radii)), f.edge * edge_scale)


@dataclass
class _Anatomy:
    image: Float
    right_lung: Float
    left_lung: Float
    frame: _Frame
    lung_params: tuple[_Lung, _Lung]


def _body(f: _Frame, rng: np.random.Generator) -> Float:
    """Soft-tissue silhouette: torso with sloping shoulders, and the neck."""
    half_width = rng.uniform(0.90, 0.98)
    shoulder_y = rng.uniform(-1.0, -0.94)
    torso = np.minimum(half_width - np.abs(f.x), f.y - (shoulder_y + 0.42 * f.x**2))
    neck = np.minimum(rng.uniform(0.20, 0.26) - np.abs(f.x), f.y + 1.3)
    return _band(np.maximum(torso, neck), 3 * f.edge)


def _bone_profile(d: Float) -> Float:
    """Cross-section of a tubular bone at normalised distance ``d`` from its axis (|d| < 1):
    denser cortex at the edges than in the middle."""
    d2 = np.minimum(d * d, 1.0)
    return (1.0 - d2) * (0.55 + 0.45 * d2 * d2)


def _ribs(f: _Frame, lungs: tuple[_Lung, _Lung], rng: np.random.Generator) -> Float:
    """Posterior and anterior ribs as periodic curved bands (one evaluation for all ribs)."""
    t = np.abs(f.x)
    lateral = np.maximum(lungs[0].lateral_border(f.y), lungs[1].lateral_border(f.y))
    fade = _band(t - 0.07, 2 * f.edge) * _band(lateral + 0.1 - t, 4 * f.edge)
    n_ribs = 10
    spacing = rng.uniform(0.118, 0.132)
    top = rng.uniform(-0.74, -0.68)
    # Posterior ribs: arches rising from the spine, peaking mid-lung, bending down laterally.
    rise = rng.uniform(0.40, 0.50)
    bend = rng.uniform(0.48, 0.58)
    phase = (f.y - (top - rise * t + bend * t * t)) / spacing + 1.0
    phase = np.maximum(phase - 0.025 * phase * phase, 0.0)  # lower ribs a bit further apart
    floor = np.floor(phase)
    frac = phase - floor
    index = floor.astype(np.intp)
    width = 0.46 + 0.1 * t
    posterior = _bone_profile((frac - 0.5) / (0.5 * width))
    gains = np.zeros(n_ribs + 2, dtype=np.float32)
    gains[1 : n_ribs + 1] = rng.uniform(0.85, 1.15, size=n_ribs)
    posterior *= np.take(gains, index, mode="clip")
    # Anterior ribs: fainter, sloping down towards the midline from the lateral wall.
    a_phase = (f.y - (top + 0.3 + 0.45 * (1.0 - t) - 0.1 * (1.0 - t) ** 2)) / (1.1 * spacing)
    a_phase = np.maximum(a_phase + 1.0, 0.0)
    a_floor = np.floor(a_phase)
    a_frac = a_phase - a_floor
    a_index = a_floor.astype(np.intp)
    anterior = _bone_profile((a_frac - 0.5) / 0.18) * ((a_index >= 1) & (a_index <= 6))
    anterior *= _band(t - 0.3, 8 * f.edge)
    return (0.8 * posterior + 0.25 * anterior) * fade


def _clavicles(f: _Frame, rng: np.random.Generator) -> Float:
    t = np.abs(f.x)
    medial_y = rng.uniform(-0.66, -0.58)
    slope = rng.uniform(0.18, 0.28)
    curve = medial_y - slope * t + 0.22 * (t - 0.35) ** 2
    thickness = 0.034 + 0.04 * np.maximum(0.3 - t, 0.0)
    bone = _bone_profile((f.y - curve) / thickness)
    return bone * _band(np.minimum(t - 0.05, 0.7 - t), 4 * f.edge)


def _spine(f: _Frame, rng: np.random.Generator) -> Float:
    half_width = rng.uniform(0.065, 0.08)
    across = np.clip(1.0 - (f.x / half_width) ** 2, 0.0, 1.0)
    period = rng.uniform(0.10, 0.12)
    discs = 0.75 + 0.25 * np.cos(np.float32(2.0 * np.pi / period) * f.y) ** 2
    pedicles = _bone_profile((np.abs(f.x) - 0.7 * half_width) / (0.2 * half_width))
    return (0.7 * across + 0.3 * pedicles) * discs


def _polar(f: _Frame, lung: _Lung) -> tuple[Float, Float]:
    """Radius and angle turns in [0, 1) around the hilum of ``lung``, in its t coordinate."""
    dt = lung.side * f.x - lung.hilum[0]
    dy = f.y - lung.hilum[1]
    radius = np.sqrt(dt * dt + dy * dy)
    turns = np.arctan2(dy, dt) * np.float32(0.5 / np.pi) + np.float32(0.5)
    return radius, turns


def _vessels(f: _Frame, lungs: tuple[_Lung, _Lung], rng: np.random.Generator) -> Float:
    """Pulmonary vascular markings: branching ridges, densest at the hila, fading outwards.

    Ridged noise (thin bright lines where smooth noise crosses zero) gives a branching
    network; a radial term from each hilum makes it run outwards like real vessels.
    """
    ridges = 1.0 - np.minimum(np.abs(_smooth_noise(rng, 22, f.shape)), 1.0)
    ridges = ridges**6
    texture = np.zeros(f.shape, dtype=np.float32)
    for lung in lungs:
        radius, turns = _polar(f, lung)
        table = rng.standard_normal(64).astype(np.float32)
        wobble = 0.04 * _smooth_noise(rng, 16, f.shape)
        spokes = np.maximum(_periodic_lookup(table, (turns + wobble) * 64), 0.0)
        falloff = np.exp(-radius * np.float32(1.0 / 0.3))
        hilum = np.exp(-((radius * np.float32(1.0 / 0.1)) ** 2))
        texture += falloff * (0.5 * ridges + 0.35 * spokes * spokes) + 1.2 * hilum
    return texture


def _mediastinum(
    f: _Frame, lungs: tuple[_Lung, _Lung], rng: np.random.Generator
) -> tuple[Float, Float]:
    """Soft masks of the whole mediastinal silhouette (heart included) and the trachea."""
    base = min(lungs[0].dome_y, lungs[1].dome_y)
    heart = _ellipse(
        f,
        (rng.uniform(0.10, 0.15), base - rng.uniform(0.06, 0.12)),
        (rng.uniform(0.42, 0.48), rng.uniform(0.25, 0.29)),
        3.0,
        angle=rng.uniform(0.35, 0.55),
    )
    half_width = rng.uniform(0.12, 0.15) + 0.06 * np.clip(f.y + 0.5, 0.0, 1.0)
    upper = _band(half_width - np.abs(f.x - 0.02), 3 * f.edge)
    knob = _ellipse(f, (rng.uniform(0.10, 0.13), rng.uniform(-0.40, -0.32)), (0.09, 0.075), 3.0)
    silhouette = np.maximum(np.maximum(heart, upper), knob)
    trachea = _band(0.032 - np.abs(f.x + 0.01), 2 * f.edge) * _band(-0.22 - f.y, 6 * f.edge)
    return silhouette, trachea


def _anatomy(shape: tuple[int, int], rng: np.random.Generator) -> _Anatomy:
    f = _frame(shape, rng)
    right, left = _lungs(rng)
    body = _body(f, rng)
    central, trachea = _mediastinum(f, (right, left), rng)
    right_field = _lung_field(right, f) * (1.0 - central) * body
    left_field = _lung_field(left, f) * (1.0 - central) * body
    lungs = right_field + left_field

    soft = rng.uniform(0.52, 0.60)
    background = rng.uniform(0.02, 0.06)
    lung_level = rng.uniform(0.13, 0.20)
    image = background + body * ((soft - background) + 0.025 * _smooth_noise(rng, 12, shape))
    # Below the diaphragm (liver, spleen) and in the mediastinum the tissue is thicker; the
    # heart merges into the diaphragm, so the two are not added.
    abdomen = _band(f.y - max(right.dome_y, left.dome_y) + 0.04, 10 * f.edge)
    image += body * np.maximum(0.10 * abdomen, 0.12 * central)
    image -= body * 0.06 * trachea
    image -= lungs * (soft - lung_level)
    image += 0.07 * lungs * _vessels(f, (right, left), rng)
    image += 0.015 * lungs * _smooth_noise(rng, 48, shape)
    bone_gain = rng.uniform(0.85, 1.15)
    bone_mask = body * (1.0 - 0.5 * np.maximum(central, abdomen))
    image += (bone_gain * 0.11) * _ribs(f, (right, left), rng) * bone_mask
    image += (bone_gain * 0.16) * _clavicles(f, rng) * body
    image += (bone_gain * 0.06) * _spine(f, rng) * bone_mask
    # Stomach gas bubble under the left hemidiaphragm.
    bubble = _ellipse(f, (rng.uniform(0.35, 0.5), left.dome_y + 0.17), (0.12, 0.06), 4.0)
    image -= 0.12 * bubble * body
    return _Anatomy(
        image=image.astype(np.float32, copy=False),
        right_lung=right_field,
        left_lung=left_field,
        frame=f,
        lung_params=(right, left),
    )


# --------------------------------------------------------------------------------------------
# Lesions.


def _consolidation(a: _Anatomy, rng: np.random.Generator) -> tuple[Float, NDArray[np.bool_]]:
    """One lobar consolidation: dense, with a sharp fissural edge and air bronchograms."""
    f = a.frame
    which = int(rng.integers(2))
    lung = a.lung_params[which]
    field = (a.right_lung, a.left_lung)[which]
    t = lung.side * f.x
    lobe = int(rng.integers(3))
    fissure_y = rng.uniform(-0.12, 0.02)
    if lobe == 0:  # upper lobe: sharp lower margin along the horizontal fissure
        extent = np.minimum(fissure_y - f.y + 0.04 * (t - 0.4), 0.5)
    elif lobe == 1:  # middle lobe / lingula: below the fissure, medial, above the base
        extent = np.minimum(np.minimum(f.y - fissure_y, lung.dome_y - 0.08 - f.y), 0.62 - t)
    else:  # lower lobe: hazier upper margin, bounded by the diaphragm
        extent = f.y - (fissure_y + rng.uniform(0.10, 0.25)) - 0.1 * (t - 0.45)
    extent = extent + 0.04 * _smooth_noise(rng, 10, f.shape)
    region = _band(extent, 2.5 * f.edge) * field
    amplitude = rng.uniform(0.24, 0.32)
    texture = 0.88 + 0.12 * _smooth_noise(rng, 30, f.shape)
    # Air bronchograms: lucent branching streaks from the hilum inside the consolidation.
    radius, turns = _polar(f, lung)
    table = rng.standard_normal(48).astype(np.float32)
    branches = _periodic_lookup(table, turns * 48 + 2.0 * radius)
    bronchi = np.clip(branches - 1.0, 0.0, 1.0) * _band(radius - 0.12, 4 * f.edge)
    opacity = amplitude * region * (texture - 0.45 * bronchi)
    return opacity, region > 0.5


def _ground_glass(a: _Anatomy, rng: np.random.Generator) -> tuple[Float, NDArray[np.bool_]]:
    """Bilateral peripheral lower-zone ground-glass patches: hazy, low contrast."""
    f = a.frame
    patches = np.zeros(f.shape, dtype=np.float32)
    for lung, field in zip(a.lung_params, (a.right_lung, a.left_lung), strict=True):
        t = lung.side * f.x
        for _ in range(int(rng.integers(2, 5))):
            cy = rng.uniform(-0.05, lung.dome_y - 0.05)
            # Hug the lateral pleura: the centre sits just inside the lateral border.
            ct = float(lung.lateral_border(cy)) - rng.uniform(0.06, 0.14)
            rt, ry = rng.uniform(0.09, 0.15), rng.uniform(0.13, 0.22)
            blob = np.exp(-(((t - ct) / rt) ** 2 + ((f.y - cy) / ry) ** 2) * 1.4)
            patches = np.maximum(patches, blob * field)
    irregular = 0.7 + 0.3 * _smooth_noise(rng, 36, f.shape)
    amplitude = rng.uniform(0.10, 0.15)
    return amplitude * patches * irregular, patches > 0.5


# --------------------------------------------------------------------------------------------
# Public API: phantoms.


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def make_phantom(label: str, size: int | tuple[int, int] = 256, seed: int = 0) -> Phantom:
    """Draw one phantom of class ``label`` (one of ``CLASS_NAMES``), ``size`` px or (H, W).

    Anatomy, lesion and noise use separate random streams of ``seed``: one seed gives the same
    patient whatever the label, so ``image(label) - image("normal")`` is the lesion alone.
    A non-square size stretches the anatomy to fill the frame.
    """
    if label not in CLASS_NAMES:
        raise ValueError(f"unknown phantom label {label!r}; expected one of {CLASS_NAMES}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    shape = _size_hw(size)
    anatomy = _anatomy(shape, _rng(seed, 0))
    lesion_rng = _rng(seed, 1)
    if label == "pneumonia":
        opacity, mask = _consolidation(anatomy, lesion_rng)
    elif label == "COVID-19":
        opacity, mask = _ground_glass(anatomy, lesion_rng)
    else:
        opacity, mask = np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=bool)
    image = anatomy.image + opacity
    # Exposure and detector response: gamma and contrast, then quantum noise.
    style = _rng(seed, 2)
    image = np.clip(image, 0.0, 1.0) ** np.float32(style.uniform(0.85, 1.2))
    image = image * np.float32(style.uniform(0.92, 1.05)) + np.float32(style.uniform(-0.02, 0.03))
    noise_sd = np.float32(style.uniform(0.006, 0.016))
    image = image + noise_sd * style.standard_normal(shape, dtype=np.float32)
    final: NDArray[np.float32] = np.clip(image, 0.0, 1.0).astype(np.float32)
    lungs = (anatomy.right_lung + anatomy.left_lung) >= 0.5
    return Phantom(image=final, lesion_mask=mask, label=label, seed=seed, lung_mask=lungs)


def write_png(phantom: Phantom, path: str | Path, bit_depth: Literal[8, 16] = 8) -> Path:
    """Write the image as an 8- or 16-bit grayscale PNG (values scaled to the full range)."""
    path = Path(path)
    if bit_depth == 8:
        Image.fromarray(np.round(phantom.image * 255.0).astype(np.uint8)).save(path)
    elif bit_depth == 16:
        pixels = np.round(phantom.image * 65535.0).astype(np.uint16)
        Image.fromarray(pixels).save(path)  # uint16 -> mode I;16
    else:
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    return path


def write_mask_png(phantom: Phantom, path: str | Path) -> Path:
    """Write the lesion mask as an 8-bit PNG: 255 inside a lesion, 0 elsewhere."""
    path = Path(path)
    Image.fromarray(phantom.lesion_mask.astype(np.uint8) * 255).save(path)
    return path


# --------------------------------------------------------------------------------------------
# Public API: DICOM.


def _uid(*parts: object) -> str:
    """A deterministic UUID-derived UID (PS3.5 B.2) from ``parts``."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return f"2.25.{uuid.UUID(bytes=digest[:16], version=4).int}"


def phantom_dataset(
    phantom: Phantom,
    *,
    modality: Modality = "CR",
    photometric: Photometric = "MONOCHROME2",
    bits_stored: int = 12,
    view_position: str = "PA",
    body_part: str = "CHEST",
    patient_id: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    instance_number: int = 1,
) -> Dataset:
    """Build a CR Image or DX Image For Presentation instance (PS3.3 A.2, A.26) of ``phantom``.

    Stored values are ``round(image * (2**bits_stored - 1))``, inverted for MONOCHROME1; the
    window (PS3.3 C.11.2.1.2) maps the full stored range linearly to the display range, so a
    reader applying Modality LUT, VOI LUT and the MONOCHROME1 inversion gets ``image`` back
    up to quantisation.  UIDs not given are derived from the phantom and the encoding, so the
    output is deterministic.
    """
    if modality not in SOP_CLASS_FOR_MODALITY:
        raise ValueError(f"modality must be one of {sorted(SOP_CLASS_FOR_MODALITY)}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    if not MIN_BITS_STORED <= bits_stored <= MAX_BITS_STORED:
        raise ValueError(f"bits_stored must be in [{MIN_BITS_STORED}, {MAX_BITS_STORED}]")
    rows, cols = phantom.image.shape
    bits_allocated = 8 if bits_stored <= 8 else 16
    max_value = 2**bits_stored - 1
    stored = np.round(phantom.image * max_value).astype(np.uint8 if bits_allocated == 8 else "<u2")
    if photometric == "MONOCHROME1":
        stored = (max_value - stored).astype(stored.dtype)
    key = (phantom.label, phantom.seed, rows, cols)
    encoding = (modality, photometric, bits_stored, view_position, body_part)
    study_uid = study_uid or _uid("study", *key)
    series_uid = series_uid or _uid("series", *key, *encoding)
    sop_uid = sop_instance_uid or _uid("instance", *key, *encoding, instance_number)
    sop_class = SOP_CLASS_FOR_MODALITY[modality]

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = PHANTOM_DATE
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = PHANTOM_TIME
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.Manufacturer = MANUFACTURER
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = f"XR CHEST {view_position} - {NOT_CLINICAL}"
    ds.SeriesDescription = NOT_CLINICAL
    ds.ManufacturerModelName = MODEL_NAME
    ds.PatientName = PHANTOM_PATIENT_NAME
    ds.PatientID = patient_id or f"PHANTOM-{phantom.seed:06d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = body_part
    ds.SoftwareVersions = SOFTWARE_VERSION
    ds.ViewPosition = view_position
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance_number
    # PA/AP chest shown as if facing the patient: rows run to the patient's left, columns to
    # the feet (PS3.3 C.7.6.1.1.1).
    ds.PatientOrientation = ["L", "F"]
    ds.BurnedInAnnotation = "NO"
    ds.ImageComments = f"{NOT_CLINICAL}. Synthetic phantom, class {phantom.label}."
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = rows
    ds.Columns = cols
    spacing = round(FIELD_OF_VIEW_MM / max(rows, cols), 4)
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter = 2 ** (bits_stored - 1)
    ds.WindowWidth = 2**bits_stored
    ds.WindowCenterWidthExplanation = "FULL RANGE"
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.LossyImageCompression = "00"
    if modality == "DX":
        _add_dx_attributes(ds, photometric)
    ds.PixelData = stored.tobytes()
    return ds


def _add_dx_attributes(ds: Dataset, photometric: Photometric) -> None:
    """Attributes the DX modules require (PS3.3 C.8.11)."""
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PixelIntensityRelationship = "LOG"
    # +1: lower stored values mean less X-ray intensity at the detector (PS3.3 C.8.11.3.1.2);
    # true for MONOCHROME1 here, where dense tissue is stored low.
    ds.PixelIntensityRelationshipSign = 1 if photometric == "MONOCHROME1" else -1
    ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    ds.DetectorType = "SCINTILLATOR"
    ds.PositionerType = ""
    ds.ImageLaterality = "U"
    ds.AnatomicRegionSequence = DicomSequence([_code_item(CHEST_CODE)])
    view = VIEW_CODES.get(str(ds.ViewPosition))
    if view is not None:
        ds.ViewCodeSequence = DicomSequence([_code_item(view)])
    ds.AcquisitionContextSequence = DicomSequence([])


def _code_item(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def write_dicom(
    phantom: Phantom,
    path: str | Path,
    *,
    modality: Modality = "CR",
    photometric: Photometric = "MONOCHROME2",
    bits_stored: int = 12,
    view_position: str = "PA",
    body_part: str = "CHEST",
    patient_id: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    instance_number: int = 1,
) -> Dataset:
    """Write ``phantom`` as a DICOM Part 10 file (PS3.10); see ``phantom_dataset``."""
    ds = phantom_dataset(
        phantom,
        modality=modality,
        photometric=photometric,
        bits_stored=bits_stored,
        view_position=view_position,
        body_part=body_part,
        patient_id=patient_id,
        study_uid=study_uid,
        series_uid=series_uid,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
    )
    ds.save_as(Path(path), enforce_file_format=True)
    return ds


# --------------------------------------------------------------------------------------------
# Public API: data sets and command line.


@dataclass(frozen=True)
class GeneratedImage:
    """One file written by ``generate_dataset``."""

    image: Path
    mask: Path
    label: str
    seed: int
    split: str | None


@dataclass(frozen=True)
class DicomOptions:
    """Encoding of DICOM phantoms written by ``generate_dataset``."""

    modality: Modality = "CR"
    photometric: Photometric = "MONOCHROME2"
    bits_stored: int = 12


def image_seed(seed: int, label: str, index: int) -> int:
    """Seed of image ``index`` of class ``label`` in a data set drawn with ``seed``."""
    state = np.random.SeedSequence([seed, CLASS_NAMES.index(label), index]).generate_state(1)
    return int(state[0])


@dataclass(frozen=True)
class _Job:
    """One phantom for ``generate_dataset`` to draw and write."""

    root: Path
    label: str
    seed: int
    split: str | None
    size: int
    fmt: ImageFormat
    dicom: DicomOptions

    @property
    def folder(self) -> Path:
        return self.root / self.split / self.label if self.split else self.root / self.label


def _write_one(job: _Job) -> GeneratedImage:
    stem = f"phantom-{job.seed:010d}"
    phantom = make_phantom(job.label, job.size, job.seed)
    image_path = job.folder / f"{stem}.{job.fmt}"
    if job.fmt == "png":
        write_png(phantom, image_path)
    else:
        write_dicom(
            phantom,
            image_path,
            modality=job.dicom.modality,
            photometric=job.dicom.photometric,
            bits_stored=job.dicom.bits_stored,
        )
    mask_path = write_mask_png(phantom, job.folder / f"{stem}{MASK_SUFFIX}.png")
    return GeneratedImage(image_path, mask_path, job.label, job.seed, job.split)


def _assign_splits(n: int, splits: Mapping[str, float] | None, seed: int) -> list[str | None]:
    """Deterministic split name of each of ``n`` images, in proportion to ``splits``."""
    if not splits:
        return [None] * n
    total = sum(splits.values())
    if total <= 0 or any(v < 0 for v in splits.values()):
        raise ValueError(f"split fractions must be >= 0 with a positive sum, got {dict(splits)}")
    names = list(splits)
    bounds = np.round(np.cumsum([splits[k] / total for k in names]) * n).astype(int)
    order = np.random.default_rng([seed, n]).permutation(n)
    assigned: list[str | None] = [None] * n
    start = 0
    for name, stop in zip(names, bounds, strict=True):
        for position in order[start:stop]:
            assigned[int(position)] = name
        start = int(stop)
    return assigned


def generate_dataset(
    root: str | Path,
    counts: Mapping[str, int],
    *,
    size: int = 256,
    seed: int = 0,
    fmt: ImageFormat = "png",
    splits: Mapping[str, float] | None = None,
    dicom: DicomOptions | None = None,
    progress: bool = False,
    workers: int = 1,
) -> list[GeneratedImage]:
    """Write ``counts[label]`` phantoms per class under ``root``.

    Layout: ``root/[<split>/]<class>/phantom-<seed>.png|.dcm`` with the lesion mask beside
    each image as ``phantom-<seed>{MASK_SUFFIX}.png`` (ignored by the folder reader), plus a
    COVIDx-style list ``root/<split>.txt`` (``root/phantoms.txt`` without splits) whose file
    names are relative to ``root``.  ``splits`` maps split names to fractions, e.g.
    ``{"train": 0.8, "test": 0.2}``; each class is split in those proportions.  ``workers``
    processes draw the images; the files do not depend on it.
    """
    if fmt not in ("png", "dcm"):
        raise ValueError(f"fmt must be 'png' or 'dcm', got {fmt!r}")
    unknown = sorted(set(counts) - set(CLASS_NAMES))
    if unknown:
        raise ValueError(f"unknown class names {unknown}; expected a subset of {CLASS_NAMES}")
    root = Path(root)
    options = dicom or DicomOptions()
    jobs = [
        _Job(root, label, image_seed(seed, label, index), split, size, fmt, options)
        for label in CLASS_NAMES
        for index, split in enumerate(_assign_splits(counts.get(label, 0), splits, seed))
    ]
    for folder in {job.folder for job in jobs}:
        folder.mkdir(parents=True, exist_ok=True)
    written: list[GeneratedImage] = []
    lines: dict[str, list[str]] = {}
    with contextlib.ExitStack() as stack:
        results: Iterable[GeneratedImage] = map(_write_one, jobs)
        if workers > 1 and len(jobs) > 1:
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=workers))
            results = pool.map(_write_one, jobs, chunksize=8)
        bar = stack.enter_context(
            tqdm(total=len(jobs), desc="phantoms", unit="img", disable=not progress)
        )
        for item in results:
            written.append(item)
            relative = item.image.relative_to(root).as_posix()
            lines.setdefault(item.split or "phantoms", []).append(
                f"PH{item.seed} {relative} {item.label} phantom"
            )
            bar.update(1)
    for name, entries in lines.items():
        (root / f"{name}.txt").write_text("\n".join(entries) + "\n", encoding="utf-8")
    logger.info("wrote %d phantoms under %s", len(written), root)
    return written


def _parse_splits(text: str) -> dict[str, float]:
    splits: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"expected NAME=FRACTION, got {part!r}")
        try:
            splits[name] = float(value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"bad fraction in {part!r}") from err
    return splits


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m monai_bundle.scripts.phantoms",
        description="Write synthetic chest-radiograph phantoms (NOT clinical data) with lesion "
        "masks, one folder per class.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--n", type=int, default=30, help="images per class (default 30)")
    parser.add_argument("--size", type=int, default=256, help="image side in px (default 256)")
    parser.add_argument("--format", choices=("png", "dcm"), default="png", dest="fmt")
    parser.add_argument("--seed", type=int, default=0, help="data set seed (default 0)")
    parser.add_argument(
        "--splits",
        type=_parse_splits,
        default=None,
        help="split fractions, e.g. train=0.8,test=0.2 (default: no split folders)",
    )
    parser.add_argument("--modality", choices=("CR", "DX"), default="CR", help="DICOM only")
    parser.add_argument(
        "--photometric", choices=("MONOCHROME1", "MONOCHROME2"), default="MONOCHROME2"
    )
    parser.add_argument("--bits-stored", type=int, default=12, help="DICOM only (8..16)")
    parser.add_argument(
        "--workers", type=int, default=1, help="processes drawing phantoms (default 1)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.n < 0:
        raise SystemExit("--n must be >= 0")
    written = generate_dataset(
        args.out,
        dict.fromkeys(CLASS_NAMES, args.n),
        size=args.size,
        seed=args.seed,
        fmt=args.fmt,
        splits=args.splits,
        dicom=DicomOptions(args.modality, args.photometric, args.bits_stored),
        progress=not args.no_progress,
        workers=args.workers,
    )
    print(f"wrote {len(written)} synthetic phantoms (not clinical data) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
