"""PNG plots of a multi-class probe: confusion matrix, per-class PR curves, top-label reliability,
per-class metric bars, and the binary "any class but the negative one" view.

Inputs follow one convention: `labels` are ints in `0..K-1`, `probs` an `(N, K)` array of class
probabilities (rows summing to 1) and `class_names` the `K` display names. The predicted class
is the argmax of a row (the first on ties). Figures grow with `K` so that 13 to 20 classes, with
names as long as `violent_crimes`, stay legible.

Like `probekit.plots`, figures are drawn on matplotlib's Agg canvas directly, never through
`pyplot`: no global matplotlib state changes and no figure stays open.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from sklearn.metrics import (  # type: ignore[import-untyped]
    average_precision_score,
    precision_recall_curve,
    precision_recall_fscore_support,
)

from probekit.errors import UserError
from probekit.metrics import ECE_BINS, CalibrationBins, binned_ece, confidence_bins
from probekit.plots import (
    History,
    PathLike,
    _note,
    _save,
    _unit_axes,
    plot_history,
    plot_pr,
    plot_roc,
    reliability_figure,
)

PER_CLASS_METRICS = ("precision", "recall", "f1")
"""The metrics `write_multiclass_plots` draws per class, in order."""

MULTICLASS_PLOTS = ("history.png", "confusion.png", "pr_per_class.png", "reliability.png", "per_class.png")
"""The files `write_multiclass_plots` writes (`history.png` only with a non-empty history)."""

BINARY_PLOTS = ("binary_roc.png", "binary_pr.png")
"""The files `write_multiclass_plots` adds when given the `negative` class."""

_EMPTY = "0.93"  # face colour of cells and rows without data
_MISSING = "0.45"  # colour of the mark of a missing value


def multiclass_inputs(
    labels: npt.ArrayLike, probs: npt.ArrayLike, class_names: Sequence[str] | None = None
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """`probekit.multiclass_metrics.multiclass_inputs` (labels and probabilities checked and
    converted), and, when given, ``class_names`` checked to be the `K` distinct display names.

    Raises:
        UserError: what `probekit.multiclass_metrics.multiclass_inputs` refuses, or class names
            that do not match `K` or repeat.
    """
    from probekit.multiclass_metrics import multiclass_inputs as checked

    y, p = checked(labels, probs)
    k = p.shape[1]
    if class_names is not None:
        names = [str(name) for name in class_names]
        if len(names) != k:
            raise UserError(f"class_names must name {k} classes (the columns of probs); got {len(names)}")
        if len(set(names)) != k:
            raise UserError(f"class_names must be distinct; got {names}")
    return y, p


def _cell_fontsize(k: int) -> float:
    return 9.0 if k <= 8 else 8.0 if k <= 16 else 7.0


def _share_text(share: float) -> str:
    return "1" if share >= 0.9995 else "<.01" if share < 0.005 else f"{share:.2f}".lstrip("0")


def plot_confusion_matrix(
    labels: npt.ArrayLike, probs: npt.ArrayLike, class_names: Sequence[str], path: PathLike
) -> Path:
    """Confusion matrix of the argmax predictions, normalised per true class.

    Rows are the true classes (tick labels carry their number of examples), columns the
    predicted ones; each cell shows the share of its row, so the diagonal is the recall of each
    class. Cells with no examples are left blank; a row without examples is greyed out with a
    note. The title gives the accuracy.

    Args:
        labels: class indices in `0..K-1`.
        probs: `(N, K)` class probabilities.
        class_names: the `K` display names.
        path: where to write the PNG.

    Returns:
        The path written.
    """
    y, p = multiclass_inputs(labels, probs, class_names)
    k = p.shape[1]
    names = [str(name) for name in class_names]
    predicted = np.argmax(p, axis=1)
    counts = np.zeros((k, k), dtype=np.int64)
    np.add.at(counts, (y, predicted), 1)
    totals = counts.sum(axis=1)
    shares = np.zeros((k, k), dtype=np.float64)
    np.divide(counts, totals[:, None], out=shares, where=totals[:, None] > 0)
    accuracy = float(np.mean(predicted == y))

    margin = 0.085 * max(len(name) for name in names)  # room for the tick labels
    side = min(max(4.5, 0.5 * k + 2.0), 16.0)
    fig = Figure(figsize=(side + margin + 1.4, side + margin + 0.4), layout="constrained")
    ax = fig.subplots()
    cmap = colormaps["Blues"].with_extremes(bad=_EMPTY)
    shown = np.ma.masked_array(shares, mask=np.broadcast_to(totals[:, None] == 0, shares.shape))
    image = ax.imshow(shown, cmap=cmap, vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="Share of the true class (row)", shrink=0.8, pad=0.02)
    fontsize = _cell_fontsize(k)
    for true in range(k):
        if not totals[true]:
            ax.text(
                (k - 1) / 2,
                true,
                "no examples",
                ha="center",
                va="center",
                color="0.35",
                fontsize=fontsize,
                style="italic",
            )
            continue
        for pred in range(k):
            if counts[true, pred]:
                share = float(shares[true, pred])
                color = "white" if share > 0.55 else "black"
                ax.text(
                    pred, true, _share_text(share), ha="center", va="center", color=color, fontsize=fontsize
                )
    ax.set_xticks(range(k), names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(k), [f"{name} (n={int(n)})" for name, n in zip(names, totals, strict=True)])
    ax.set_xticks(np.arange(k + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(k + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=1.0)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_title(f"Confusion matrix, share of each true class (accuracy {accuracy:.3f}, n={y.size})")
    return _save(fig, path)


def _class_styles(k: int) -> list[tuple[tuple[float, ...], str]]:
    """`k` (colour, line style) pairs: the ten dark tab20 hues first, then the light ones dashed,
    then the same again dotted and dash-dotted."""
    palette = colormaps["tab20"].colors  # type: ignore[attr-defined]
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    styles = ["-", "--", ":", "-."]
    return [(tuple(palette[order[i % 20]]), styles[(i // 10) % 4]) for i in range(k)]


def plot_pr_per_class(
    labels: npt.ArrayLike, probs: npt.ArrayLike, class_names: Sequence[str], path: PathLike
) -> Path:
    """One-vs-rest precision-recall curve of each class, the legend sorted by average precision.

    Each class's curve scores its own probability column against "this class or not". A class
    without positive examples has no curve: it is left out and named in a note in the legend.
    The title gives the mean AP over the classes drawn.

    Args:
        labels: class indices in `0..K-1`.
        probs: `(N, K)` class probabilities.
        class_names: the `K` display names.
        path: where to write the PNG.

    Returns:
        The path written.
    """
    y, p = multiclass_inputs(labels, probs, class_names)
    k = p.shape[1]
    names = [str(name) for name in class_names]
    curves: list[tuple[float, int, npt.NDArray[np.float64], npt.NDArray[np.float64]]] = []
    absent: list[str] = []
    for c in range(k):
        positive = (y == c).astype(np.int64)
        if not positive.any():
            absent.append(names[c])
            continue
        precision, recall, _ = precision_recall_curve(positive, p[:, c])
        curves.append((float(average_precision_score(positive, p[:, c])), c, recall, precision))
    curves.sort(key=lambda curve: (-curve[0], curve[1]))
    styles = _class_styles(k)

    longest = max(len(name) for name in names)
    columns = 1 if k <= 24 else 2
    legend_width = 0.7 + 0.065 * (max(longest, 22) + 10)  # handle + "name (AP 0.87)"
    fig = Figure(figsize=(5.9 + columns * legend_width, max(6.0, 0.2 * k / columns + 1.5)))
    ax = fig.subplots()
    for ap, c, recall, precision in curves:
        color, style = styles[c]
        ax.plot(
            recall,
            precision,
            style,
            drawstyle="steps-post",
            color=color,
            linewidth=1.4,
            label=f"{names[c]} (AP {ap:.2f})",
        )
    handles, texts = ax.get_legend_handles_labels()
    if absent:
        handles.append(Line2D([], [], linestyle="none"))
        texts.append("\n".join(textwrap.wrap("no positives, left out: " + ", ".join(absent), 32)))
    ax.legend(
        handles,
        texts,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        fontsize="small",
        ncol=columns,
        title="class (AP), by AP",
        title_fontsize="small",
        frameon=False,
    )
    _unit_axes(ax)
    ax.set_aspect("equal")
    mean_ap = float(np.mean([curve[0] for curve in curves]))
    ax.set_title(f"Precision-recall per class, one-vs-rest (mean AP {mean_ap:.3f})")
    ax.set_xlabel("Recall")
    ax.set_ylabel("Precision")
    fig.tight_layout()
    return _save(fig, path)


def top_label_bins(labels: npt.ArrayLike, probs: npt.ArrayLike, bins: int = ECE_BINS) -> CalibrationBins:
    """Bin examples by their top-label confidence (the largest class probability).

    The bins are those of `probekit.metrics.calibration_bins`: `bins` equal widths over `[0, 1]`,
    closed on the right (the first also holds `0`); an example is correct when its argmax is its
    label. With two classes this is exactly the binary binning of `calibration_bins`, up to ties.

    Raises:
        UserError: bad inputs (see `multiclass_inputs`) or `bins < 1`.
    """
    if bins < 1:
        raise UserError(f"bins must be at least 1; got {bins}")
    y, p = multiclass_inputs(labels, probs)
    return confidence_bins(p.max(axis=1), np.argmax(p, axis=1) == y, bins)


def top_label_ece(labels: npt.ArrayLike, probs: npt.ArrayLike, bins: int = ECE_BINS) -> float:
    """Top-label expected calibration error over the bins of `top_label_bins`:
    `sum over bins of (n_b / n) * |accuracy_b - confidence_b|`, in `[0, 1]`."""
    return binned_ece(top_label_bins(labels, probs, bins))


def plot_reliability(
    labels: npt.ArrayLike, probs: npt.ArrayLike, path: PathLike, bins: int = ECE_BINS
) -> Path:
    """Top-label reliability diagram, with the ECE in the title.

    The confidence of an example is its largest class probability; it is correct when that
    class is its label. The top panel draws the accuracy of each non-empty confidence bin as a
    bar, the mean confidence per bin as points and the diagonal of perfect calibration; the
    bottom panel the number of examples per bin (written above the bars when there are at most
    20 bins). Confidence is never below `1 / K`, so the x axis starts at the bin holding it.

    Args:
        labels: class indices in `0..K-1`.
        probs: `(N, K)` class probabilities.
        path: where to write the PNG.
        bins: number of equal-width bins (15 by default).

    Returns:
        The path written.
    """
    stats = top_label_bins(labels, probs, bins)
    ece = top_label_ece(labels, probs, bins)
    k = np.asarray(probs).shape[1]
    fig, top, bottom, bars = reliability_figure(stats, (6, 6.5))
    lefts = stats.edges[:-1]
    low = float(lefts[min(int(np.searchsorted(stats.edges, 1.0 / k, side="left")) - 1, bins - 1)])
    top.set_xlim(max(low, 0.0), 1.0)
    top.set_ylabel("Accuracy of the top label")
    top.set_title(f"Top-label reliability (ECE = {ece:.4f}, {bins} bins, n={int(stats.counts.sum())})")
    if bins <= 20:
        bottom.bar_label(bars, [str(int(n)) if n else "" for n in stats.counts], fontsize=7, padding=1)
    bottom.set_ylim(0, max(int(stats.counts.max()), 1) * 1.3)
    bottom.set_xlabel("Confidence of the top label (largest class probability)")
    fig.tight_layout()
    return _save(fig, path)


def _finite(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def plot_per_class_bars(
    values: Mapping[str, Mapping[str, float | None]],
    path: PathLike,
    metrics: Sequence[str] = PER_CLASS_METRICS,
) -> Path:
    """Grouped horizontal bars: one group per class (top to bottom in mapping order), one bar
    per metric, each labelled with its value.

    A missing, `None` or non-finite value has no bar: a grey cross marks its place instead (and
    the legend says so). Metrics are usually in `[0, 1]`; the axis widens for values outside.

    Args:
        values: per class name, a mapping from metric name to value.
        path: where to write the PNG.
        metrics: the metrics to draw, in order within each group.

    Returns:
        The path written.
    """
    names = [str(name) for name in values]
    rows = len(names)
    per = max(len(metrics), 1)
    fig = Figure(
        figsize=(
            8.0 + 0.075 * max((len(n) for n in names), default=0),
            max(3.5, 0.16 * rows * per + 0.25 * rows + 1.6),
        )
    )
    ax = fig.subplots()
    height = 0.8 / per
    colors = colormaps["tab10"].colors  # type: ignore[attr-defined]
    drawn: list[float] = []
    missing = False
    for j, metric in enumerate(metrics):
        offsets = np.arange(rows) - 0.4 + height * (j + 0.5)
        row_values = [_finite(values[name].get(metric)) for name in names]
        have = [(o, v) for o, v in zip(offsets, row_values, strict=True) if v is not None]
        if have:
            ys, xs = zip(*have, strict=True)
            bars = ax.barh(ys, xs, height=height * 0.92, color=colors[j % 10], label=metric)
            ax.bar_label(bars, [f"{v:.2f}" for v in xs], fontsize=6.5, padding=2)
            drawn += list(xs)
        else:
            ax.barh([], [], color=colors[j % 10], label=metric)
        lost = [o for o, v in zip(offsets, row_values, strict=True) if v is None]
        if lost:
            missing = True
            # just inside the left edge: x in axes fraction, y in data
            ax.plot(
                [0.015] * len(lost),
                lost,
                "x",
                color=colors[j % 10],
                markersize=6,
                markeredgewidth=1.5,
                transform=ax.get_yaxis_transform(),
            )
    if missing:
        ax.plot([], [], "x", color=_MISSING, markeredgewidth=1.5, label="missing (nan)")
    if not drawn and not missing:
        _note(ax, "no values")
    low = min(0.0, *drawn) if drawn else 0.0
    high = max(1.0, *drawn) if drawn else 1.0
    ax.set_xlim(low - (0.08 * (high - low) if low < 0 else 0.0), high + 0.1 * (high - low))
    ax.set_ylim(max(rows, 1) - 0.5, -0.5)  # first class on top
    ax.set_yticks(range(rows), names)
    ax.set_xlabel("Value")
    ax.set_title("Per-class " + ", ".join(metrics))
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def per_class_metrics(
    labels: npt.ArrayLike, probs: npt.ArrayLike, class_names: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Precision, recall and F1 of each class's argmax predictions (`zero_division=0`), keyed by
    `"name (n=support)"`, in class order: the rows `write_multiclass_plots` draws."""
    y, p = multiclass_inputs(labels, probs, class_names)
    k = p.shape[1]
    precision, recall, f1, support = precision_recall_fscore_support(
        y, np.argmax(p, axis=1), labels=list(range(k)), zero_division=0
    )
    return {
        f"{name} (n={int(n)})": {"precision": float(pr), "recall": float(rc), "f1": float(f)}
        for name, pr, rc, f, n in zip(class_names, precision, recall, f1, support, strict=True)
    }


