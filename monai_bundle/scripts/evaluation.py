"""Evaluation of a trained CoroNet on a labelled test set, laid out like the paper.

``configs/evaluate.json`` runs :class:`Evaluator` on top of ``configs/inference.json``.  It
prints Tables 2-5 with the paper's figures beside ours and writes ``metrics.json``,
``report.txt``, ``confusion_matrix.png`` and ``roc.png`` to ``output_dir``.

With the bundle's trust model (:mod:`.trust`) it also reports what the gate and the
calibration do on the test set: the share of images the gate accepts and the accuracy on them,
and the expected calibration error before and after temperature scaling, with a reliability
diagram (``reliability.png``) and a ``trust`` section in ``metrics.json`` and ``report.txt``.
The paper's tables use the calibrated probabilities (the same predicted classes).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .calibration import reliability_bins, save_reliability_diagram
from .datasets import class_counts, radiograph_dataset
from .metrics import EvaluationReport, evaluate_predictions, format_report, save_report
from .networks import CoroNet, load_coronet_weights
from .training import make_loader, resolve_device
from .trust import Outputs, TrustModel, outputs

logger = logging.getLogger(__name__)


def trust_summary(model: TrustModel, result: Outputs, labels: np.ndarray) -> dict[str, Any]:
    """Gate acceptance, accuracy on the accepted images, ECE before and after calibration."""
    accepted = np.array([v.accepted for v in model.verdicts(result)])
    raw = F.softmax(result.logits, dim=1).numpy()
    calibrated = model.probabilities(result.logits).numpy()
    correct = calibrated.argmax(axis=1) == labels
    before, after = reliability_bins(raw, labels), reliability_bins(calibrated, labels)
    return {
        "temperature": model.temperature,
        "gate_acceptance": float(accepted.mean()),
        "accuracy_accepted": float(correct[accepted].mean()) if accepted.any() else None,
        "accuracy_all": float(correct.mean()),
        "ece_before": before.ece,
        "ece_after": after.ece,
        "bins": {"before": before, "after": after},
    }


def format_trust(summary: Mapping[str, Any]) -> str:
    accepted = summary["accuracy_accepted"]
    return "\n".join(
        [
            "Trust (gate and calibration)",
            f"  gate accepts {100 * summary['gate_acceptance']:.1f}% of the test images; "
            f"accuracy on them {'-' if accepted is None else f'{100 * accepted:.1f}%'} "
            f"(all: {100 * summary['accuracy_all']:.1f}%)",
            f"  expected calibration error {100 * summary['ece_before']:.2f}% before, "
            f"{100 * summary['ece_after']:.2f}% after temperature scaling "
            f"(T = {summary['temperature']:.3f})",
        ]
    )


class Evaluator:
    """Predicts every test item, then computes and saves the report."""

    def __init__(
        self,
        network: CoroNet,
        items: Sequence[Mapping[str, Any]],
        output_dir: str | Path,
        class_names: Sequence[str],
        image_size: int = 256,
        batch_size: int = 8,
        checkpoint: str | Path | None = None,
        device: str = "auto",
        progress: bool = True,
        trust: TrustModel | None = None,
    ) -> None:
        if not items:
            raise ValueError("the test set is empty")
        if not isinstance(network, CoroNet):
            raise TypeError("the evaluation needs the CoroNet network")
        self.network = network
        self.items = [dict(i) for i in items]
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.image_size = image_size
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.progress = progress
        self.trust = trust
        if checkpoint is not None:
            load_coronet_weights(network, checkpoint)

    def _outputs(self) -> tuple[Outputs, np.ndarray]:
        loader = make_loader(radiograph_dataset(self.items, size=self.image_size), self.batch_size)
        self.network.to(self.device).eval()
        parts, labels = [], []
        for data in tqdm(loader, desc="evaluation", leave=False, disable=not self.progress):
            images = torch.as_tensor(data["image"]).to(self.device, torch.float32)
            parts.append(outputs(self.network, images).to_cpu())
            labels.append(torch.as_tensor(data["label"]).view(-1).numpy())
        result = Outputs(
            logits=torch.cat([p.logits for p in parts]),
            features=torch.cat([p.features for p in parts]),
            signals={n: torch.cat([p.signals[n] for p in parts]) for n in parts[0].signals},
        )
        return result, np.concatenate(labels)

    def run(self) -> EvaluationReport:
        counts = class_counts(self.items)
        logger.info("evaluating on %s", counts)
        result, labels = self._outputs()
        if self.trust is None:
            probs = F.softmax(result.logits, dim=1).numpy()
        else:
            probs = self.trust.probabilities(result.logits).numpy()
        report = evaluate_predictions(labels, probs, self.class_names)
        save_report(report, self.output_dir)
        print(format_report(report))
        if self.trust is not None:
            summary = trust_summary(self.trust, result, labels)
            bins = summary.pop("bins")
            save_reliability_diagram(
                {"before calibration": bins["before"], "after calibration": bins["after"]},
                self.output_dir / "reliability.png",
                "CoroNet: reliability on the test set",
            )
            metrics_file = self.output_dir / "metrics.json"
            metrics = json.loads(metrics_file.read_text())
            metrics["trust"] = summary
            metrics_file.write_text(json.dumps(metrics, indent=2))
            with (self.output_dir / "report.txt").open("a") as handle:
                handle.write("\n" + format_trust(summary) + "\n")
            print(format_trust(summary))
        print(f"written to {self.output_dir}")
        return report
