"""How far the stated probabilities are from the observed accuracy: ECE and reliability diagrams.

The expected calibration error (Guo et al. 2017) bins the images by their top probability
(``bins`` equal-width bins) and averages ``|accuracy - confidence|`` over the bins, weighted by
their share of the images.  A reliability diagram draws each bin's accuracy against its
confidence; a calibrated model lies on the diagonal.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

DEFAULT_BINS = 15


@dataclass(frozen=True)
class ReliabilityBins:
    """Per confidence bin: its edges, count, mean confidence and accuracy (NaN when empty)."""

    edges: NDArray[np.float64]
    counts: NDArray[np.int64]
    confidence: NDArray[np.float64]
    accuracy: NDArray[np.float64]

    @property
    def ece(self) -> float:
        total = int(self.counts.sum())
        filled = self.counts > 0
        gaps = np.abs(self.accuracy[filled] - self.confidence[filled])
        return float((self.counts[filled] / total * gaps).sum())


def reliability_bins(
    probabilities: NDArray[np.floating], labels: NDArray[np.integer], bins: int = DEFAULT_BINS
) -> ReliabilityBins:
    """Bin ``probabilities`` (N x K) by their maximum; ``labels`` (N) are the true classes."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    if probabilities.ndim != 2 or probabilities.shape[0] != labels.shape[0] or not len(labels):
        raise ValueError(f"probabilities {probabilities.shape} do not match labels {labels.shape}")
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    counts, mean_conf, accuracy = [], [], []
    for index, (low, high) in enumerate(itertools.pairwise(edges)):
        inside = (confidence > low) & (confidence <= high) if index else confidence <= high
        counts.append(int(inside.sum()))
        mean_conf.append(float(confidence[inside].mean()) if inside.any() else np.nan)
        accuracy.append(float(correct[inside].mean()) if inside.any() else np.nan)
    return ReliabilityBins(
        edges, np.array(counts, np.int64), np.array(mean_conf), np.array(accuracy)
    )


def expected_calibration_error(
    probabilities: NDArray[np.floating], labels: NDArray[np.integer], bins: int = DEFAULT_BINS
) -> float:
    """ECE of ``probabilities`` (N x K) for ``labels`` (N), in [0, 1]."""
    return reliability_bins(probabilities, labels, bins).ece


def save_reliability_diagram(
    curves: Mapping[str, ReliabilityBins], path: str | Path, title: str = "Reliability"
) -> Path:
    """A PNG with one accuracy-against-confidence curve per entry of ``curves`` (markers sized
    by the images in the bin), and below it the number of images per bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, (axes, counts) = plt.subplots(
        2, 1, figsize=(5.5, 6.5), dpi=120, sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    axes.plot([0, 1], [0, 1], color="0.6", linestyle="--", label="perfect calibration")
    width = 1.0 / max(len(curves), 1)
    for index, ((name, curve), marker) in enumerate(
        zip(curves.items(), itertools.cycle("os^D"), strict=False)
    ):
        filled = curve.counts > 0
        share = curve.counts[filled] / curve.counts.sum()
        line = axes.plot(
            curve.confidence[filled],
            curve.accuracy[filled],
            label=f"{name} (ECE {100 * curve.ece:.1f}%)",
        )[0]
        axes.scatter(
            curve.confidence[filled],
            curve.accuracy[filled],
            s=20 + 400 * share,
            marker=marker,
            color=line.get_color(),
            zorder=3,
        )
        bin_width = float(curve.edges[1] - curve.edges[0])
        left = curve.edges[:-1] + index * width * bin_width
        counts.bar(left, curve.counts, width=width * bin_width, align="edge", label=name)
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.set_ylabel("accuracy")
    axes.set_title(title)
    axes.legend(loc="upper left")
    axes.grid(alpha=0.3)
    counts.set_yscale("log")
    counts.yaxis.set_major_formatter(ticker.ScalarFormatter())
    counts.yaxis.set_minor_formatter(ticker.NullFormatter())
    counts.set_xlabel("confidence (top class probability)")
    counts.set_ylabel("images")
    counts.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
