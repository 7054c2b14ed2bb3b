"""PNG plots of a regression probe (predicted vs true, residuals) and of a multi-label probe with
unknown labels (per-label precision, recall, F1, AUROC and AUPRC).

Like `probekit.plots`, figures are drawn on matplotlib's Agg canvas directly, never through
`pyplot`: no global matplotlib state changes and no figure stays open.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from matplotlib.figure import Figure

from probekit.multilabel_metrics import multilabel_metrics
from probekit.plots import _POINT, _TRAIN, History, PathLike, _legend, _save, plot_history
from probekit.plots_multiclass import PER_CLASS_METRICS, plot_per_class_bars
from probekit.regression_metrics import regression_inputs, regression_metrics

MULTILABEL_PLOTS = ("history.png", "per_label.png", "per_label_ranking.png")
"""The files `write_multilabel_plots` writes (`history.png` only with a non-empty history)."""

REGRESSION_PLOTS = ("history.png", "regression.png")
"""The files `write_regression_plots` writes (`history.png` only with a non-empty history)."""

RANKING_METRICS = ("auroc", "auprc")
"""The metrics `per_label_ranking.png` draws per label, in order."""


def _number(value: float) -> str:
    return "undefined" if math.isnan(value) else f"{value:.3f}"


def _span(values: npt.NDArray[np.float64]) -> tuple[float, float]:
    """Axis limits around `values`, with a margin (one unit each side when they are all equal)."""
    low, high = float(values.min()), float(values.max())
    margin = 0.05 * (high - low) if high > low else max(1.0, 0.05 * abs(low))
    return low - margin, high + margin


def plot_regression(targets: npt.ArrayLike, predictions: npt.ArrayLike, path: PathLike) -> Path:
    """Predicted vs true values, with the line `y = x`, beside a histogram of the residuals.

    The left panel scatters one point per example over equal axis ranges, so points on the
    diagonal are exact predictions; its title gives the MAE and R² (`undefined` when the targets
    are constant or there is one example). The right panel bins the residuals
    `prediction - target`, with a line at 0 and the mean residual (the bias) in its title.

    Args:
        targets: the true values.
        predictions: the predicted values.
        path: where to write the PNG.

    Returns:
        The path written.

    Raises:
        UserError: bad inputs (see `probekit.regression_metrics.regression_inputs`).
    """
    y, p = regression_inputs(targets, predictions)
    metrics = regression_metrics(y, p)
    residuals = p - y
    fig = Figure(figsize=(11, 4.8))
    scatter, histogram = fig.subplots(1, 2, width_ratios=(1.15, 1))
    low, high = _span(np.concatenate([y, p]))
    scatter.plot([low, high], [low, high], "--", color="0.4", label="y = x (exact)")
    alpha = 0.8 if y.size <= 200 else 0.35
    scatter.scatter(y, p, s=12, color=_TRAIN, alpha=alpha, edgecolors="none", label="examples")
    scatter.set_xlim(low, high)
    scatter.set_ylim(low, high)
    scatter.set_aspect("equal", adjustable="box")
    scatter.grid(True, alpha=0.3)
    scatter.set_xlabel("True value")
    scatter.set_ylabel("Predicted value")
    scatter.set_title(
        f"Predicted vs true (MAE {metrics['mae']:.4g}, R² {_number(metrics['r2'])}, n={y.size})"
    )
    _legend(scatter, "upper left")
    bins = int(min(40, max(5, math.ceil(math.sqrt(y.size)))))
    r_low, r_high = _span(residuals)
    histogram.hist(residuals, bins=bins, range=(r_low, r_high), color="0.5", edgecolor="white")
    histogram.axvline(0.0, color=_POINT, linestyle="--", linewidth=1, label="no error")
    histogram.set_xlabel("Residual (prediction - target)")
    histogram.set_ylabel("Examples")
    histogram.set_title(f"Residuals (mean {float(residuals.mean()):.4g}, RMSE {metrics['rmse']:.4g})")
    histogram.grid(True, alpha=0.3)
    _legend(histogram, "upper left")
    fig.tight_layout()
    return _save(fig, path)


def per_label_values(
    labels: npt.ArrayLike,
    probs: npt.ArrayLike,
    label_names: Sequence[str],
    thresholds: Sequence[float] | None = None,
) -> dict[str, dict[str, float]]:
    """Per label, its metrics on its known rows (see `probekit.multilabel_metrics`), keyed by
    `"name (n=known, +support)"` in column order: the rows `write_multilabel_plots` draws."""
    metrics = multilabel_metrics(labels, probs, label_names, thresholds)
    return {
        f"{name} (n={int(entry['known'])}, +{int(entry['support'])})": entry
        for name, entry in metrics["per_label"].items()
    }


def write_multilabel_plots(
    folder: PathLike,
    history: History,
    labels: npt.ArrayLike,
    probs: npt.ArrayLike,
    label_names: Sequence[str],
    thresholds: Sequence[float] | None = None,
) -> list[Path]:
    """Write the report plots of a multi-label probe into `folder` (created if missing).

    Files, in order: `history.png` (`plot_history`, only when `history` is non-empty),
    `per_label.png` (precision, recall and F1 of each label at its threshold) and
    `per_label_ranking.png` (AUROC and AUPRC of each label). Every number is computed on the
    rows where that label is known (`nan` cells left out); each row of bars is named
    `"name (n=known rows, +known positives)"`, and an undefined value (a label without known
    rows, or whose known rows hold one class only for the ranking metrics) is marked by a cross.

    Args:
        folder: the output directory.
        history: per-epoch rows for `plot_history`.
        labels: `(N, L)` cells of `1`, `0` or `nan` (unknown).
        probs: `(N, L)` per-label probabilities.
        label_names: the `L` display names.
        thresholds: one decision threshold per label; `None` for `0.5` each.

    Returns:
        The paths written, in the order above.

    Raises:
        UserError: bad inputs (see `probekit.multilabel_metrics.multilabel_metrics`).
    """
    values = per_label_values(labels, probs, label_names, thresholds)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if history:
        written.append(plot_history(history, out / "history.png"))
    written.append(plot_per_class_bars(values, out / "per_label.png", PER_CLASS_METRICS))
    written.append(plot_per_class_bars(values, out / "per_label_ranking.png", RANKING_METRICS))
    return written


def write_regression_plots(
    folder: PathLike, history: History, targets: npt.ArrayLike, predictions: npt.ArrayLike
) -> list[Path]:
    """Write the report plots of a regression probe into `folder` (created if missing).

    Files, in order: `history.png` (`plot_history`, only when `history` is non-empty) and
    `regression.png` (`plot_regression`).

    Args:
        folder: the output directory.
        history: per-epoch rows for `plot_history`.
        targets: the true values.
        predictions: the predicted values.

    Returns:
        The paths written, in the order above.

    Raises:
        UserError: bad inputs (see `probekit.regression_metrics.regression_inputs`).
    """
    y, p = regression_inputs(targets, predictions)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if history:
        written.append(plot_history(history, out / "history.png"))
    written.append(plot_regression(y, p, out / "regression.png"))
    return written


def plot_token_scores(
    row: dict[str, object],
    threshold: float,
    path: PathLike,
    *,
    title: str | None = None,
    max_tokens: int = 200,
) -> Path:
    """A binary probe's per-token scores (one row of ``Probe.predict(..., per_token=True)``) as a
    step line over the tokens, with the threshold line and the first flagged token marked; the
    tokens label the x axis (the first ``max_tokens`` of them)."""
    tokens = [str(t) for t in row["tokens"]][:max_tokens]  # type: ignore[attr-defined]
    scores = np.asarray(row["scores"], dtype=np.float64)[:max_tokens]
    if scores.ndim != 1:
        raise ValueError("plot_token_scores draws a binary probe's scores (one number per token)")
    width = min(4.0 + 0.22 * len(tokens), 40.0)
    fig = Figure(figsize=(width, 3.6))
    ax = fig.add_subplot()
    x = np.arange(len(tokens))
    ax.step(x, scores, where="mid", color="tab:blue", label="score of the text cut here")
    ax.axhline(threshold, color="0.35", linestyle="--", linewidth=1, label=f"threshold {threshold:.3g}")
    first = row.get("first_flagged")
    if isinstance(first, int) and first < len(tokens):
        ax.plot([first], [scores[first]], "o", color=_POINT, label=f"first flagged: token {first}")
    ax.set_xticks(x, [t.replace("Ġ", "␣").replace("Ċ", "↵") for t in tokens], rotation=90, fontsize="x-small")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(-0.5, len(tokens) - 0.5)
    ax.set_ylabel("P(positive)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(title or f"per-token scores ({len(scores)} tokens)", fontsize="medium")
    _legend(ax, "upper left")
    fig.tight_layout()
    return _save(fig, path)
