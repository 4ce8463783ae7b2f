"""Evaluation of a trained CoroNet on a labelled test set, laid out like the paper.

``configs/evaluate.json`` runs :class:`Evaluator` on top of ``configs/inference.json``.  It
prints Tables 2-5 with the paper's figures beside ours and writes ``metrics.json``,
``report.txt``, ``confusion_matrix.png`` and ``roc.png`` to ``output_dir``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .datasets import class_counts, radiograph_dataset
from .metrics import EvaluationReport, evaluate_predictions, format_report, save_report
from .networks import CoroNet, load_coronet_weights
from .training import make_loader, predict, resolve_device

logger = logging.getLogger(__name__)


class Evaluator:
    """Predicts every test item, then computes and saves the report."""

    def __init__(
        self,
        network: nn.Module,
        items: Sequence[Mapping[str, Any]],
        output_dir: str | Path,
        class_names: Sequence[str],
        image_size: int = 256,
        batch_size: int = 8,
        checkpoint: str | Path | None = None,
        device: str = "auto",
        progress: bool = True,
    ) -> None:
        if not items:
            raise ValueError("the test set is empty")
        self.network = network
        self.items = [dict(i) for i in items]
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.image_size = image_size
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.progress = progress
        if checkpoint is not None:
            if not isinstance(network, CoroNet):
                raise TypeError("checkpoint loading needs the CoroNet network")
            load_coronet_weights(network, checkpoint)

    def run(self) -> EvaluationReport:
        counts = class_counts(self.items)
        logger.info("evaluating on %s", counts)
        loader = make_loader(radiograph_dataset(self.items, size=self.image_size), self.batch_size)
        self.network.to(self.device)
        labels, probs, _ = predict(self.network, loader, self.device, "evaluation", self.progress)
        report = evaluate_predictions(labels, probs, self.class_names)
        save_report(report, self.output_dir)
        print(format_report(report))
        print(f"written to {self.output_dir}")
        return report
