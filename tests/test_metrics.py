"""Evaluation figures in the layout of the paper's Tables 2-5."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from monai_bundle.scripts.metrics import (
    PAPER_CORONET,
    evaluate_predictions,
    format_report,
    save_report,
)

NAMES = ("normal", "pneumonia", "COVID-19")


def one_hot_probs(predicted: list[int]) -> np.ndarray:
    probs = np.full((len(predicted), 3), 0.05)
    probs[np.arange(len(predicted)), predicted] = 0.9
    return probs


def test_paper_confusion_matrix_reproduces_paper_tables() -> None:
    """Feeding the paper's own confusion matrix must give the paper's Tables 2-4."""
    cm = np.asarray(PAPER_CORONET["confusion"])
    labels, predicted = [], []
    for true_class, row in enumerate(cm):
        for pred_class, count in enumerate(row):
            labels += [true_class] * int(count)
            predicted += [pred_class] * int(count)
    report = evaluate_predictions(labels, one_hot_probs(predicted), NAMES)
    assert report.confusion == PAPER_CORONET["confusion"]
    assert report.accuracy == pytest.approx(PAPER_CORONET["accuracy"], abs=5e-4)
    assert report.precision_weighted == pytest.approx(PAPER_CORONET["precision_weighted"], abs=5e-4)
    assert report.recall_weighted == pytest.approx(PAPER_CORONET["recall_weighted"], abs=5e-4)
    assert report.f1_weighted == pytest.approx(PAPER_CORONET["f1_weighted"], abs=5e-4)
    for name in NAMES:
        assert report.sensitivity[name] == pytest.approx(
            PAPER_CORONET["sensitivity"][name], abs=5e-4
        )
        assert report.ppv[name] == pytest.approx(PAPER_CORONET["ppv"][name], abs=5e-4)


@pytest.mark.parametrize(
    ("labels", "predicted", "accuracy", "macro_sensitivity"),
    [
        ([0, 1, 2], [0, 1, 2], 1.0, 1.0),
        ([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0], 4 / 6, (0.5 + 1 + 0.5) / 3),
        ([0, 0, 0, 2], [0, 0, 0, 0], 0.75, (1 + 0 + 0) / 3),  # no pneumonia in the set
    ],
)
def test_small_cases(
    labels: list[int], predicted: list[int], accuracy: float, macro_sensitivity: float
) -> None:
    report = evaluate_predictions(labels, one_hot_probs(predicted), NAMES)
    assert report.accuracy == pytest.approx(accuracy)
    assert report.macro_sensitivity == pytest.approx(macro_sensitivity)
    assert sum(map(sum, report.confusion)) == len(labels)


@pytest.mark.parametrize(
    ("labels", "probs", "message"),
    [
        ([0, 1], np.zeros((3, 3)), "N x 3"),
        ([0], np.zeros((1, 2)), "N x 3"),
        ([], np.zeros((0, 3)), "empty"),
    ],
)
def test_bad_input(labels: list[int], probs: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        evaluate_predictions(labels, probs, NAMES)


def test_save_report_writes_json_text_and_pngs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=60)
    probs = rng.dirichlet(np.ones(3), size=60)
    probs[np.arange(60), labels] += 0.5
    report = evaluate_predictions(labels, probs / probs.sum(1, keepdims=True), NAMES)
    paths = save_report(report, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["accuracy"] == pytest.approx(report.accuracy)
    assert set(data["roc"]) == set(NAMES)
    for key in ("confusion", "roc"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = paths["text"].read_text()
    for table in ("Table 2", "Table 3", "Table 4", "Table 5"):
        assert table in text
    assert "paper" in format_report(report)