def write_multiclass_plots(
    folder: PathLike,
    history: History,
    labels: npt.ArrayLike,
    probs: npt.ArrayLike,
    class_names: Sequence[str],
    *,
    negative: int | None = None,
    threshold: float = 0.5,
) -> list[Path]:
    """Write the report plots of a multi-class probe into `folder` (created if missing).

    Files, in order: `history.png` (`plot_history`, only when `history` is non-empty),
    `confusion.png`, `pr_per_class.png`, `reliability.png` and `per_class.png` (precision,
    recall and F1 per class); with `negative`, also `binary_roc.png` and `binary_pr.png`: the
    binary view "any class other than `negative`" vs `negative`, scored by
    `clip(1 - probs[:, negative], 0, 1)`, with `threshold` marked.

    Args:
        folder: the output directory.
        history: per-epoch rows for `plot_history`.
        labels: class indices in `0..K-1`.
        probs: `(N, K)` class probabilities.
        class_names: the `K` display names.
        negative: index of the negative ("safe") class for the binary view; `None` skips it.
        threshold: the decision threshold of the binary view.

    Returns:
        The paths written, in the order above.

    Raises:
        UserError: bad inputs, or `negative` outside `0..K-1`.
    """
    y, p = multiclass_inputs(labels, probs, class_names)
    k = p.shape[1]
    if negative is not None and not 0 <= negative < k:
        raise UserError(f"negative must be a class index in 0..{k - 1}; got {negative}")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if history:
        written.append(plot_history(history, out / "history.png"))
    written.append(plot_confusion_matrix(y, p, class_names, out / "confusion.png"))
    written.append(plot_pr_per_class(y, p, class_names, out / "pr_per_class.png"))
    written.append(plot_reliability(y, p, out / "reliability.png"))
    written.append(plot_per_class_bars(per_class_metrics(y, p, class_names), out / "per_class.png"))
    if negative is not None:
        binary = (y != negative).astype(np.int64)
        score = np.clip(1.0 - p[:, negative], 0.0, 1.0)
        written.append(plot_roc(binary, score, out / "binary_roc.png", threshold))
        written.append(plot_pr(binary, score, out / "binary_pr.png", threshold))
    return written
