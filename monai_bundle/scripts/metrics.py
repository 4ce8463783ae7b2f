"""Classification metrics laid out like the CoroNet paper's Tables 2-5, with PNG plots.

Table 2: accuracy and weighted precision, recall and F1 (the paper's "Recall" equals its
accuracy, which is what a support-weighted recall gives).  Table 3: per-class sensitivity.
Table 4: per-class positive predictive value.  Table 5: the confusion matrix, rows the true
class.  Macro averages and one-vs-rest ROC curves are added because the COVID-19 class is tiny
and accuracy hides it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    auc,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_curve,
)

#: The figures the CoroNet paper reports on its COVIDx test split (885/1058/10 images).
PAPER_CORONET: dict[str, Any] = {
    "test_set": "COVIDx as in the paper: 885 normal / 1058 pneumonia / 10 COVID-19",
    "accuracy": 0.9350,
    "precision_weighted": 0.9363,
    "recall_weighted": 0.9350,
    "f1_weighted": 0.9351,
    "sensitivity": {"normal": 0.9548, "pneumonia": 0.9187, "COVID-19": 0.900},
    "ppv": {"normal": 0.9066, "pneumonia": 0.9614, "COVID-19": 0.900},
    "confusion": [[845, 39, 1], [86, 972, 0], [1, 0, 9]],
}


@dataclass(frozen=True)
class RocCurve:
    fpr: list[float]
    tpr: list[float]
    auc: float | None  # None when the class is absent or alone in the test set


@dataclass(frozen=True)
class EvaluationReport:
    class_names: list[str]
    support: dict[str, int]
    accuracy: float
    precision_weighted: float
    recall_weighted: float
    f1_weighted: float
    precision_macro: float
    recall_macro: float
    f1_macro: float
    sensitivity: dict[str, float]
    ppv: dict[str, float]
    confusion: list[list[int]]
    roc: dict[str, RocCurve] = field(default_factory=dict)

    @property
    def macro_sensitivity(self) -> float:
        """Mean per-class sensitivity; the classifier's checkpoint is chosen on it."""
        return float(np.mean(list(self.sensitivity.values())))

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["macro_sensitivity"] = self.macro_sensitivity
        return data


def evaluate_predictions(
    labels: Sequence[int] | np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
) -> EvaluationReport:
    """Compute every figure of the report from true labels and an N x C probability array."""
    y_true = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probabilities, dtype=np.float64)
    n_classes = len(class_names)
    if probs.ndim != 2 or probs.shape[1] != n_classes or probs.shape[0] != y_true.shape[0]:
        raise ValueError(
            f"probabilities must be N x {n_classes} for {y_true.shape[0]} labels, got {probs.shape}"
        )
    if y_true.size == 0:
        raise ValueError("cannot evaluate an empty set")
    y_pred = probs.argmax(axis=1)
    classes = list(range(n_classes))
    cm = confusion_matrix(y_true, y_pred, labels=classes)
    precision, recall, _, support = precision_recall_fscore_support(
        y_true, y_pred, labels=classes, zero_division=0
    )
    weighted = precision_recall_fscore_support(
        y_true, y_pred, labels=classes, average="weighted", zero_division=0
    )
    macro = precision_recall_fscore_support(
        y_true, y_pred, labels=classes, average="macro", zero_division=0
    )
    names = list(class_names)
    return EvaluationReport(
        class_names=names,
        support={name: int(s) for name, s in zip(names, support, strict=True)},
        accuracy=float(accuracy_score(y_true, y_pred)),
        precision_weighted=float(weighted[0]),
        recall_weighted=float(weighted[1]),
        f1_weighted=float(weighted[2]),
        precision_macro=float(macro[0]),
        recall_macro=float(macro[1]),
        f1_macro=float(macro[2]),
        sensitivity={name: float(r) for name, r in zip(names, recall, strict=True)},
        ppv={name: float(p) for name, p in zip(names, precision, strict=True)},
        confusion=cm.astype(int).tolist(),
        roc={name: _roc(y_true == i, probs[:, i]) for i, name in enumerate(names)},
    )


