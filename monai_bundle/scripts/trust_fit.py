"""Fitting the trust model (:mod:`.trust`) of a trained CoroNet: ``configs/fit_trust.json``.

* The class means and the shared covariance of the penultimate features come from the images
  the weights were trained on (Ledoit-Wolf shrinkage: 512 dimensions, a few hundred images per
  class).
* The thresholds and the temperature come from held-out images of the same distribution that
  neither the weights nor the statistics saw: each threshold is the
  ``1 - (1 - acceptance) / k`` quantile of its signal there, and the temperature minimises the
  negative log-likelihood of their labels.

Run after training, on the same data set::

    cd monai_bundle
    python -m monai.bundle run --bundle_root . \\
        --config_file "['configs/inference.json','configs/fit_trust.json']" \\
        --train_dataset_dir DATA/train --validation_dataset_dir DATA/validation
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.covariance import LedoitWolf
from torch import Tensor

from .calibration import expected_calibration_error
from .networks import CoroNet, load_coronet_weights
from .trust import (
    DEFAULT_ACCEPTANCE,
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    SIGNALS,
    Outputs,
    TrustModel,
    batched_outputs,
)

logger = logging.getLogger(__name__)


def fit_temperature(logits: Tensor, labels: Tensor) -> float:
    """The temperature that minimises the negative log-likelihood of ``labels`` (LBFGS on
    ``log T``), clamped to the plausible range."""
    log_t = torch.zeros((), requires_grad=True)
    optimiser = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")
    logits, labels = logits.detach().float(), labels.long()

    def closure() -> Tensor:
        optimiser.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(closure)
    return float(log_t.detach().exp().clamp(MIN_TEMPERATURE, MAX_TEMPERATURE))


def fit(
    train: Outputs,
    train_labels: Tensor,
    validation: Outputs,
    validation_labels: Tensor,
    acceptance: float = DEFAULT_ACCEPTANCE,
    info: Mapping[str, Any] | None = None,
) -> TrustModel:
    """The trust model: statistics from ``train``, thresholds and temperature from
    ``validation`` (images the statistics never saw)."""
    if not 0.5 < acceptance < 1.0:
        raise ValueError(f"acceptance must be in (0.5, 1), not {acceptance}")
    classes = int(train.logits.shape[1])
    features = train.features.double().numpy()
    labels = train_labels.numpy()
    absent = [k for k in range(classes) if not (labels == k).any()]
    if absent:
        raise ValueError(f"no training images of class index {absent}")
    means = np.stack([features[labels == k].mean(axis=0) for k in range(classes)])
    precision = LedoitWolf(assume_centered=True).fit(features - means[labels]).precision_
    quantile = 1.0 - (1.0 - acceptance) / len(SIGNALS)
    unfitted = TrustModel(
        temperature=1.0,
        class_means=torch.from_numpy(means).float(),
        precision=torch.from_numpy(precision).float(),
        thresholds=dict.fromkeys(SIGNALS, math.inf),
        medians=dict.fromkeys(SIGNALS, 0.0),
        acceptance=acceptance,
    )
    values = unfitted.signal_values(validation)
    thresholds = {n: float(torch.quantile(values[n].double(), quantile)) for n in SIGNALS}
    medians = {n: float(values[n].double().median()) for n in SIGNALS}
    temperature = fit_temperature(validation.logits, validation_labels)
    model = TrustModel(
        temperature=temperature,
        class_means=unfitted.class_means,
        precision=unfitted.precision,
        thresholds=thresholds,
        medians=medians,
        acceptance=acceptance,
        info={},
    )
    accepted = torch.tensor([v.accepted for v in model.verdicts(validation)])
    truth = validation_labels.numpy()
    summary = {
        **dict(info or {}),
        "quantile": quantile,
        "validation_accepted": float(accepted.float().mean()),
        "validation_ece_before": expected_calibration_error(
            F.softmax(validation.logits, dim=1).numpy(), truth
        ),
        "validation_ece_after": expected_calibration_error(
            model.probabilities(validation.logits).numpy(), truth
        ),
    }
    return dataclasses.replace(model, info=summary)


class TrustFitter:
    """Fits and saves the trust model of a trained CoroNet (what ``fit_trust.json`` runs).

    ``train_items`` are the images the weights were trained on, ``validation_items`` images of
    the same distribution they never saw (``{"image": path, "label": index}``);
    ``preprocessing`` is the bundle's.
    """

    def __init__(
        self,
        network: CoroNet,
        preprocessing: Any,
        train_items: Sequence[Mapping[str, Any]],
        validation_items: Sequence[Mapping[str, Any]],
        output: str | Path,
        checkpoint: str | Path | None = None,
        acceptance: float = DEFAULT_ACCEPTANCE,
        batch_size: int = 16,
        device: str | torch.device = "cpu",
        progress: bool = True,
    ) -> None:
        if not train_items or not validation_items:
            raise ValueError("the trust model needs training and validation images")
        if checkpoint is not None:
            load_coronet_weights(network, checkpoint)
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.preprocessing = preprocessing
        self.train_items = list(train_items)
        self.validation_items = list(validation_items)
        self.output = Path(output)
        self.acceptance = acceptance
        self.batch_size = batch_size
        self.progress = progress

    def _outputs(self, items: Sequence[Mapping[str, Any]]) -> tuple[Outputs, Tensor]:
        images = (
            torch.as_tensor(self.preprocessing({"image": item["image"]})["image"]).to(
                self.device, torch.float32
            )
            for item in items
        )
        result = batched_outputs(self.network, images, self.batch_size, self.progress)
        return result, torch.tensor([int(item["label"]) for item in items])

    def run(self) -> TrustModel:
        train, train_labels = self._outputs(self.train_items)
        validation, validation_labels = self._outputs(self.validation_items)
        model = fit(
            train,
            train_labels,
            validation,
            validation_labels,
            self.acceptance,
            info={
                "train_images": len(self.train_items),
                "validation_images": len(self.validation_items),
            },
        )
        model.save(self.output)
        print(
            f"trust model written to {self.output}: temperature {model.temperature:.3f}, "
            f"{100 * model.info['validation_accepted']:.1f}% of validation images accepted, "
            f"ECE {100 * model.info['validation_ece_before']:.1f}% -> "
            f"{100 * model.info['validation_ece_after']:.1f}%"
        )
        return model
