"""What the model can vouch for: an abstention gate on the image content, and calibration.

The gate refuses images unlike the data the weights were trained on.  It uses several signals,
because the FPAEs reconstruct almost any image well (their input and full-resolution skips):
reconstruction error alone lets CT slices and inverted radiographs through.  Per image, from
one forward pass (:func:`outputs`):

* ``feature_distance``: the Mahalanobis distance of the classifier's penultimate features
  (ResNet-18, 512) to the nearest class mean, with one covariance shared by the classes (Lee
  et al. 2018), fitted on the training set;
* ``energy``: ``-logsumexp(logits)``; unfamiliar inputs tend to a higher energy (Liu et al.
  2020);
* ``healthy_residual`` and ``pneumonia_residual``: the mean ``|x - F(x)|`` of each FPAE;
* ``layout``: minus the contrast between the central band (mediastinum and spine, bright in the
  MONOCHROME2 sense) and the two lung bands beside it, a plausibility check of a frontal chest.

Larger is stranger for every signal.  Each threshold is the ``1 - (1 - acceptance) / k``
quantile of its signal on held-out in-distribution images (``k`` signals), so that about the
stated ``acceptance`` of such images pass all of them (Bonferroni).  One number sums the
verdict up, the gate score ``max over signals of (value - median) / (threshold - median)``
(medians on the same held-out images): 1 is the threshold, an image is refused above it.

Calibration is temperature scaling (Guo et al. 2017): one temperature ``T`` fitted on held-out
images by minimising the negative log-likelihood; the reported probabilities are
``softmax(logits / T)``.  It never changes the predicted class.

:class:`TrustModel` holds both.  It is saved next to the weights (``models/trust.pt``) by
:mod:`.trust_fit` (``configs/fit_trust.json``) and read by :func:`load_trust_model`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .networks import CoroNet

SIGNALS: Final = (
    "feature_distance",
    "energy",
    "healthy_residual",
    "pneumonia_residual",
    "layout",
)
#: Default share of in-distribution images the gate lets through.
DEFAULT_ACCEPTANCE: Final = 0.975
FORMAT_VERSION: Final = 1
MIN_TEMPERATURE: Final = 0.05
MAX_TEMPERATURE: Final = 100.0
#: What a refusal says, before the scores.
REFUSAL: Final = "image unlike the data the model was trained on"


# --------------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outputs:
    """What forward passes give the gate and the calibration, for a batch of images."""

    logits: Tensor  # B x K
    features: Tensor  # B x D, the classifier's penultimate layer
    signals: Mapping[str, Tensor]  # name -> B, all SIGNALS but feature_distance (needs a fit)

    def to_cpu(self) -> Outputs:
        return Outputs(
            self.logits.cpu(), self.features.cpu(), {k: v.cpu() for k, v in self.signals.items()}
        )


def layout_score(images: Tensor) -> Tensor:
    """Minus (central band - mean of the outer bands) over the middle half of the rows (B).

    A frontal chest radiograph in the MONOCHROME2 sense has a bright mediastinum between two
    darker lung fields, so its score is negative; flat, inverted or off-centre images score
    higher.
    """
    _, _, height, width = images.shape
    rows = images[..., height // 4 : 3 * height // 4, :]
    third = width // 3
    left = rows[..., :third].mean(dim=(1, 2, 3))
    centre = rows[..., third + third // 4 : 2 * third - third // 4].mean(dim=(1, 2, 3))
    right = rows[..., width - third :].mean(dim=(1, 2, 3))
    return -(centre - (left + right) / 2)


@torch.no_grad()
def outputs(network: nn.Module, images: Tensor) -> Outputs:
    """Logits, penultimate features and the image signals for ``images`` (B x 1 x S x S);
    ``network`` is a CoroNet (this bundle's, or the copy of another bundle folder)."""
    captured: list[Tensor] = []
    coronet = cast(CoroNet, network)
    head = cast(nn.Module, coronet.classifier.fc)
    hook = head.register_forward_pre_hook(lambda _module, args: captured.append(args[0].detach()))
    try:
        result = coronet.forward_with_intermediates(images)
    finally:
        hook.remove()
    logits = result.logits.float()
    return Outputs(
        logits=logits,
        features=captured[0].flatten(1).float(),
        signals={
            "energy": -torch.logsumexp(logits, dim=1),
            "healthy_residual": (images - result.recon_h).abs().mean(dim=(1, 2, 3)).float(),
            "pneumonia_residual": (images - result.recon_p).abs().mean(dim=(1, 2, 3)).float(),
            "layout": layout_score(images).float(),
        },
    )


def batched_outputs(
    network: nn.Module, images: Iterable[Tensor], batch_size: int = 16, progress: bool = True
) -> Outputs:
    """:func:`outputs` over many images (each ``1 x S x S``), on the CPU, concatenated."""
    parts: list[Outputs] = []
    batch: list[Tensor] = []

    def flush() -> None:
        parts.append(outputs(network, torch.stack(batch)).to_cpu())
        batch.clear()

    for image in tqdm(images, desc="gate signals", unit="img", disable=not progress):
        batch.append(image)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not parts:
        raise ValueError("no images")
    return Outputs(
        logits=torch.cat([p.logits for p in parts]),
        features=torch.cat([p.features for p in parts]),
        signals={n: torch.cat([p.signals[n] for p in parts]) for n in parts[0].signals},
    )


# --------------------------------------------------------------------------------------------
# The fitted model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """The gate's view of one image: its signals, the thresholds and medians, and which
    thresholds were exceeded."""

    signals: Mapping[str, float]
    thresholds: Mapping[str, float]
    medians: Mapping[str, float]

    @property
    def score(self) -> float:
        """The gate score: above 1 when a signal exceeds its threshold."""
        return max(
            (self.signals[n] - self.medians[n]) / (self.thresholds[n] - self.medians[n])
            for n in SIGNALS
        )

    @property
    def exceeded(self) -> tuple[str, ...]:
        return tuple(n for n in SIGNALS if self.signals[n] > self.thresholds[n])

    @property
    def accepted(self) -> bool:
        return not self.exceeded

    def reason(self) -> str:
        """Why the image was refused, in words and numbers."""
        details = ", ".join(
            f"{name} {self.signals[name]:.3g} > {self.thresholds[name]:.3g}"
            for name in self.exceeded
        )
        return f"{REFUSAL} (gate score {self.score:.2f} > 1: {details})"

    def to_json(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "score": round(self.score, 4),
            "exceeded": list(self.exceeded),
            "signals": {n: round(float(self.signals[n]), 6) for n in SIGNALS},
            "thresholds": {n: round(float(self.thresholds[n]), 6) for n in SIGNALS},
        }


@dataclass(frozen=True)
class TrustModel:
    """The gate's statistics and thresholds, and the calibration temperature."""

    temperature: float
    class_means: Tensor  # K x D
    precision: Tensor  # D x D
    thresholds: Mapping[str, float]
    medians: Mapping[str, float]
    acceptance: float
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature {self.temperature} is outside the plausible range")
        missing = sorted((set(SIGNALS) - set(self.thresholds)) | (set(SIGNALS) - set(self.medians)))
        if missing:
            raise ValueError(f"no threshold or median for {missing}")
        flat = [n for n in SIGNALS if not self.thresholds[n] > self.medians[n]]
        if flat:
            raise ValueError(f"thresholds not above the medians for {flat}")
        dims = int(self.class_means.shape[1])
        if tuple(self.precision.shape) != (dims, dims):
            raise ValueError(f"precision {tuple(self.precision.shape)} does not match {dims}")

    @property
    def classes(self) -> int:
        return int(self.class_means.shape[0])

    def feature_distance(self, features: Tensor) -> Tensor:
        """Mahalanobis distance to the nearest class mean, per row (B)."""
        diff = features[:, None, :] - self.class_means[None].to(features)  # B x K x D
        squared = torch.einsum("bkd,de,bke->bk", diff, self.precision.to(features), diff)
        return squared.clamp_min(0).min(dim=1).values.sqrt()

    def probabilities(self, logits: Tensor) -> Tensor:
        """Calibrated class probabilities, ``softmax(logits / T)``."""
        return F.softmax(logits.float() / self.temperature, dim=-1)

    def signal_values(self, result: Outputs) -> dict[str, Tensor]:
        values = dict(result.signals)
        values["feature_distance"] = self.feature_distance(result.features)
        return values

    def verdicts(self, result: Outputs) -> list[Verdict]:
        """One verdict per image of ``result``."""
        if int(result.logits.shape[1]) != self.classes:
            raise ValueError(
                f"the trust model knows {self.classes} classes, the network gives "
                f"{int(result.logits.shape[1])}"
            )
        values = self.signal_values(result)
        thresholds = {n: float(self.thresholds[n]) for n in SIGNALS}
        medians = {n: float(self.medians[n]) for n in SIGNALS}
        return [
            Verdict({n: float(values[n][row]) for n in SIGNALS}, thresholds, medians)
            for row in range(int(result.logits.shape[0]))
        ]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "format": FORMAT_VERSION,
                "temperature": float(self.temperature),
                "class_means": self.class_means.float().contiguous(),
                "precision": self.precision.float().contiguous(),
                "thresholds": {k: float(v) for k, v in self.thresholds.items()},
                "medians": {k: float(v) for k, v in self.medians.items()},
                "acceptance": float(self.acceptance),
                "info": json.dumps(dict(self.info), sort_keys=True),
            },
            path,
        )
        return path


def load_trust_model(path: str | Path) -> TrustModel:
    """Read ``models/trust.pt``; ``FileNotFoundError`` says how to make one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no trust model (gate and calibration); fit one for these weights with "
            "configs/fit_trust.json (see the model card)"
        )
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: not a trust model of format {FORMAT_VERSION}")
    return TrustModel(
        temperature=float(data["temperature"]),
        class_means=data["class_means"],
        precision=data["precision"],
        thresholds=dict(data["thresholds"]),
        medians=dict(data["medians"]),
        acceptance=float(data["acceptance"]),
        info=json.loads(data["info"]),
    )
