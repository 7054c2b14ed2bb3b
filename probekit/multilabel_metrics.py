"""Evaluation metrics of a multi-label probe whose labels may be missing, and its thresholds.

Labels are an `(N, L)` array of `1.0` (the label applies), `0.0` (it does not) or `nan` (unknown);
probabilities an `(N, L)` array, one sigmoid output per label. An unknown cell contributes
nothing to any metric: each label is scored on the rows where it is known, and pooled numbers
(micro F1, Hamming loss, subset accuracy) count known cells only. A cell is predicted positive
when `prob >= threshold` of its label. Per-label numbers come from
`probekit.metrics.compute_metrics` on the known rows of the column (scikit-learn underneath);
conventions follow `probekit.metrics`: `UserError` for bad input, `nan` for metrics the data
leave undefined.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from probekit.errors import UserError
from probekit.metrics import (
    ThresholdRule,
    check_threshold_rule,
    choose_threshold,
    compute_metrics,
    distinct_names,
)

PER_LABEL_KEYS = (
    "precision",
    "recall",
    "f1",
    "auroc",
    "auprc",
    "recall_at_1pct_fpr",
    "support",
    "known",
    "threshold",
)
"""The keys of each entry of `multilabel_metrics(...)["per_label"]`, in order."""

_FROM_BINARY = ("precision", "recall", "f1", "auroc", "auprc", "recall_at_1pct_fpr")


def _first_cell(mask: npt.NDArray[np.bool_]) -> tuple[int, int, str]:
    """Row and column of the first `True` cell (row-major), and a note on how many more there are."""
    rows, columns = np.nonzero(mask)
    more = f" (and {rows.size - 1} more cells)" if rows.size > 1 else ""
    return int(rows[0]), int(columns[0]), more


def multilabel_inputs(
    labels: npt.ArrayLike, probs: npt.ArrayLike
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Check and convert multi-label labels (with unknown cells) and probabilities to numpy arrays.

    Args:
        labels: an `(N, L)` array, each cell `1` (positive), `0` (negative) or `nan` (unknown);
            bools and ints are accepted.
        probs: an `(N, L)` array of per-label probabilities, finite and in `[0, 1]`.

    Returns:
        `(labels, probs)` as two `(N, L)` `float64` arrays.

    Raises:
        UserError: arrays that are not 2-D or not numeric, different shapes, no rows or no
            columns, a label cell other than 0, 1 or nan, or a probability that is not finite
            or outside `[0, 1]` (the message names the first offending row and column).
    """
    try:
        y = np.asarray(labels, dtype=np.float64)
        p = np.asarray(probs, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise UserError(f"labels and probs must be numeric arrays: {exc}") from None
    if y.ndim != 2 or p.ndim != 2:
        raise UserError(
            f"labels and probs must be 2-D (examples x labels); got shapes {y.shape} and {p.shape}"
        )
    if y.shape != p.shape:
        raise UserError(f"labels and probs differ in shape: {y.shape} and {p.shape}")
    if y.shape[0] == 0:
        raise UserError("no examples to evaluate: labels and probs have no rows")
    if y.shape[1] == 0:
        raise UserError("labels and probs must have at least one column (label)")
    bad = ~(np.isnan(y) | (y == 0.0) | (y == 1.0))
    if bad.any():
        row, column, more = _first_cell(bad)
        raise UserError(
            f"labels[{row}, {column}] is {y[row, column]!r}; label cells must be 0, 1 or nan (unknown){more}"
        )
    bad = ~np.isfinite(p)
    if bad.any():
        row, column, more = _first_cell(bad)
        raise UserError(f"probs[{row}, {column}] is {p[row, column]!r}; probs must be finite{more}")
    bad = (p < 0.0) | (p > 1.0)
    if bad.any():
        row, column, more = _first_cell(bad)
        raise UserError(f"probs[{row}, {column}] is {p[row, column]!r}; probs must lie in [0, 1]{more}")
    return y, p


def _check_thresholds(thresholds: Sequence[float] | npt.ArrayLike | None, count: int) -> list[float]:
    """One float threshold per label (`0.5` each by default), or `UserError`."""
    if thresholds is None:
        return [0.5] * count
    try:
        values = np.asarray(thresholds, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise UserError(f"thresholds must be numbers: {exc}") from None
    if values.ndim != 1 or values.size != count:
        raise UserError(f"need one threshold per label ({count}); got shape {values.shape}")
    if np.isnan(values).any():
        raise UserError(f"threshold of label {int(np.flatnonzero(np.isnan(values))[0])} is nan, not a number")
    return [float(v) for v in values]


def _mean_defined(values: Sequence[float]) -> float:
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan


def _label_metrics(
    y: npt.NDArray[np.float64], p: npt.NDArray[np.float64], threshold: float
) -> dict[str, float]:
    """The per-label entry for one column: `compute_metrics` on its known rows (`nan` if none)."""
    known = ~np.isnan(y)
    if not known.any():
        entry = dict.fromkeys(_FROM_BINARY, math.nan)
    else:
        binary = compute_metrics(y[known].astype(np.int64), p[known], threshold)
        entry = {key: binary[key] for key in _FROM_BINARY}
    entry["support"] = float(np.sum(y[known] == 1.0))
    entry["known"] = float(known.sum())
    entry["threshold"] = float(threshold)
    return entry


def _pooled(
    y: npt.NDArray[np.float64], predicted: npt.NDArray[np.bool_]
) -> tuple[float, float, float, float]:
    """`(f1_micro, subset_accuracy, hamming_loss, known_fraction)` over the known cells."""
    known = ~np.isnan(y)
    positive = y == 1.0  # false on unknown cells
    tp = int(np.sum(predicted & positive))
    fp = int(np.sum(predicted & known & ~positive))
    fn = int(np.sum(~predicted & positive))
    cells = int(known.sum())
    wrong = known & (predicted != positive)
    rows = known.any(axis=1)
    if cells:
        f1_micro = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
        subset = float(np.mean(~wrong[rows].any(axis=1)))
        hamming = float(wrong.sum() / cells)
    else:
        f1_micro = subset = hamming = math.nan
    return float(f1_micro), subset, hamming, cells / y.size


def multilabel_metrics(
    labels: npt.ArrayLike,
    probs: npt.ArrayLike,
    label_names: Sequence[str],
    thresholds: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Metrics of a multi-label classifier with unknown label cells, per label and averaged.

    Cell `(i, j)` is predicted positive when `probs[i, j] >= thresholds[j]`. Unknown (`nan`)
    cells are left out of everything. The result holds (floats unless noted):

    - `f1`, `precision`, `recall`: macro averages, the mean of the per-label values over the
      labels with at least one known row; `nan` when no label has one.
    - `f1_micro`: F1 of all known cells pooled (`zero_division=0`); `nan` with no known cell.
    - `auroc`, `auprc`, `recall_at_1pct_fpr`: the mean of the per-label values over the labels
      where they are defined; `nan` when none is.
    - `subset_accuracy`: among the rows with at least one known label, the fraction whose known
      labels are all predicted right; `nan` with no known cell.
    - `hamming_loss`: the fraction of known cells predicted wrong; `nan` with no known cell.
    - `known_fraction`: known cells over all `N * L` cells.
    - `n`: the number of rows (all of them, known cells or not).
    - `per_label` (dict): label name -> `{"precision", "recall", "f1", "auroc", "auprc",
      "recall_at_1pct_fpr", "support", "known", "threshold"}` (`PER_LABEL_KEYS`): the first six
      are `probekit.metrics.compute_metrics` on the label's known rows (scikit-learn's
      `zero_division=0`; ranking metrics `nan` when those rows hold one class only), all `nan`
      for a label with no known row; `support` is the number of known positives, `known` the
      number of known rows, `threshold` the label's threshold.
    - `label_names` (list of str).

    Args:
        labels: `(N, L)` cells of `1`, `0` or `nan` (unknown).
        probs: `(N, L)` per-label probabilities in `[0, 1]`.
        label_names: the `L` label names, in column order, all different.
        thresholds: one decision threshold per label; `None` for `0.5` each.

    Returns:
        The metrics, keyed as listed above.

    Raises:
        UserError: bad inputs (see `multilabel_inputs`), label names that are not `L` distinct
            strings, or thresholds that are not `L` numbers (a `nan` among them included).
    """
    y, p = multilabel_inputs(labels, probs)
    count = y.shape[1]
    names = distinct_names(label_names, count, "label")
    cutoffs = _check_thresholds(thresholds, count)
    per_label = {name: _label_metrics(y[:, j], p[:, j], cutoffs[j]) for j, name in enumerate(names)}
    entries = list(per_label.values())
    predicted = p >= np.asarray(cutoffs)[None, :]
    f1_micro, subset, hamming, known_fraction = _pooled(y, predicted)

    def macro(key: str) -> float:
        return _mean_defined([entry[key] for entry in entries])

    return {
        "f1": macro("f1"),
        "f1_micro": f1_micro,
        "auroc": macro("auroc"),
        "auprc": macro("auprc"),
        "recall_at_1pct_fpr": macro("recall_at_1pct_fpr"),
        "precision": macro("precision"),
        "recall": macro("recall"),
        "subset_accuracy": subset,
        "hamming_loss": hamming,
        "known_fraction": float(known_fraction),
        "n": float(y.shape[0]),
        "per_label": per_label,
        "label_names": names,
    }


def choose_thresholds(
    labels: npt.ArrayLike,
    probs: npt.ArrayLike,
    rule: ThresholdRule = "max_f1",
    target_fpr: float | None = None,
) -> list[float]:
    """Choose one decision threshold per label on validation data, from its known rows.

    Each label's threshold is `probekit.metrics.choose_threshold(rule, target_fpr)` on the rows
    where that label is known (see there for the rules and their tie-breaking). A label whose
    known rows do not hold both classes (or that has no known row at all) gets `0.5`.

    Args:
        labels: `(N, L)` validation cells of `1`, `0` or `nan` (unknown).
        probs: `(N, L)` validation probabilities.
        rule: `"max_f1"` or `"target_fpr"`.
        target_fpr: the false positive rate budget in `[0, 1]`; only with `rule="target_fpr"`.

    Returns:
        The `L` thresholds, in column order.

    Raises:
        UserError: bad inputs (see `multilabel_inputs`), an unknown rule, a missing or
            out-of-range `target_fpr` with `"target_fpr"`, or a `target_fpr` given with `"max_f1"`.
    """
    check_threshold_rule(rule, target_fpr)
    y, p = multilabel_inputs(labels, probs)
    chosen: list[float] = []
    for j in range(y.shape[1]):
        known = ~np.isnan(y[:, j])
        column = y[known, j]
        if 0.0 < column.sum() < column.size:
            chosen.append(choose_threshold(column.astype(np.int64), p[known, j], rule, target_fpr))
        else:
            chosen.append(0.5)
    return chosen
