"""PNG plots of an evaluation. Figures are built with matplotlib's object API and rendered by Agg,
so no display, pyplot state or backend selection is involved."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from skindistil.evaluation.metrics import roc_auc, roc_curve

DPI = 120


def plot_confusion_matrix(
    counts: np.ndarray, class_names: Sequence[str], path: str | Path, support: np.ndarray | None = None
) -> Path:
    """Two panels: raw counts, and counts divided by each true class's support (default: the row
    sums), so that with undecided rows counted in `support` the diagonal is per-class recall."""
    counts = np.asarray(counts)
    support = counts.sum(axis=1) if support is None else np.asarray(support)
    normalised = np.divide(counts, support[:, None], out=np.zeros(counts.shape), where=support[:, None] > 0)
    k = len(class_names)
    size = 3.0 + 0.45 * k
    fig = Figure(figsize=(2 * size + 1.0, size), layout="constrained")
    for ax, values, title, fmt in zip(
        fig.subplots(1, 2),
        (counts, normalised),
        ("counts", "row-normalised (recall on diagonal)"),
        ("d", ".2f"),
        strict=True,
    ):
        image = ax.imshow(values, cmap="Blues", vmin=0)
        fig.colorbar(image, ax=ax, shrink=0.8)
        ax.set(title=title, xlabel="predicted", ylabel="true", xticks=range(k), yticks=range(k))
        ax.set_xticklabels(class_names, rotation=45, ha="right")
        ax.set_yticklabels(class_names)
        threshold = values.max() / 2 if values.max() > 0 else 1
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    format(values[i, j], fmt),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if values[i, j] > threshold else "black",
                )
    return _save(fig, path)


def plot_roc_curves(
    probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str], path: str | Path
) -> Path:
    """One-vs-rest ROC curve of every class that has both positive and negative samples, with its
    AUC in the legend; classes without them are listed as skipped."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    fig = Figure(figsize=(6.5, 6), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    skipped = []
    for c, name in enumerate(class_names):
        positive = labels == c
        if positive.all() or not positive.any():
            skipped.append(name)
            continue
        fpr, tpr, _ = roc_curve(positive, probs[:, c])
        ax.plot(fpr, tpr, linewidth=1.5, label=f"{name} (AUC {roc_auc(positive, probs[:, c]):.3f})")
    title = "ROC, one class vs rest"
    if skipped:
        title += f"\n(no curve for {', '.join(skipped)}: one side has no sample)"
    ax.set(
        title=title, xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01)
    )
    if len(skipped) < len(class_names):
        ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_reliability(bins: dict, path: str | Path, ece: float | None = None) -> Path:
    """Reliability diagram from `metrics.reliability_bins`: accuracy per confidence bin against the
    diagonal of perfect calibration, over a histogram of how many samples fall in each bin."""
    edges = np.asarray(bins["edges"], dtype=float)
    count = np.asarray(bins["count"])
    accuracy = np.nan_to_num(np.asarray(bins["accuracy"], dtype=float))
    width = np.diff(edges)
    fig = Figure(figsize=(6, 7), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(edges[:-1], accuracy, width=width, align="edge", edgecolor="black", label="accuracy")
    top.plot([0, 1], [0, 1], color="red", linestyle="--", label="perfect calibration")
    title = "Reliability (top-1 confidence)"
    if ece is not None:
        title += f", ECE {ece:.4f}"
    top.set(title=title, ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    top.legend(loc="upper left")
    bottom.bar(edges[:-1], count, width=width, align="edge", edgecolor="black", color="grey")
    bottom.set(xlabel="confidence", ylabel="samples")
    return _save(fig, path)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=DPI, format="png")
    return path
