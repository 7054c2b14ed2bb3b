"""Evaluation metrics of a binary probe, and the choice of its decision threshold.

Labels are `0`/`1` with `1` the positive (unsafe) class; scores are the probabilities of the
positive class. An example is predicted positive when `prob >= threshold`. ROC and PR numbers
come from scikit-learn (`roc_auc_score`, `average_precision_score`, `roc_curve`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np
import numpy.typing as npt
from sklearn.metrics import (  # type: ignore[import-untyped]
    average_precision_score,
    roc_auc_score,
    roc_curve,
)

from probekit.errors import UserError

ThresholdRule = Literal["max_f1", "target_fpr"]

ECE_BINS = 15
"""Default number of equal-width confidence bins of the expected calibration error."""

METRIC_KEYS = (
    "accuracy",
    "precision",
    "recall",
    "f1",
    "auroc",
    "auprc",
    "recall_at_1pct_fpr",
    "recall_at_5pct_fpr",
    "ece",
    "threshold",
    "n",
    "positives",
)
"""The keys of `compute_metrics`'s result, in order."""


def binary_inputs(
    labels: npt.ArrayLike, probs: npt.ArrayLike
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Check and convert labels and positive-class probabilities to flat numpy arrays.

    Args:
        labels: one label per example, each `0` or `1` (ints or bools).
        probs: one probability of the positive class per example, finite and in `[0, 1]`.

    Returns:
        `(labels, probs)` as 1-D `int64` and `float64` arrays.

    Raises:
        UserError: empty input, different lengths, labels other than 0/1, or probabilities that
            are not finite or outside `[0, 1]`.
    """
    y = np.asarray(labels)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 1 or p.ndim != 1:
        raise UserError(f"labels and probs must be 1-D; got shapes {y.shape} and {p.shape}")
    if y.shape != p.shape:
        raise UserError(f"labels and probs differ in length: {y.shape[0]} and {p.shape[0]}")
    if y.size == 0:
        raise UserError("no examples to evaluate: labels and probs are empty")
    if not np.isin(y, (0, 1)).all():
        bad = sorted({str(v) for v in y[~np.isin(y, (0, 1))].tolist()})[:5]
        raise UserError(f"labels must be 0 or 1; found {', '.join(bad)}")
    if not np.isfinite(p).all():
        raise UserError(f"probs hold {int((~np.isfinite(p)).sum())} non-finite values (nan or inf)")
    if p.min() < 0.0 or p.max() > 1.0:
        raise UserError(f"probs must lie in [0, 1]; found values in [{p.min()}, {p.max()}]")
    return y.astype(np.int64), p


def _both_classes(y: npt.NDArray[np.int64]) -> bool:
    return 0 < int(y.sum()) < y.size


def _f1(tp: int, fp: int, fn: int) -> float:
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0


class CalibrationBins(NamedTuple):
    """Per-bin statistics of the confidence of the predicted class (see `calibration_bins`).

    Attributes:
        edges: the `bins + 1` bin edges, `0` to `1`.
        counts: examples per bin.
        confidence: mean confidence per bin (`nan` for an empty bin).
        accuracy: fraction of correct predictions per bin (`nan` for an empty bin).
    """

    edges: npt.NDArray[np.float64]
    counts: npt.NDArray[np.int64]
    confidence: npt.NDArray[np.float64]
    accuracy: npt.NDArray[np.float64]


def calibration_bins(labels: npt.ArrayLike, probs: npt.ArrayLike, bins: int = ECE_BINS) -> CalibrationBins:
    """Bin examples by the confidence of their predicted class, as the calibration error does.

    The predicted class is `1` when `prob >= 0.5`, else `0`; its confidence is
    `max(prob, 1 - prob)`, always in `[0.5, 1]`. The bins split `[0, 1]` into `bins` equal
    widths, closed on the right: bin `i` holds confidences in `(i / bins, (i + 1) / bins]`
    (the first bin also holds `0`). Bins below `0.5` therefore stay empty.

    Raises:
        UserError: bad inputs (see `binary_inputs`) or `bins < 1`.
    """
    if bins < 1:
        raise UserError(f"bins must be at least 1; got {bins}")
    y, p = binary_inputs(labels, probs)
    predicted = (p >= 0.5).astype(np.int64)
    return confidence_bins(np.maximum(p, 1.0 - p), predicted == y, bins)


def confidence_bins(
    confidence: npt.NDArray[np.float64], correct: npt.NDArray[np.bool_], bins: int = ECE_BINS
) -> CalibrationBins:
    """Rows binned by their ``confidence`` in ``[0, 1]``, with whether each was ``correct``: the
    bins of `calibration_bins` (binary) and of the top-label calibration of multi-class probes."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges, right=True) - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins).astype(np.int64)
    sum_conf = np.bincount(index, weights=confidence, minlength=bins)
    sum_correct = np.bincount(index, weights=np.asarray(correct, dtype=np.float64), minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(counts > 0, sum_conf / counts, np.nan)
        accuracy = np.where(counts > 0, sum_correct / counts, np.nan)
    return CalibrationBins(edges, counts, mean_conf, accuracy)


def binned_ece(stats: CalibrationBins) -> float:
    """``sum over bins b of (n_b / n) * |accuracy_b - confidence_b|`` of binned rows."""
    filled = stats.counts > 0
    weights = stats.counts[filled] / stats.counts.sum()
    return float(np.sum(weights * np.abs(stats.accuracy[filled] - stats.confidence[filled])))


def expected_calibration_error(labels: npt.ArrayLike, probs: npt.ArrayLike, bins: int = ECE_BINS) -> float:
    """Expected calibration error (ECE) of the predicted class, over equal-width confidence bins.

    Each example is predicted `1` when `prob >= 0.5`, else `0`, with confidence
    `max(prob, 1 - prob)`. Examples are grouped into `bins` equal-width bins over `[0, 1]` by
    that confidence (see `calibration_bins`), and

    `ECE = sum over bins b of (n_b / n) * |accuracy_b - confidence_b|`

    where `n_b` is the number of examples in bin `b`, `accuracy_b` the fraction of them predicted
    correctly and `confidence_b` their mean confidence. `0` is perfectly calibrated; the
    largest possible value is `1`. Defined (never `nan`) when only one class is present.

    Args:
        labels: `0`/`1` labels.
        probs: probabilities of the positive class.
        bins: number of bins (15 by default).

    Raises:
        UserError: bad inputs (see `binary_inputs`) or `bins < 1`.
    """
    return binned_ece(calibration_bins(labels, probs, bins))


def _recall_at_fpr(fpr: npt.NDArray[np.float64], tpr: npt.NDArray[np.float64], max_fpr: float) -> float:
    return float(tpr[fpr <= max_fpr].max())


def compute_metrics(labels: npt.ArrayLike, probs: npt.ArrayLike, threshold: float = 0.5) -> dict[str, float]:
    """Metrics of a binary classifier at a decision threshold, and its threshold-free metrics.

    An example is predicted positive when `prob >= threshold`. The result holds:

    - `accuracy`, `precision`, `recall`, `f1` of those predictions. With no predicted
      positives precision is `0.0`, with no positive labels recall is `0.0`, and F1 is `0.0`
      when precision and recall are both `0` (scikit-learn's `zero_division=0`).
    - `auroc`: area under the ROC curve (`roc_auc_score`); ties count one half.
    - `auprc`: average precision (`average_precision_score`), the step-wise area under the
      precision-recall curve, without interpolation.
    - `recall_at_1pct_fpr`, `recall_at_5pct_fpr`: the highest true positive rate among the ROC
      points (one per distinct probability used as the threshold, from `roc_curve` with
      `drop_intermediate=False`) whose false positive rate is `<= 0.01` (`<= 0.05`). Only
      thresholds the data can realise count: no interpolation between points.
    - `ece`: expected calibration error over 15 bins (see `expected_calibration_error`).
    - `threshold`, `n` (examples) and `positives` (examples labelled `1`), as floats.

    When only one class is present, `auroc`, `auprc` and both `recall_at_*_fpr` are `nan`
    (they are undefined) and nothing is raised; the other metrics are computed as usual.

    Args:
        labels: `0`/`1` labels, `1` the positive (unsafe) class.
        probs: probabilities of the positive class, in `[0, 1]`.
        threshold: the decision threshold.

    Returns:
        The metrics, keyed as listed above (also `METRIC_KEYS`).

    Raises:
        UserError: bad inputs (see `binary_inputs`) or a `nan` threshold.
    """
    if math.isnan(threshold):
        raise UserError("threshold must be a number, not nan")
    y, p = binary_inputs(labels, probs)
    predicted = p >= threshold
    positive = y == 1
    tp = int(np.sum(predicted & positive))
    fp = int(np.sum(predicted & ~positive))
    fn = int(np.sum(~predicted & positive))
    n = int(y.size)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    if _both_classes(y):
        auroc = float(roc_auc_score(y, p))
        # a sum of recall steps: clipped, as rounding can carry it an ulp past 1
        auprc = min(1.0, max(0.0, float(average_precision_score(y, p))))
        fpr, tpr, _ = roc_curve(y, p, drop_intermediate=False)
        at_1 = _recall_at_fpr(fpr, tpr, 0.01)
        at_5 = _recall_at_fpr(fpr, tpr, 0.05)
    else:
        auroc = auprc = at_1 = at_5 = math.nan
    return {
        "accuracy": float(np.mean(predicted == positive)),
        "precision": precision,
        "recall": recall,
        "f1": _f1(tp, fp, fn),
        "auroc": auroc,
        "auprc": auprc,
        "recall_at_1pct_fpr": at_1,
        "recall_at_5pct_fpr": at_5,
        "ece": expected_calibration_error(y, p),
        "threshold": float(threshold),
        "n": float(n),
        "positives": float(positive.sum()),
    }


def _counts_at(
    y: npt.NDArray[np.int64], p: npt.NDArray[np.float64], thresholds: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """True and false positives at each threshold (predicted positive when `prob >= t`)."""
    pos = np.sort(p[y == 1])
    neg = np.sort(p[y == 0])
    tp = pos.size - np.searchsorted(pos, thresholds, side="left")
    fp = neg.size - np.searchsorted(neg, thresholds, side="left")
    return tp.astype(np.int64), fp.astype(np.int64)


def choose_threshold(
    labels: npt.ArrayLike,
    probs: npt.ArrayLike,
    rule: ThresholdRule = "max_f1",
    target_fpr: float | None = None,
) -> float:
    """Choose a decision threshold on validation data (predicted positive when `prob >= t`).

    Rules:

    - `"max_f1"`: the candidates are the distinct values of `probs` plus `0.5`. The result
      is the candidate with the highest F1 on the given data; among candidates that tie on F1,
      the one nearest `0.5` (so `0.5` itself wins any tie it is part of), and between two
      equally near, the higher one.
    - `"target_fpr"` (needs `target_fpr`): the lowest distinct value of `probs` whose false
      positive rate (`false positives / negatives`) on the given data is `<= target_fpr`,
      which gives the most recall that FPR budget allows. Predicting at the next lower distinct
      value would exceed the budget. When even the highest value exceeds it, the result is the
      next float above the highest probability, which flags nothing.

    When only one class is present neither rule is defined and the result is `0.5`.

    Args:
        labels: `0`/`1` validation labels.
        probs: validation probabilities of the positive class.
        rule: `"max_f1"` or `"target_fpr"`.
        target_fpr: the false positive rate budget in `[0, 1]`; only with `rule="target_fpr"`.

    Returns:
        The threshold, as a float.

    Raises:
        UserError: bad inputs (see `binary_inputs`), an unknown rule, a missing or out-of-range
            `target_fpr` with `"target_fpr"`, or a `target_fpr` given with `"max_f1"`.
    """
    check_threshold_rule(rule, target_fpr)
    y, p = binary_inputs(labels, probs)
    if not _both_classes(y):
        return 0.5
    distinct = np.unique(p)
    if rule == "target_fpr":
        assert target_fpr is not None
        _, fp = _counts_at(y, p, distinct)
        allowed = distinct[fp / int((y == 0).sum()) <= target_fpr]
        if allowed.size == 0:
            return float(np.nextafter(distinct[-1], np.inf))
        return float(allowed.min())
    candidates = np.union1d(distinct, [0.5])
    tp, fp = _counts_at(y, p, candidates)
    fn = int(y.sum()) - tp
    f1 = 2 * tp / (2 * tp + fp + fn)  # the denominator is > 0: there are positives
    best = candidates[f1 == f1.max()]
    distance = np.abs(best - 0.5)
    nearest = best[distance == distance.min()]
    return float(nearest.max())


def check_threshold_rule(rule: str, target_fpr: float | None) -> None:
    """Refuse (`UserError`) an unknown threshold rule, ``target_fpr`` with ``max_f1``, or a
    missing or out-of-range ``target_fpr`` with ``target_fpr``."""
    if rule == "max_f1":
        if target_fpr is not None:
            raise UserError("target_fpr is only used with rule='target_fpr'")
    elif rule == "target_fpr":
        if target_fpr is None or not 0.0 <= target_fpr <= 1.0:
            raise UserError(f"rule 'target_fpr' needs target_fpr in [0, 1]; got {target_fpr}")
    else:
        raise UserError(f"unknown threshold rule {rule!r} (known: max_f1, target_fpr)")


def distinct_names(names: Sequence[Any], count: int, noun: str) -> list[str]:
    """``names`` as ``count`` distinct strings, one per probability column, or `UserError`
    (``noun``: ``class`` or ``label``, as the messages name them)."""
    if isinstance(names, str):
        raise UserError(f"{noun}_names must be a sequence of names, not the string {names!r}")
    found = [str(name) for name in names]
    if len(found) != count:
        plural = "classes" if noun == "class" else f"{noun}s"
        raise UserError(f"got {len(found)} {noun} names for {count} {plural} (probability columns)")
    if len(set(found)) != len(found):
        duplicated = sorted({name for name in found if found.count(name) > 1})
        raise UserError(f"{noun} names must be distinct; repeated: {', '.join(duplicated)}")
    return found


def headline(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The top-level float entries of a metrics result: what a per-epoch metrics file keeps.

    Nested entries (per class or label tables, confusion matrices, names) and anything else that
    is not a float (ints included) are left out; order is kept.
    """
    return {key: float(value) for key, value in metrics.items() if isinstance(value, (float, np.floating))}
