"""Evaluation metrics of a multi-class probe, and its derived binary view.

Labels are class indices `0..K-1`; probabilities are one row of `K` class probabilities per
example (each row sums to 1). The predicted class of a row is its argmax (the lowest index on a
tie). Classification, ranking and loss numbers come from scikit-learn (`f1_score`,
`precision_recall_fscore_support`, `roc_auc_score`, `average_precision_score`,
`top_k_accuracy_score`, `log_loss`, `confusion_matrix`); conventions follow `probekit.metrics`:
`UserError` for bad input, `nan` for metrics the data leave undefined.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.metrics import (  # type: ignore[import-untyped]
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    precision_score,
    recall_score,
    roc_auc_score,
    top_k_accuracy_score,
)

from probekit.errors import UserError
from probekit.metrics import (
    ECE_BINS,
    binned_ece,
    compute_metrics,
    confidence_bins,
    distinct_names,
)

ROW_SUM_TOLERANCE = 1e-4
"""How far (absolute) a row of probabilities may sum from 1 (float32 softmax outputs pass)."""

PER_CLASS_KEYS = ("precision", "recall", "f1", "auroc", "auprc", "support")
"""The keys of each entry of `multiclass_metrics(...)["per_class"]`, in order."""


def multiclass_inputs(
    labels: npt.ArrayLike, probs: npt.ArrayLike, num_classes: int | None = None
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Check and convert class labels and per-class probabilities to numpy arrays.

    Args:
        labels: one class index per example, integers in `0..K-1` (ints, bools, or floats
            holding whole numbers).
        probs: an `(N, K)` array, one row of class probabilities per example, with `K >= 2`;
            every value finite and in `[0, 1]`, every row summing to 1 within `1e-4`.
        num_classes: when given, the number of classes `K` that `probs` must have.

    Returns:
        `(labels, probs)` as a 1-D `int64` array of length `N` and an `(N, K)` `float64` array.

    Raises:
        UserError: empty input, wrong shapes or a different number of rows, fewer than two
            classes (or not `num_classes`), labels that are not integers in `0..K-1`, or
            probabilities that are not finite, lie outside `[0, 1]` or do not sum to 1 in a row.
    """
    try:
        y = np.asarray(labels)
        p = np.asarray(probs, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise UserError(f"labels and probs must be numeric arrays: {exc}") from None
    if y.ndim != 1:
        raise UserError(f"labels must be 1-D; got shape {y.shape}")
    if p.ndim != 2:
        raise UserError(f"probs must be 2-D (examples x classes); got shape {p.shape}")
    if y.shape[0] != p.shape[0]:
        raise UserError(f"labels and probs differ in length: {y.shape[0]} and {p.shape[0]} rows")
    if y.size == 0:
        raise UserError("no examples to evaluate: labels and probs are empty")
    k = p.shape[1]
    if k < 2:
        raise UserError(f"probs must have at least 2 columns (classes); got {k}")
    if num_classes is not None and k != num_classes:
        raise UserError(f"probs have {k} columns but there are {num_classes} classes")
    if y.dtype.kind == "b":
        y = y.astype(np.int64)
    elif y.dtype.kind == "f":
        if not (np.isfinite(y).all() and (y == np.round(y)).all()):
            bad = y[~(np.isfinite(y) & (y == np.round(y)))][:5]
            raise UserError(f"labels must be integers; found {', '.join(str(v) for v in bad.tolist())}")
    elif y.dtype.kind not in "iu":
        raise UserError(f"labels must be integers; got values of type {y.dtype}")
    outside = (y < 0) | (y > k - 1)
    if outside.any():
        bad = sorted({int(v) for v in y[outside].tolist()})[:5]
        raise UserError(f"labels must lie in 0..{k - 1}; found {', '.join(map(str, bad))}")
    if not np.isfinite(p).all():
        raise UserError(f"probs hold {int((~np.isfinite(p)).sum())} non-finite values (nan or inf)")
    if p.min() < 0.0 or p.max() > 1.0:
        raise UserError(f"probs must lie in [0, 1]; found values in [{p.min()}, {p.max()}]")
    sums = p.sum(axis=1)
    off = np.flatnonzero(np.abs(sums - 1.0) > ROW_SUM_TOLERANCE)
    if off.size:
        row = int(off[0])
        more = f" (and {off.size - 1} more rows)" if off.size > 1 else ""
        raise UserError(f"row {row}: probabilities sum to {sums[row]:.6g}, not 1{more}")
    return y.astype(np.int64), p


def _check_negative(negative: int, k: int) -> int:
    if isinstance(negative, bool) or not isinstance(negative, (int, np.integer)):
        raise UserError(f"negative must be a class index (an int); got {negative!r}")
    if not 0 <= int(negative) < k:
        raise UserError(f"negative must be a class index in 0..{k - 1}; got {negative}")
    return int(negative)


def derived_binary(
    labels: npt.ArrayLike, probs: npt.ArrayLike, negative: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """The binary view "any other class vs the negative class" of multi-class data.

    Args:
        labels: class indices (see `multiclass_inputs`).
        probs: `(N, K)` class probabilities.
        negative: the index of the negative class (e.g. "safe").

    Returns:
        `(binary_labels, scores)`: `1` where the label is not `negative`, else `0`; and
        `1 - probs[:, negative]`, clipped into `[0, 1]` (it can fall an ulp below 0).

    Raises:
        UserError: bad inputs (see `multiclass_inputs`) or `negative` not in `0..K-1`.
    """
    y, p = multiclass_inputs(labels, probs)
    neg = _check_negative(negative, p.shape[1])
    binary = (y != neg).astype(np.int64)
    scores = np.clip(1.0 - p[:, neg], 0.0, 1.0)
    return binary, scores


def _top_label_ece(y: npt.NDArray[np.int64], p: npt.NDArray[np.float64], bins: int = ECE_BINS) -> float:
    """Top-label ECE: rows binned by confidence, ``sum over bins b of (n_b / n) * |accuracy_b -
    confidence_b|``."""
    return binned_ece(confidence_bins(p.max(axis=1), p.argmax(axis=1) == y, bins))


def _per_class_ranking(
    y: npt.NDArray[np.int64], p: npt.NDArray[np.float64]
) -> tuple[list[float], list[float]]:
    """One-vs-rest AUROC and average precision per class (`nan` where undefined).

    Class `c` is scored by `roc_auc_score(y == c, p[:, c])` and
    `average_precision_score(y == c, p[:, c])`, the qualifying classes in one multi-label call
    each (`average=None`, one score per column), which spares scikit-learn's per-call checks.
    """
    k = p.shape[1]
    onehot = (y[:, None] == np.arange(k)[None, :]).astype(np.int64)
    positives = onehot.sum(axis=0)
    aurocs = [math.nan] * k
    auprcs = [math.nan] * k
    for scores, score, columns in (
        (aurocs, roc_auc_score, np.flatnonzero((positives > 0) & (positives < y.size))),
        (auprcs, average_precision_score, np.flatnonzero(positives > 0)),
    ):
        if columns.size == 1:  # a single column would read as binary, not multi-label
            values = [score(onehot[:, columns[0]], p[:, columns[0]])]
        elif columns.size > 1:
            values = score(onehot[:, columns], p[:, columns], average=None)
        else:
            values = []
        for c, value in zip(columns.tolist(), values, strict=True):
            scores[c] = float(value)
    # average precision is a sum of recall steps: clipped, as rounding can carry it past 1
    return aurocs, [v if math.isnan(v) else min(1.0, max(0.0, v)) for v in auprcs]


def _mean_defined(values: list[float]) -> float:
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan


def multiclass_metrics(
    labels: npt.ArrayLike,
    probs: npt.ArrayLike,
    class_names: Sequence[str],
    *,
    negative: int | None = None,
    threshold: float = 0.5,
    top_k: int = 3,
) -> dict[str, Any]:
    """Metrics of a multi-class classifier, per class, and optionally of its binary view.

    The predicted class of a row is its argmax. Averages are over all `K` classes
    (`labels=range(K)`), so a class that is neither present nor predicted counts `0` in the
    macro averages (scikit-learn's `zero_division=0`). The result holds (floats unless noted):

    - `accuracy`: fraction of rows whose argmax is the label.
    - `f1` (macro), `f1_micro`, `f1_weighted`, `precision` (macro), `recall` (macro).
    - `auroc`: macro one-vs-rest AUROC, the mean over classes with both positive and negative
      rows of `roc_auc_score(labels == c, probs[:, c])`; `nan` when no class qualifies.
    - `auprc`: the mean over classes with at least one row of
      `average_precision_score(labels == c, probs[:, c])`; `nan` when none qualifies.
    - `top{k}_accuracy` with `k = min(top_k, K - 1)` (e.g. `top3_accuracy`): fraction of rows
      whose label is among the `k` most probable classes (`top_k_accuracy_score`; with `K = 2`
      it is top-1 and scikit-learn's binary form, `probs[:, 1] > 0.5`, is used).
    - `ece`: the top-label expected calibration error (confidence: a row's highest
      probability; correct: its argmax is the label) over `ECE_BINS` equal-width bins, see
      `_top_label_ece`; it equals `probekit.metrics.expected_calibration_error` when every
      confidence is at least `0.5` (always with `K = 2`), which folds lower ones onto `1 - c`.
    - `log_loss`: mean cross-entropy (`log_loss` with `labels=range(K)`).
    - `n`: the number of rows.
    - `per_class` (dict): class name -> `{"precision", "recall", "f1", "auroc", "auprc",
      "support"}`; `auroc` is `nan` when the class has no positive or no negative rows, `auprc`
      `nan` when it has no positive rows; `support` (rows of the class) is a float.
    - `confusion_matrix` (list of `K` lists of ints): rows are true classes, columns predicted.
    - `class_names` (list of str).
    - With `negative` given, the binary view "any other class vs `negative`" (see
      `derived_binary`): every key of `probekit.metrics.compute_metrics(binary_labels,
      1 - probs[:, negative], threshold)`, prefixed `binary_` (`binary_accuracy`, `binary_f1`,
      `binary_auroc`, `binary_recall_at_1pct_fpr`, `binary_ece`, `binary_threshold`,
      `binary_n`, `binary_positives`, ...).

    Args:
        labels: class indices in `0..K-1`.
        probs: `(N, K)` class probabilities, each row summing to 1.
        class_names: the `K` class names, in column order, all different.
        negative: the index of the negative class for the binary view; `None` for none.
        threshold: the decision threshold of the binary view (unused without `negative`).
        top_k: the `k` of the top-k accuracy, at least 1 (capped at `K - 1`).

    Returns:
        The metrics, keyed as listed above.

    Raises:
        UserError: bad inputs (see `multiclass_inputs`), class names that are not `K` distinct
            strings, `negative` not in `0..K-1`, a `nan` threshold or `top_k < 1`.
    """
    if math.isnan(threshold):
        raise UserError("threshold must be a number, not nan")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise UserError(f"top_k must be an integer of at least 1; got {top_k!r}")
    y, p = multiclass_inputs(labels, probs)
    k = p.shape[1]
    names = distinct_names(class_names, k, "class")
    neg = None if negative is None else _check_negative(negative, k)

    classes = list(range(k))
    predicted = p.argmax(axis=1)
    average: dict[str, float] = {}
    for key, avg in (("f1", "macro"), ("f1_micro", "micro"), ("f1_weighted", "weighted")):
        average[key] = float(f1_score(y, predicted, labels=classes, average=avg, zero_division=0))
    precision = float(precision_score(y, predicted, labels=classes, average="macro", zero_division=0))
    recall = float(recall_score(y, predicted, labels=classes, average="macro", zero_division=0))
    class_precision, class_recall, class_f1, support = precision_recall_fscore_support(
        y, predicted, labels=classes, average=None, zero_division=0
    )
    aurocs, auprcs = _per_class_ranking(y, p)
    top = min(top_k, k - 1)
    # with two classes scikit-learn takes y_true as binary and wants the positive column only
    top_accuracy = float(top_k_accuracy_score(y, p[:, 1] if k == 2 else p, k=top, labels=classes))
    ece = _top_label_ece(y, p)
    with warnings.catch_warnings():
        # rows may sum to 1 only within ROW_SUM_TOLERANCE; scikit-learn warns below ~1e-8
        warnings.filterwarnings("ignore", message="The y_prob values do not sum to one")
        loss = float(log_loss(y, p, labels=classes))

    result: dict[str, Any] = {
        "accuracy": float(accuracy_score(y, predicted)),
        "f1": average["f1"],
        "f1_micro": average["f1_micro"],
        "f1_weighted": average["f1_weighted"],
        "precision": precision,
        "recall": recall,
        "auroc": _mean_defined(aurocs),
        "auprc": _mean_defined(auprcs),
        f"top{top}_accuracy": top_accuracy,
        "ece": ece,
        "log_loss": loss,
        "n": float(y.size),
    }
    if neg is not None:
        binary_labels, scores = derived_binary(y, p, neg)
        for key, value in compute_metrics(binary_labels, scores, threshold).items():
            result[f"binary_{key}"] = value
    result["per_class"] = {
        name: {
            "precision": float(class_precision[c]),
            "recall": float(class_recall[c]),
            "f1": float(class_f1[c]),
            "auroc": aurocs[c],
            "auprc": auprcs[c],
            "support": float(support[c]),
        }
        for c, name in enumerate(names)
    }
    result["confusion_matrix"] = confusion_matrix(y, predicted, labels=classes).astype(int).tolist()
    result["class_names"] = names
    return result