def _roc(positive: np.ndarray, score: np.ndarray) -> RocCurve:
    if positive.all() or not positive.any():
        return RocCurve(fpr=[], tpr=[], auc=None)
    fpr, tpr, _ = roc_curve(positive, score)
    return RocCurve(fpr=fpr.tolist(), tpr=tpr.tolist(), auc=float(auc(fpr, tpr)))


def _pct(value: float | None) -> str:
    return "   n/a" if value is None else f"{100 * value:6.2f}"


def format_report(report: EvaluationReport, paper: Mapping[str, Any] | None = PAPER_CORONET) -> str:
    """Tables 2-5 of the paper as text, with the paper's figures beside ours when given."""
    names = report.class_names
    ref = dict(paper) if paper else None
    lines = ["Table 2: overall performance (%)"]
    header = f"{'':<10}{'Accuracy':>10}{'Precision':>11}{'Recall':>9}{'F1-score':>10}"
    lines.append(header)
    lines.append(
        f"{'ours':<10}{_pct(report.accuracy):>10}{_pct(report.precision_weighted):>11}"
        f"{_pct(report.recall_weighted):>9}{_pct(report.f1_weighted):>10}"
    )
    if ref:
        lines.append(
            f"{'paper':<10}{_pct(ref['accuracy']):>10}{_pct(ref['precision_weighted']):>11}"
            f"{_pct(ref['recall_weighted']):>9}{_pct(ref['f1_weighted']):>10}"
        )
    lines.append(
        f"macro averages: precision {_pct(report.precision_macro).strip()}, "
        f"recall {_pct(report.recall_macro).strip()}, F1 {_pct(report.f1_macro).strip()}"
    )
    for title, key in (("Table 3: sensitivity (%)", "sensitivity"), ("Table 4: PPV (%)", "ppv")):
        lines += ["", title, f"{'':<10}" + "".join(f"{n:>12}" for n in names)]
        ours: dict[str, float] = getattr(report, key)
        lines.append(f"{'ours':<10}" + "".join(f"{_pct(ours[n]):>12}" for n in names))
        if ref:
            lines.append(f"{'paper':<10}" + "".join(f"{_pct(ref[key].get(n)):>12}" for n in names))
    lines += ["", "Table 5: confusion matrix (rows: true class, columns: predicted)"]
    lines.append(f"{'':<12}" + "".join(f"{n:>12}" for n in names))
    for name, row in zip(names, report.confusion, strict=True):
        lines.append(f"{name:<12}" + "".join(f"{v:>12d}" for v in row))
    if ref:
        lines.append(f"paper ({ref['test_set']}): {ref['confusion']}")
    aucs = ", ".join(
        f"{n} {'n/a' if r.auc is None else f'{r.auc:.3f}'}" for n, r in report.roc.items()
    )
    lines += ["", f"ROC AUC (one vs rest): {aucs}"]
    counts = ", ".join(f"{n} {report.support[n]}" for n in names)
    lines.append(f"test images: {counts}")
    return "\n".join(lines)


def save_report(report: EvaluationReport, out_dir: Path, title: str = "CoroNet") -> dict[str, Path]:
    """Write metrics.json, report.txt, confusion_matrix.png and roc.png into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "metrics.json",
        "text": out_dir / "report.txt",
        "confusion": out_dir / "confusion_matrix.png",
        "roc": out_dir / "roc.png",
    }
    paths["json"].write_text(json.dumps(report.to_json(), indent=2))
    paths["text"].write_text(format_report(report) + "\n")

    names = report.class_names
    cm = np.asarray(report.confusion)
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}: confusion matrix")
    for (i, j), value in np.ndenumerate(cm):
        colour = "white" if value > cm.max() / 2 else "black"
        ax.text(j, i, str(value), ha="center", va="center", color=colour)
    fig.tight_layout()
    fig.savefig(paths["confusion"], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    for name, curve in report.roc.items():
        if curve.auc is not None:
            ax.plot(curve.fpr, curve.tpr, label=f"{name} (AUC {curve.auc:.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"{title}: ROC, one vs rest")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(paths["roc"], dpi=120)
    plt.close(fig)
    return paths
