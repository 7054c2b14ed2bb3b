"""PNG plots of a training run: loss/accuracy curves, ROC, PR, confusion matrix, calibration;
and of a layer sweep: validation metrics per hidden state.

Figures are drawn with matplotlib's Agg canvas directly (`Figure` + `FigureCanvasAgg`), never
through `pyplot`: importing or calling this module changes no global matplotlib state (backend,
open figures) and works without a display. Each function writes one PNG at 110 dpi and
returns its path; the figure is cleared once written.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import precision_recall_curve, roc_curve  # type: ignore[import-untyped]

from probekit.errors import UserError
from probekit.metrics import (
    ECE_BINS,
    CalibrationBins,
    binary_inputs,
    calibration_bins,
    compute_metrics,
    expected_calibration_error,
)

DPI = 110
"""Resolution of every PNG written here."""

PathLike = str | os.PathLike[str]
History = Sequence[Mapping[str, float | None]]

_TRAIN = "tab:blue"
_VAL = "tab:orange"
_POINT = "tab:red"
_UNDEFINED = "undefined: only one class present"
_Loc = Literal["best", "lower right", "lower left", "upper left"]


def _save(fig: Figure, path: PathLike) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, dpi=DPI, format="png")
    fig.clear()
    return out


def _note(ax: Axes, text: str) -> None:
    box = {"facecolor": "white", "edgecolor": "0.8", "boxstyle": "round"}
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.3", bbox=box)


def _unit_axes(ax: Axes) -> None:
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)


def _legend(ax: Axes, loc: _Loc = "best") -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc=loc, fontsize="small")


def _title(what: str, split: str | None, rows: int) -> str:
    """A plot title naming the split and its rows: ``ROC curve (test, n=785)``."""
    return f"{what} ({split}, n={rows:,})" if split else f"{what} (n={rows:,})"


def _value(row: Mapping[str, float | None], key: str) -> float | None:
    """`row[key]` as a float; `None` when missing, `None` or not finite."""
    value = row.get(key)
    return float(value) if value is not None and math.isfinite(value) else None


def _band(row: Mapping[str, Sequence[float] | None], key: str) -> tuple[float, float] | None:
    """`row[key]` as a finite interval `(lo, hi)`; `None` when missing or not finite."""
    band = row.get(key)
    if band is None or len(band) != 2 or not all(math.isfinite(v) for v in band):
        return None
    return float(band[0]), float(band[1])


def plot_history(history: History, path: PathLike, monitor: str | None = None) -> Path:
    """Loss and accuracy per epoch, train and validation, and the learning rate.

    Each row of `history` is one epoch with any of the keys `epoch`, `train_loss`,
    `train_accuracy`, `val_loss`, `val_accuracy`, `lr_head`; a missing, `None` or non-finite
    value is skipped, and a row without `epoch` counts as epoch `index + 1`. When rows carry
    `best: True`, the last such epoch is marked by a vertical line in every panel. ``monitor``
    (the run's `train.monitor`, e.g. ``auroc``), when neither loss nor accuracy, is drawn with
    val accuracy in the second panel (its ``val_<monitor>`` values). The third panel shows the
    head's learning rate at the end of each epoch.

    Args:
        history: the per-epoch rows (may be empty: the panels are drawn empty).
        path: where to write the PNG.
        monitor: the metric that picks the best epoch.

    Returns:
        The path written.
    """
    fig = Figure(figsize=(14, 4))
    loss_ax, acc_ax, lr_ax = fig.subplots(1, 3)
    given = [_value(row, "epoch") for row in history]
    epochs = [float(i + 1) if e is None else e for i, e in enumerate(given)]
    best = [e for e, row in zip(epochs, history, strict=True) if row.get("best")]
    if monitor and monitor not in ("loss", "accuracy"):
        points = [(e, _value(row, f"val_{monitor}")) for e, row in zip(epochs, history, strict=True)]
        shown = [(e, v) for e, v in points if v is not None]
        if shown:
            xs, ys = zip(*shown, strict=True)
            acc_ax.plot(
                xs, ys, "-.", marker="s", markersize=3, color="tab:green", label=f"val {monitor} (monitored)"
            )
    lr = [(e, _value(row, "lr_head")) for e, row in zip(epochs, history, strict=True)]
    lr_points = [(e, v) for e, v in lr if v is not None]
    if lr_points:
        xs, ys = zip(*lr_points, strict=True)
        lr_ax.plot(xs, ys, marker="o", markersize=3, color="0.3", label="head learning rate")
    else:
        _note(lr_ax, "no values")
    lr_ax.set_title("Learning rate (end of epoch)")
    lr_ax.set_xlabel("Epoch")
    lr_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    lr_ax.grid(True, alpha=0.3)
    if best:
        lr_ax.axvline(best[-1], color="0.3", linestyle=":")
    for ax, metric, label in ((loss_ax, "loss", "Loss"), (acc_ax, "accuracy", "Accuracy")):
        for split, color, style in (("train", _TRAIN, "-"), ("val", _VAL, "--")):
            values = [(e, _value(row, f"{split}_{metric}")) for e, row in zip(epochs, history, strict=True)]
            points = [(e, v) for e, v in values if v is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, style, marker="o", markersize=3, color=color, label=split)
        if best:
            ax.axvline(best[-1], color="0.3", linestyle=":", label=f"best epoch {best[-1]:g}")
        if not ax.lines:
            _note(ax, "no values")
        ax.set_title(
            f"{label} per epoch" if metric == "loss" or not monitor else "Accuracy and monitored metric"
        )
        ax.set_xlabel("Epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label if metric == "loss" or not monitor else "Accuracy / metric")
        ax.grid(True, alpha=0.3)
        _legend(ax)
    acc_ax.set_ylim(-0.02, 1.02)
    fig.suptitle("Training curves")
    fig.tight_layout()
    return _save(fig, path)


def _operating_point(
    y: npt.NDArray[np.int64], p: npt.NDArray[np.float64], threshold: float
) -> tuple[float, float, float | None]:
    """`(fpr, tpr, precision)` at `threshold`; precision is `None` with no predicted positives."""
    predicted = p >= threshold
    tp = int(np.sum(predicted & (y == 1)))
    fp = int(np.sum(predicted & (y == 0)))
    positives = int(y.sum())
    fpr = fp / (y.size - positives) if y.size > positives else math.nan
    tpr = tp / positives if positives else math.nan
    return fpr, tpr, (tp / (tp + fp) if tp + fp else None)


def _both_classes(y: npt.NDArray[np.int64]) -> bool:
    return 0 < int(y.sum()) < y.size


def plot_roc(
    labels: npt.ArrayLike,
    probs: npt.ArrayLike,
    path: PathLike,
    threshold: float | None = None,
    split: str | None = None,
) -> Path:
    """ROC curve with its AUROC, the chance diagonal, and the operating point at `threshold`;
    beside it the same curve over a log false-positive axis from 0.1% to 100%, where the
    low-FPR region a guard runs in is visible, with the recall at 1% FPR marked.

    With only one class present the curve is undefined: the chance line and a note are drawn.

    Args:
        labels: `0`/`1` labels.
        probs: probabilities of the positive class.
        path: where to write the PNG.
        threshold: the decision threshold to mark (`prob >= threshold` is positive); `None`
            marks nothing.
        split: the split's name, for the title (which also gives the row count).

    Returns:
        The path written.
    """
    y, p = binary_inputs(labels, probs)
    fig = Figure(figsize=(11, 5.5))
    ax, log_ax = fig.subplots(1, 2)
    ax.plot([0, 1], [0, 1], ":", color="0.5", label="chance")
    low = 1e-3
    log_ax.plot([low, 1], [low, 1], ":", color="0.5", label="chance")
    if _both_classes(y):
        fpr, tpr, _ = roc_curve(y, p)
        auroc = compute_metrics(y, p)["auroc"]
        ax.plot(fpr, tpr, color=_TRAIN, label=f"ROC (AUROC = {auroc:.3f})")
        log_ax.plot(np.clip(fpr, low, 1), tpr, color=_TRAIN, drawstyle="steps-post", label="ROC")
        at_one = float(tpr[fpr <= 0.01].max()) if np.any(fpr <= 0.01) else 0.0
        log_ax.axvline(0.01, color="0.4", linestyle="--", linewidth=1)
        log_ax.plot([0.01], [at_one], "s", color="tab:green", label=f"recall at 1% FPR = {at_one:.3f}")
        if threshold is not None:
            x, t, _ = _operating_point(y, p, threshold)
            label = f"threshold {threshold:.3g} (FPR {x:.3f}, TPR {t:.3f})"
            ax.plot([x], [t], "o", color=_POINT, label=label)
            log_ax.plot([max(x, low)], [t], "o", color=_POINT, label=f"threshold {threshold:.3g}")
    else:
        _note(ax, f"ROC {_UNDEFINED}")
        _note(log_ax, f"ROC {_UNDEFINED}")
    _unit_axes(ax)
    ax.set_aspect("equal")
    ax.set_title(_title("ROC curve", split, int(y.size)))
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate (recall)")
    _legend(ax, "lower right")
    log_ax.set_xscale("log")
    log_ax.set_xlim(low, 1)
    log_ax.set_ylim(-0.02, 1.02)
    log_ax.grid(True, which="both", alpha=0.3)
    log_ax.set_title("Low false-positive rates (log scale)")
    log_ax.set_xlabel("False positive rate (log; FPR 0 drawn at 0.1%)")
    log_ax.set_ylabel("True positive rate (recall)")
    _legend(log_ax, "upper left")
    fig.tight_layout()
    return _save(fig, path)


def plot_pr(
    labels: npt.ArrayLike,
    probs: npt.ArrayLike,
    path: PathLike,
    threshold: float | None = None,
    split: str | None = None,
) -> Path:
    """Precision-recall curve with its average precision, the prevalence baseline, and the
    operating point at `threshold`.

    The curve is drawn as steps, the way average precision sums it. With only one class
    present the curve is undefined (as `auprc` is in `compute_metrics`): a note is drawn. At a
    threshold that predicts nothing positive, precision is undefined and the point is not
    drawn (the legend says so).

    Args:
        labels: `0`/`1` labels.
        probs: probabilities of the positive class.
        path: where to write the PNG.
        threshold: the decision threshold to mark; `None` marks nothing.
        split: the split's name, for the title (which also gives the row count).

    Returns:
        The path written.
    """
    y, p = binary_inputs(labels, probs)
    fig = Figure(figsize=(5.5, 5.5))
    ax = fig.subplots()
    if _both_classes(y):
        precision, recall, _ = precision_recall_curve(y, p)
        auprc = compute_metrics(y, p)["auprc"]
        ax.plot(recall, precision, drawstyle="steps-post", color=_TRAIN, label=f"PR (AP = {auprc:.3f})")
        prevalence = float(y.mean())
        ax.axhline(prevalence, linestyle=":", color="0.5", label=f"chance (prevalence {prevalence:.3f})")
        if threshold is not None:
            _, r, prec = _operating_point(y, p, threshold)
            if prec is None:
                ax.plot([], [], "o", color=_POINT, label=f"threshold {threshold:.3g}: no predicted positives")
            else:
                label = f"threshold {threshold:.3g} (recall {r:.3f}, precision {prec:.3f})"
                ax.plot([r], [prec], "o", color=_POINT, label=label)
    else:
        _note(ax, f"PR curve {_UNDEFINED}")
    _unit_axes(ax)
    ax.set_aspect("equal")
    ax.set_title(_title("Precision-recall curve", split, int(y.size)))
    ax.set_xlabel("Recall")
    ax.set_ylabel("Precision")
    _legend(ax, "lower left")
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion(
    labels: npt.ArrayLike,
    probs: npt.ArrayLike,
    threshold: float,
    path: PathLike,
    class_names: Sequence[str] = ("0", "1"),
    split: str | None = None,
) -> Path:
    """Confusion matrix at `threshold`: true label in rows, predicted label in columns.

    Each cell shows its count and the share of its row (the true class).

    Args:
        labels: `0`/`1` labels.
        probs: probabilities of the positive class.
        threshold: the decision threshold (`prob >= threshold` is predicted `1`).
        path: where to write the PNG.
        class_names: display names of class `0` and class `1`.

    Returns:
        The path written.
    """
    if len(class_names) != 2:
        raise UserError(f"class_names must name two classes; got {len(class_names)}")
    y, p = binary_inputs(labels, probs)
    predicted = (p >= threshold).astype(np.int64)
    counts = np.zeros((2, 2), dtype=np.int64)
    np.add.at(counts, (y, predicted), 1)
    fig = Figure(figsize=(5, 4.5))
    ax = fig.subplots()
    image = ax.imshow(counts, cmap="Blues", vmin=0, vmax=max(int(counts.max()), 1))
    fig.colorbar(image, ax=ax, label="Examples")
    for true in range(2):
        row_total = int(counts[true].sum())
        for pred in range(2):
            value = int(counts[true, pred])
            share = f"\n{value / row_total:.1%}" if row_total else ""
            dark = value > 0.5 * max(int(counts.max()), 1)
            ax.text(
                pred, true, f"{value}{share}", ha="center", va="center", color="white" if dark else "black"
            )
    names = [str(name) for name in class_names]
    ax.set_xticks([0, 1], names)
    ax.set_yticks([0, 1], names)
    ax.set_xlabel("Predicted label")
    ax.set_ylabel("True label")
    ax.set_title(_title(f"Confusion matrix at threshold {threshold:.3g}", split, int(np.size(labels))))
    fig.tight_layout()
    return _save(fig, path)


def plot_calibration(
    labels: npt.ArrayLike,
    probs: npt.ArrayLike,
    path: PathLike,
    bins: int = ECE_BINS,
    split: str | None = None,
) -> Path:
    """Reliability diagram of the predicted class, with its ECE in the title.

    Uses the bins of `expected_calibration_error`: the confidence of the predicted class
    (`max(prob, 1 - prob)`) in `bins` equal-width bins. The top panel draws the accuracy of each
    non-empty bin as a bar, the mean confidence per bin as points, and the diagonal of perfect
    calibration; the bottom panel the number of examples per bin. Confidence is never below
    `0.5`, so the x axis starts there (at the edge of the bin holding `0.5`).

    Args:
        labels: `0`/`1` labels.
        probs: probabilities of the positive class.
        path: where to write the PNG.
        bins: number of bins (15 by default).

    Returns:
        The path written.
    """
    stats = calibration_bins(labels, probs, bins)
    ece = expected_calibration_error(labels, probs, bins)
    fig, top, bottom, _ = reliability_figure(stats, (5.5, 6))
    lefts = stats.edges[:-1]
    low = float(lefts[np.searchsorted(stats.edges, 0.5, side="left") - 1]) if bins > 1 else 0.0
    top.set_xlim(low, 1.0)
    top.set_ylabel("Accuracy")
    where = f"{split}, " if split else ""
    top.set_title(f"Reliability diagram ({where}n={int(np.size(labels)):,}; ECE = {ece:.4f}, {bins} bins)")
    bottom.set_xlabel("Confidence of the predicted class")
    fig.tight_layout()
    return _save(fig, path)


def reliability_figure(stats: CalibrationBins, size: tuple[float, float]) -> tuple[Figure, Axes, Axes, Any]:
    """A reliability diagram's figure: accuracy per confidence bin against the diagonal on top,
    examples per bin below (their bar container returned); titles and limits are the caller's."""
    fig = Figure(figsize=size)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    lefts = stats.edges[:-1]
    width = 1.0 / (len(stats.edges) - 1)
    filled = stats.counts > 0
    top.bar(
        lefts[filled],
        stats.accuracy[filled],
        width=width,
        align="edge",
        color=_TRAIN,
        alpha=0.7,
        edgecolor="white",
        label="accuracy per bin",
    )
    top.plot(
        stats.confidence[filled],
        stats.accuracy[filled],
        "o",
        color=_POINT,
        markersize=4,
        label="mean confidence per bin",
    )
    top.plot([0, 1], [0, 1], "--", color="0.4", label="perfect calibration")
    top.set_ylim(0.0, 1.02)
    top.grid(True, alpha=0.3)
    _legend(top, "upper left")
    bars = bottom.bar(lefts, stats.counts, width=width, align="edge", color="0.5", edgecolor="white")
    bottom.set_ylabel("Examples")
    bottom.grid(True, alpha=0.3)
    return fig, top, bottom, bars


REPORT_PLOTS = ("curves.png", "roc.png", "pr.png", "confusion.png", "calibration.png")
"""The files `write_report_plots` writes, in the order it returns them."""


def write_report_plots(
    run_dir: PathLike,
    history: History,
    labels: npt.ArrayLike,
    probs: npt.ArrayLike,
    threshold: float,
    class_names: Sequence[str] = ("0", "1"),
    split: str | None = None,
    monitor: str | None = None,
) -> list[Path]:
    """Write the five report plots of a run into `run_dir` (created if missing); ``split`` names
    the evaluated split in the titles, ``monitor`` the metric `plot_history` shows.

    Files: `curves.png` (`plot_history`), `roc.png` and `pr.png` (marking `threshold`),
    `confusion.png` (at `threshold`) and `calibration.png`, as listed in `REPORT_PLOTS`.

    Args:
        run_dir: the run's directory.
        history: per-epoch rows for `plot_history`.
        labels: `0`/`1` labels of the evaluated split.
        probs: probabilities of the positive class on that split.
        threshold: the decision threshold.
        class_names: display names of class `0` and class `1`.

    Returns:
        The paths written, in the order of `REPORT_PLOTS`.
    """
    y, p = binary_inputs(labels, probs)
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    writers: list[Callable[[Path], Path]] = [
        lambda path: plot_history(history, path, monitor),
        lambda path: plot_roc(y, p, path, threshold, split),
        lambda path: plot_pr(y, p, path, threshold, split),
        lambda path: plot_confusion(y, p, threshold, path, class_names, split),
        lambda path: plot_calibration(y, p, path, split=split),
    ]
    return [write(out / name) for write, name in zip(writers, REPORT_PLOTS, strict=True)]


LAYER_METRICS = (("accuracy", "accuracy", _TRAIN), ("auroc", "AUROC", _VAL), ("auprc", "AUPRC", "tab:green"))
"""The validation metrics `plot_layers` draws: key, label, colour."""


def plot_layers(
    layers: Sequence[int],
    metrics: Sequence[Mapping[str, float | None]],
    path: PathLike,
    combos: Sequence[tuple[str, Mapping[str, float | None]]] = (),
    best: str | None = None,
    intervals: Sequence[Mapping[str, Sequence[float] | None]] | None = None,
    rows: int | None = None,
) -> Path:
    """Validation accuracy, AUROC and AUPRC of a probe per hidden state, combinations beside them.

    The single layers are drawn as lines over the hidden-state index; each combination (a probe
    reading several layers) gets its own position to the right of them, after a separator, as
    points of the same colours. A missing, `None` or non-finite value is skipped. Confidence
    intervals, where given, are a shaded band around a line and error bars on a combination.
    The y axis runs from a little below the lowest value drawn (a multiple of 0.05) to 1.

    Args:
        layers: the hidden-state indices, in the order of `metrics`.
        metrics: per layer, a mapping with any of `accuracy`, `auroc`, `auprc`.
        path: where to write the PNG.
        combos: `(label, metrics)` per combination, in drawing order.
        best: the tick label to mark with a vertical line: a layer index as text (`"3"`) or a
            combination's label; `None` marks nothing.
        intervals: per layer, then per combination, a mapping of metric key to its interval
            `[lo, hi]` (e.g. the 95% bootstrap interval); a missing key or `None` draws none.
        rows: the number of validation rows, named in the title.

    Returns:
        The path written.
    """
    if len(layers) != len(metrics):
        raise UserError(f"plot_layers: {len(layers)} layers but {len(metrics)} rows of metrics")
    bands = list(intervals) if intervals is not None else [{}] * (len(layers) + len(combos))
    if len(bands) != len(layers) + len(combos):
        raise UserError(
            f"plot_layers: {len(bands)} rows of intervals for {len(layers)} layers and "
            f"{len(combos)} combinations"
        )
    xs = list(range(len(layers)))
    combo_xs = [len(layers) + 1 + i for i in range(len(combos))]  # after a one-position gap
    ticks = [*xs, *combo_xs]
    labels = [*(str(layer) for layer in layers), *(label for label, _ in combos)]
    fig = Figure(figsize=(min(max(6.5, 0.32 * len(ticks) + 3.0), 24.0), 4.5))
    ax = fig.subplots()
    drawn: list[float] = []
    for i, (key, name, color) in enumerate(LAYER_METRICS):
        points = [(x, v) for x, row in zip(xs, metrics, strict=True) if (v := _value(row, key)) is not None]
        if points:
            px, py = zip(*points, strict=True)
            ax.plot(px, py, "-", marker="o", markersize=4, color=color, label=f"val {name}")
        # a combination's metrics side by side around its tick, so their bars do not overlap
        shift = 0.15 * (i - (len(LAYER_METRICS) - 1) / 2)
        extra = [
            (x + shift, v)
            for x, (_, row) in zip(combo_xs, combos, strict=True)
            if (v := _value(row, key)) is not None
        ]
        if extra:
            cx, cy = zip(*extra, strict=True)
            ax.plot(cx, cy, linestyle="none", marker="D", markersize=6, color=color)
        drawn += [v for _, v in points + extra]
        spans = [
            (x, band) for x, row in zip([*xs, *combo_xs], bands, strict=True) if (band := _band(row, key))
        ]
        line = [(x, lo, hi) for x, (lo, hi) in spans if x < len(layers)]
        if line:
            lx, lows, highs = zip(*line, strict=True)
            ax.fill_between(lx, lows, highs, color=color, alpha=0.15, linewidth=0)
        for x, (low, high) in spans:
            if x > len(layers):
                ax.plot([x + shift, x + shift], [low, high], color=color, linewidth=1.5, alpha=0.6)
        drawn += [low for _, (low, _high) in spans]
    if combos:
        ax.axvline(len(layers), color="0.75", linewidth=1)
    if best is not None and best in labels:
        what = best if best in labels[len(layers) :] else f"layer {best}"
        ax.axvline(ticks[labels.index(best)], color="0.3", linestyle=":", label=f"best: {what}")
    if not ax.lines:
        _note(ax, "no values")
    ax.set_xticks(ticks, labels)
    ax.set_xlim(-0.5, (ticks[-1] if ticks else 0) + 0.5)
    ax.set_ylim(max(-0.02, math.floor(20 * min(drawn, default=0.0) - 1) / 20), 1.02)
    ax.set_xlabel("Hidden state (0 = embeddings)" + ("; then layer combinations" if combos else ""))
    ax.set_ylabel("Validation metric")
    shaded = (
        " (shaded: 95% interval)"
        if any(_band(row, key) for row in bands for key, _, _ in LAYER_METRICS)
        else ""
    )
    ax.set_title("Probe per layer: val" + (f", n={rows}" if rows is not None else "") + shaded)
    ax.grid(True, alpha=0.3)
    _legend(ax, "lower right")
    fig.tight_layout()
    return _save(fig, path)
