"""PNG plots of an evaluation. Figures are built with matplotlib's object API and rendered by Agg,
so no display, pyplot state or backend selection is involved."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from skindistil.evaluation.metrics import roc_auc, roc_curve
from skindistil.files import save_figure

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


def plot_subgroups(subgroups: dict, path: str | Path, title: str = "BMA by subgroup") -> Path:
    """One panel per attribute of `subgroups.subgroup_metrics`: each scored group's BMA with its
    interval as a horizontal error bar, labelled with the group's image count; groups too small to
    score are listed in grey without a bar."""
    attributes = subgroups["attributes"]
    names = list(attributes) or ["(no metadata)"]
    heights = [max(1, len(attributes.get(n, {}).get("groups", []))) for n in names]
    fig = Figure(figsize=(7, 1.2 + 0.32 * sum(heights) + 0.5 * len(names)), layout="constrained")
    axes = fig.subplots(len(names), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, name in zip(axes, names, strict=True):
        rows = attributes.get(name, {}).get("groups", [])
        for y, row in enumerate(rows):
            if row["scored"]:
                bma = row["balanced_accuracy"]
                low, high = row["balanced_accuracy_interval"] or (bma, bma)
                ax.errorbar([bma], [y], xerr=[[max(bma - low, 0)], [max(high - bma, 0)]], fmt="o", capsize=3,
                            color="tab:blue")
        ax.set(xlim=(0, 1), ylim=(-0.6, len(rows) - 0.4), title=name)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([f"{r['group']} (n={r['count']})" + ("" if r["scored"] else ", too small") for r in rows],
                           fontsize=8)
        for tick, row in zip(ax.get_yticklabels(), rows, strict=True):
            tick.set_color("black" if row["scored"] else "grey")
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel("balanced accuracy (BMA) with its interval")
    fig.suptitle(title)
    return _save(fig, path)


def plot_early_exit_curve(points: Sequence[dict], per_exit_bma: dict, path: str | Path, title: str = "") -> Path:
    """BMA against the mean depth used, one point per early-exit threshold (annotated with it), over
    the BMA of each exit used alone (grey, dashed): how much accuracy each block of compute buys."""
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.subplots()
    depths = sorted(per_exit_bma)
    ax.plot(depths, [per_exit_bma[d] for d in depths], color="grey", linestyle="--", marker=".",
            label="one exit for all images")
    x = [p["mean_depth"] for p in points]
    y = [p["balanced_accuracy"] for p in points]
    ax.plot(x, y, marker="o", label="early exit")
    for p in points:
        tau = p["threshold"] if isinstance(p["threshold"], str) else f"{p['threshold']:g}"
        ax.annotate(tau, (p["mean_depth"], p["balanced_accuracy"]), textcoords="offset points", xytext=(4, -10),
                    fontsize=7)
    ax.set(title=title or "Early exit", xlabel="mean depth used (blocks)", ylabel="balanced accuracy (BMA)",
           xticks=depths)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_bma_by_depth(lines: dict[str, dict[int, float]], teachers: dict[str, float], path: str | Path,
                      title: str = "BMA by depth") -> Path:
    """The paper's family figure: x = depth in blocks, y = BMA, one line per method (`lines`: label ->
    {depth: BMA}), each teacher a horizontal dashed line (`teachers`: label -> BMA)."""
    fig = Figure(figsize=(7.5, 5), layout="constrained")
    ax = fig.subplots()
    all_depths = sorted({d for series in lines.values() for d in series})
    for label, series in lines.items():
        depths = sorted(series)
        ax.plot(depths, [series[d] for d in depths], marker="o", label=label)
    for i, (label, bma) in enumerate(teachers.items()):
        ax.axhline(bma, color="black", linestyle="--", linewidth=1, alpha=1.0 - 0.25 * (i % 3), label=label)
    ax.set(title=title, xlabel="depth (blocks)", ylabel="balanced accuracy (BMA)")
    if all_depths:
        ax.set_xticks(range(1, max(all_depths) + 1))
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def plot_ablation(labels: Sequence[str], val_bma: Sequence[float], test_bma: Sequence[float], path: str | Path,
                  teacher_bma: float | None = None, title: str = "Loss ablation") -> Path:
    """Grouped bars of validation and test BMA per variant, with the teacher's test BMA as a dashed
    line and each test bar labelled with its value."""
    x = np.arange(len(labels))
    fig = Figure(figsize=(1.2 * len(labels) + 3, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.bar(x - 0.2, val_bma, width=0.4, label="val BMA", color="tab:blue", alpha=0.6)
    bars = ax.bar(x + 0.2, test_bma, width=0.4, label="test BMA", color="tab:orange")
    ax.bar_label(bars, fmt="%.3f", fontsize=7)
    if teacher_bma is not None:
        ax.axhline(teacher_bma, color="black", linestyle="--", linewidth=1, label="teacher test BMA")
    ax.set(title=title, ylabel="balanced accuracy (BMA)", xticks=x)
    ax.set_xticklabels(labels)
    ax.legend(loc="lower right")
    return _save(fig, path)


def _save(fig: Figure, path: str | Path) -> Path:
    return save_figure(fig, path, dpi=DPI, format="png")


def plot_training_curves(histories: dict[str, dict[str, Sequence[float]]], path: str | Path) -> Path:
    """Per run (label -> {"epoch", "train_loss", "val_balanced_accuracy"}): training loss and validation BMA
    by epoch."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    loss_ax, bma_ax = fig.subplots(1, 2)
    for label, history in histories.items():
        loss_ax.plot(history["epoch"], history["train_loss"], marker=".", label=label)
        bma_ax.plot(history["epoch"], history["val_balanced_accuracy"], marker=".", label=label)
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    bma_ax.set(xlabel="epoch", ylabel="balanced accuracy", title="Validation BMA", ylim=(0, 1))
    for ax in (loss_ax, bma_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)
