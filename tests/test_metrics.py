"""Metrics and threshold rules against hand computations and brute force."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sklearn.metrics import f1_score, precision_score, recall_score

from probekit.errors import UserError
from probekit.metrics import (
    METRIC_KEYS,
    calibration_bins,
    choose_threshold,
    compute_metrics,
    expected_calibration_error,
)

Arrays = tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]
THRESHOLD_FREE = ("auroc", "auprc", "recall_at_1pct_fpr", "recall_at_5pct_fpr")
UNIT_KEYS = [k for k in METRIC_KEYS if k not in ("threshold", "n", "positives")]

# Probabilities from a coarse grid (many ties) or anywhere in [0, 1].
probabilities = st.one_of(
    st.integers(0, 10).map(lambda k: k / 10),
    st.floats(0.0, 1.0, allow_nan=False),
)


@st.composite
def samples(draw: Any, min_size: int = 1, max_size: int = 30, both_classes: bool = False) -> Arrays:
    """`(labels, probs)`; with `both_classes`, at least one example of each class."""
    size = draw(st.integers(max(min_size, 2 if both_classes else 1), max_size))
    labels = draw(st.lists(st.integers(0, 1), min_size=size, max_size=size))
    if both_classes:
        labels[0], labels[1] = 0, 1
    probs = draw(st.lists(probabilities, min_size=size, max_size=size))
    return np.array(labels, dtype=np.int64), np.array(probs, dtype=np.float64)


def _counts(labels: np.ndarray[Any, Any], probs: np.ndarray[Any, Any], t: float) -> tuple[int, int, int, int]:
    """(tp, fp, fn, tn) by a plain loop; positive when prob >= t."""
    tp = fp = fn = tn = 0
    for y, p in zip(labels.tolist(), probs.tolist(), strict=True):
        predicted = p >= t
        if predicted and y == 1:
            tp += 1
        elif predicted:
            fp += 1
        elif y == 1:
            fn += 1
        else:
            tn += 1
    return tp, fp, fn, tn


def _f1(labels: np.ndarray[Any, Any], probs: np.ndarray[Any, Any], t: float) -> float:
    tp, fp, fn, _ = _counts(labels, probs, t)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def _fpr(labels: np.ndarray[Any, Any], probs: np.ndarray[Any, Any], t: float) -> float:
    _, fp, _, tn = _counts(labels, probs, t)
    return fp / (fp + tn)


def _mann_whitney(labels: np.ndarray[Any, Any], probs: np.ndarray[Any, Any]) -> float:
    """P(score of a random positive > score of a random negative), ties counting 1/2."""
    pos = [p for y, p in zip(labels, probs, strict=True) if y == 1]
    neg = [p for y, p in zip(labels, probs, strict=True) if y == 0]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def _average_precision(labels: np.ndarray[Any, Any], probs: np.ndarray[Any, Any]) -> float:
    """sum over distinct thresholds, high to low, of (recall gained) * precision there."""
    total, previous_recall = 0.0, 0.0
    for t in sorted(set(probs.tolist()), reverse=True):
        tp, fp, fn, _ = _counts(labels, probs, t)
        recall = tp / (tp + fn)
        total += (recall - previous_recall) * tp / (tp + fp)
        previous_recall = recall
    return total


def _recall_at_fpr(labels: np.ndarray[Any, Any], probs: np.ndarray[Any, Any], max_fpr: float) -> float:
    """Highest TPR over every realisable threshold (each distinct prob, and above all) with FPR <= max."""
    best = 0.0
    for t in [*set(probs.tolist()), math.inf]:
        tp, fp, fn, tn = _counts(labels, probs, t)
        if fp / (fp + tn) <= max_fpr:
            best = max(best, tp / (tp + fn))
    return best


# --- compute_metrics ----------------------------------------------------------------------


@given(samples(), probabilities)
def test_metrics_lie_in_unit_interval(data: Arrays, threshold: float) -> None:
    labels, probs = data
    m = compute_metrics(labels, probs, threshold)
    assert list(m) == list(METRIC_KEYS)
    single = labels.min() == labels.max()
    for key in UNIT_KEYS:
        if single and key in THRESHOLD_FREE:
            assert math.isnan(m[key]), key
        else:
            assert 0.0 <= m[key] <= 1.0, (key, m[key])
    assert m["threshold"] == threshold
    assert m["n"] == len(labels)
    assert m["positives"] == labels.sum()


@given(samples(), probabilities)
def test_threshold_metrics_match_hand_computation(data: Arrays, threshold: float) -> None:
    labels, probs = data
    m = compute_metrics(labels, probs, threshold)
    tp, fp, fn, tn = _counts(labels, probs, threshold)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    assert m["accuracy"] == pytest.approx((tp + tn) / len(labels))
    assert m["precision"] == pytest.approx(precision)
    assert m["recall"] == pytest.approx(recall)
    assert m["f1"] == pytest.approx(_f1(labels, probs, threshold))
    predicted = (probs >= threshold).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about ill-defined scores it then sets to 0
        assert m["precision"] == pytest.approx(precision_score(labels, predicted, zero_division=0))
        assert m["recall"] == pytest.approx(recall_score(labels, predicted, zero_division=0))
        assert m["f1"] == pytest.approx(f1_score(labels, predicted, zero_division=0))


@given(samples(max_size=12, both_classes=True))
def test_auroc_is_mann_whitney_probability(data: Arrays) -> None:
    labels, probs = data
    assert compute_metrics(labels, probs)["auroc"] == pytest.approx(_mann_whitney(labels, probs))


@given(samples(max_size=12, both_classes=True))
def test_auprc_is_step_sum_of_precision(data: Arrays) -> None:
    labels, probs = data
    assert compute_metrics(labels, probs)["auprc"] == pytest.approx(_average_precision(labels, probs))


@given(samples(max_size=60, both_classes=True))
def test_recall_at_fpr_is_best_realisable_tpr(data: Arrays) -> None:
    labels, probs = data
    m = compute_metrics(labels, probs)
    assert m["recall_at_1pct_fpr"] == pytest.approx(_recall_at_fpr(labels, probs, 0.01))
    assert m["recall_at_5pct_fpr"] == pytest.approx(_recall_at_fpr(labels, probs, 0.05))


@given(
    st.lists(st.floats(0.0, 0.499), min_size=1, max_size=20),
    st.lists(st.floats(0.5, 1.0), min_size=1, max_size=20),
)
def test_perfect_classifier(negatives: list[float], positives: list[float]) -> None:
    labels = np.array([0] * len(negatives) + [1] * len(positives))
    m = compute_metrics(labels, np.array(negatives + positives), 0.5)
    for key in ("accuracy", "precision", "recall", "f1", "auroc", "auprc"):
        assert m[key] == pytest.approx(1.0), key
    assert m["recall_at_1pct_fpr"] == 1.0
    assert m["recall_at_5pct_fpr"] == 1.0


@given(
    st.lists(st.floats(0.51, 1.0), min_size=1, max_size=20),
    st.lists(st.floats(0.0, 0.5), min_size=1, max_size=20),
)
def test_reversed_classifier_has_auroc_zero(negatives: list[float], positives: list[float]) -> None:
    labels = np.array([0] * len(negatives) + [1] * len(positives))
    m = compute_metrics(labels, np.array(negatives + positives), 0.5)
    assert m["auroc"] == 0.0
    assert m["recall_at_5pct_fpr"] == 0.0


def test_hand_computed_example() -> None:
    labels = np.array([0, 0, 1, 1])
    probs = np.array([0.1, 0.42, 0.35, 0.85])
    m = compute_metrics(labels, probs, 0.5)
    assert m["accuracy"] == 0.75  # predictions 0, 0, 0, 1
    assert m["precision"] == 1.0
    assert m["recall"] == 0.5
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["auroc"] == 0.75  # 3 of 4 (positive, negative) pairs ordered right
    assert m["auprc"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert m["recall_at_1pct_fpr"] == 0.5  # at 0.85: FPR 0, TPR 1/2; at 0.35: FPR 1/2
    # confidences 0.9, 0.58, 0.65, 0.85 in four bins; correct, correct, wrong, correct
    assert m["ece"] == pytest.approx((0.1 + 0.42 + 0.65 + 0.15) / 4)
    assert (m["threshold"], m["n"], m["positives"]) == (0.5, 4.0, 2.0)


def test_no_predicted_positives_gives_zero_precision() -> None:
    m = compute_metrics(np.array([0, 1, 1]), np.array([0.1, 0.2, 0.3]), 0.9)
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)
    assert m["accuracy"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("label", [0, 1])
def test_single_class_gives_nan_without_warnings(label: int) -> None:
    labels = np.full(6, label)
    probs = np.array([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = compute_metrics(labels, probs, 0.5)
    for key in THRESHOLD_FREE:
        assert math.isnan(m[key]), key
    assert m["accuracy"] == 0.5
    assert not math.isnan(m["ece"])


@pytest.mark.parametrize(
    ("labels", "probs"),
    [
        ([0, 2], [0.1, 0.2]),  # label not 0/1
        ([0, 1], [0.1]),  # lengths differ
        ([], []),  # empty
        ([0, 1], [0.1, math.nan]),  # nan
        ([0, 1], [0.1, 1.5]),  # outside [0, 1]
        ([[0, 1]], [[0.1, 0.2]]),  # not 1-D
    ],
)
def test_bad_inputs_raise_user_error(labels: list[Any], probs: list[Any]) -> None:
    with pytest.raises(UserError):
        compute_metrics(np.array(labels), np.array(probs), 0.5)


def test_accepts_bool_labels_and_lists() -> None:
    m = compute_metrics([False, True], [0.2, 0.7], 0.5)
    assert m["accuracy"] == 1.0


# --- expected calibration error -------------------------------------------------------------


def test_ece_of_perfectly_calibrated_bins_is_zero() -> None:
    labels: list[int] = []
    probs: list[float] = []
    for confidence in (0.55, 0.65, 0.75, 0.85, 0.95):
        right = round(confidence * 20)
        # predicted 1 with this confidence: right of 20 are positives
        labels += [1] * right + [0] * (20 - right)
        probs += [confidence] * 20
        # predicted 0 with this confidence: right of 20 are negatives
        labels += [0] * right + [1] * (20 - right)
        probs += [1 - confidence] * 20
    assert expected_calibration_error(np.array(labels), np.array(probs)) == pytest.approx(0.0, abs=1e-12)


def test_ece_of_overconfident_model() -> None:
    # 10 at p=0.95 (predicted 1, confidence 0.95), 7 right: gap 0.25
    # 10 at p=0.2 (predicted 0, confidence 0.8), 5 right: gap 0.3
    labels = np.array([1] * 7 + [0] * 3 + [0] * 5 + [1] * 5)
    probs = np.array([0.95] * 10 + [0.2] * 10)
    assert expected_calibration_error(labels, probs) == pytest.approx(0.5 * 0.25 + 0.5 * 0.3)
    # all wrong with full confidence: the worst possible
    assert expected_calibration_error(np.array([0, 1]), np.array([1.0, 0.0])) == pytest.approx(1.0)


@given(samples())
def test_ece_with_one_bin_is_overall_gap(data: Arrays) -> None:
    labels, probs = data
    confidence = np.maximum(probs, 1 - probs)
    correct = ((probs >= 0.5).astype(int) == labels).mean()
    ece = expected_calibration_error(labels, probs, bins=1)
    assert ece == pytest.approx(abs(correct - confidence.mean()))
    assert 0.0 <= expected_calibration_error(labels, probs) <= 1.0


@given(samples())
def test_calibration_bins_partition_examples(data: Arrays) -> None:
    labels, probs = data
    stats = calibration_bins(labels, probs, 15)
    assert stats.counts.sum() == len(labels)
    assert stats.counts[:7].sum() == 0  # confidence >= 0.5 never falls below bin 7
    filled = stats.counts > 0
    lows, highs = stats.edges[:-1][filled], stats.edges[1:][filled]
    assert np.all(stats.confidence[filled] > lows - 1e-12)
    assert np.all(stats.confidence[filled] <= highs + 1e-12)


def test_bins_must_be_positive() -> None:
    with pytest.raises(UserError):
        expected_calibration_error(np.array([0, 1]), np.array([0.2, 0.8]), bins=0)


# --- choose_threshold ------------------------------------------------------------------------


@given(samples(max_size=25, both_classes=True))
def test_max_f1_threshold_reaches_the_best_f1(data: Arrays) -> None:
    labels, probs = data
    t = choose_threshold(labels, probs, "max_f1")
    candidates = sorted({*probs.tolist(), 0.5})
    assert t in candidates
    scores = {c: _f1(labels, probs, c) for c in candidates}
    best = max(scores.values())
    assert scores[t] == pytest.approx(best)
    # no threshold at all (not only the candidates) does better
    assert all(_f1(labels, probs, g) <= best + 1e-12 for g in np.linspace(0, 1, 51))
    # ties go to the candidate nearest 0.5
    tied = [c for c, s in scores.items() if s == pytest.approx(best)]
    assert abs(t - 0.5) == pytest.approx(min(abs(c - 0.5) for c in tied))


def test_max_f1_tie_prefers_half() -> None:
    # thresholds 0.3 and 0.5 both predict exactly the example at 0.7: the same F1
    labels, probs = np.array([0, 1, 0]), np.array([0.1, 0.7, 0.3])
    assert choose_threshold(labels, probs) == 0.5
    # 0.2 and 0.8 tie with every threshold between them; 0.5 is among them
    assert choose_threshold(np.array([0, 1]), np.array([0.2, 0.8])) == 0.5


@given(samples(max_size=40, both_classes=True), st.sampled_from([0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0]))
def test_target_fpr_threshold_is_lowest_within_budget(data: Arrays, target: float) -> None:
    labels, probs = data
    t = choose_threshold(labels, probs, "target_fpr", target_fpr=target)
    assert _fpr(labels, probs, t) <= target
    lower = [p for p in set(probs.tolist()) if p < t]
    if lower:
        assert _fpr(labels, probs, max(lower)) > target
    if t > probs.max():  # nothing flagged: even the highest probability exceeds the budget
        assert _fpr(labels, probs, float(probs.max())) > target
    else:
        assert t in set(probs.tolist())


@given(samples(max_size=60, both_classes=True))
def test_target_fpr_threshold_achieves_recall_at_fpr(data: Arrays) -> None:
    labels, probs = data
    t = choose_threshold(labels, probs, "target_fpr", target_fpr=0.05)
    m = compute_metrics(labels, probs)
    assert compute_metrics(labels, probs, t)["recall"] == pytest.approx(m["recall_at_5pct_fpr"])


def test_target_fpr_hand_example() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 0, 1, 1])
    probs = np.array([0.05, 0.1, 0.2, 0.3, 0.35, 0.5, 0.6, 0.7, 0.8, 0.9])
    # 5 negatives; at 0.7 FPR 1/5, at 0.35 FPR 1/5, at 0.3 FPR 2/5
    assert choose_threshold(labels, probs, "target_fpr", target_fpr=0.2) == 0.35
    assert choose_threshold(labels, probs, "target_fpr", target_fpr=0.0) == 0.8
    # the highest probability is a negative: no distinct value keeps FPR 0
    t = choose_threshold(np.array([1, 0]), np.array([0.4, 0.9]), "target_fpr", target_fpr=0.0)
    assert t > 0.9
    assert compute_metrics(np.array([1, 0]), np.array([0.4, 0.9]), t)["precision"] == 0.0


@pytest.mark.parametrize("rule", ["max_f1", "target_fpr"])
@pytest.mark.parametrize("label", [0, 1])
def test_single_class_threshold_is_half(rule: str, label: int) -> None:
    target = 0.05 if rule == "target_fpr" else None
    t = choose_threshold(np.full(4, label), np.array([0.1, 0.3, 0.6, 0.9]), rule, target)  # type: ignore[arg-type]
    assert t == 0.5


@pytest.mark.parametrize(
    ("rule", "target"),
    [("target_fpr", None), ("target_fpr", 1.5), ("max_f1", 0.05), ("youden", None)],
)
def test_bad_threshold_rules_raise(rule: str, target: float | None) -> None:
    with pytest.raises(UserError):
        choose_threshold(np.array([0, 1]), np.array([0.2, 0.8]), rule, target)  # type: ignore[arg-type]
