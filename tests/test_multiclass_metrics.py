"""Multi-class metrics against scikit-learn and hand computations, done independently here."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
    top_k_accuracy_score,
)
from sklearn.preprocessing import label_binarize

from probekit.errors import UserError
from probekit.metrics import ECE_BINS, compute_metrics, expected_calibration_error, headline
from probekit.multiclass_metrics import (
    PER_CLASS_KEYS,
    derived_binary,
    multiclass_inputs,
    multiclass_metrics,
)

Data = tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]
FLOAT_KEYS = ("accuracy", "f1", "f1_micro", "f1_weighted", "precision", "recall", "auroc", "auprc")


def _softmax(logits: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]


@st.composite
def multiclass(draw: Any, max_size: int = 60, min_classes: int = 2, max_classes: int = 14) -> Data:
    """`(labels, probs)`: N in 1..max_size, K in min_classes..max_classes, softmax probabilities.

    Labels come from all K classes or from a random subset (so some classes are absent);
    logits come from a coarse integer grid (ties between classes and rows) or anywhere in
    [-6, 6], times a temperature (flat to peaked rows). Hypothesis picks the shape and the
    kind of data; a seeded generator fills in the values, which keeps generation fast.
    """
    n = draw(st.integers(1, max_size))
    k = draw(st.integers(min_classes, max_classes))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    present = (
        np.arange(k) if draw(st.booleans()) else rng.choice(k, size=rng.integers(1, k + 1), replace=False)
    )
    labels = rng.choice(present, size=n)
    if draw(st.booleans()):
        logits = rng.integers(-2, 3, size=(n, k)).astype(np.float64)
    else:
        logits = rng.uniform(-6.0, 6.0, size=(n, k))
    scale = draw(st.sampled_from([0.1, 1.0, 4.0]))
    return labels.astype(np.int64), _softmax(scale * logits)


def _names(k: int) -> list[str]:
    return [f"class{c}" for c in range(k)]


def _mann_whitney(positive: np.ndarray[Any, Any], scores: np.ndarray[Any, Any]) -> float:
    """P(score of a random positive > score of a random negative), ties counting 1/2."""
    pos, neg = scores[positive], scores[~positive]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (pos.size * neg.size))


def _average_precision(positive: np.ndarray[Any, Any], scores: np.ndarray[Any, Any]) -> float:
    """sum over distinct thresholds, high to low, of (recall gained) * precision there."""
    total, previous_recall = 0.0, 0.0
    for t in sorted(set(scores.tolist()), reverse=True):
        flagged = scores >= t
        tp = int((flagged & positive).sum())
        recall = tp / int(positive.sum())
        total += (recall - previous_recall) * tp / int(flagged.sum())
        previous_recall = recall
    return total


def _top_label_ece(labels: np.ndarray[Any, Any], probs: np.ndarray[Any, Any], bins: int = ECE_BINS) -> float:
    """Top-label ECE by a plain loop over bins (i/bins, (i+1)/bins], the first also holding 0."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    total = 0.0
    for i in range(bins):
        low, high = i / bins, (i + 1) / bins
        inside = (confidence > low) & (confidence <= high)
        if i == 0:
            inside |= confidence == 0.0
        if inside.any():
            gap = abs(correct[inside].mean() - confidence[inside].mean())
            total += inside.sum() / labels.size * gap
    return total


def _quiet(call: Any) -> Any:
    """Call, failing on any warning (the module must not leak scikit-learn's warnings)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return call()


# --- against scikit-learn and hand computations ----------------------------------------------


@settings(max_examples=25, deadline=None)
@given(multiclass(), st.integers(1, 5))
def test_metrics_match_sklearn_and_hand_computation(data: Data, top_k: int) -> None:
    labels, probs = data
    n, k = probs.shape
    classes = list(range(k))
    m = _quiet(lambda: multiclass_metrics(labels, probs, _names(k), top_k=top_k))
    predicted = probs.argmax(axis=1)

    assert m["n"] == float(n)
    assert m["class_names"] == _names(k)
    assert m["accuracy"] == pytest.approx(float(np.mean(predicted == labels)))

    # confusion matrix by a plain loop
    confusion = [[0] * k for _ in range(k)]
    for y, p in zip(labels.tolist(), predicted.tolist(), strict=True):
        confusion[y][p] += 1
    assert m["confusion_matrix"] == confusion
    assert all(type(v) is int for row in m["confusion_matrix"] for v in row)

    # averaged scores, as scikit-learn computes them over all K classes
    for key, avg in (("f1", "macro"), ("f1_micro", "micro"), ("f1_weighted", "weighted")):
        expected = f1_score(labels, predicted, labels=classes, average=avg, zero_division=0)
        assert m[key] == pytest.approx(expected), key
    assert m["precision"] == pytest.approx(
        precision_score(labels, predicted, labels=classes, average="macro", zero_division=0)
    )
    assert m["recall"] == pytest.approx(
        recall_score(labels, predicted, labels=classes, average="macro", zero_division=0)
    )
    assert m["f1_micro"] == pytest.approx(m["accuracy"])  # single-label: micro F1 is accuracy

    # per class, from the confusion matrix by hand
    per_class_f1 = f1_score(labels, predicted, labels=classes, average=None, zero_division=0)
    assert list(m["per_class"]) == _names(k)
    aurocs, auprcs = [], []
    for c, name in enumerate(_names(k)):
        entry = m["per_class"][name]
        assert tuple(entry) == PER_CLASS_KEYS
        tp = confusion[c][c]
        predicted_c = sum(confusion[r][c] for r in range(k))
        support = sum(confusion[c])
        precision = tp / predicted_c if predicted_c else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        assert entry["precision"] == pytest.approx(precision)
        assert entry["recall"] == pytest.approx(recall)
        assert entry["f1"] == pytest.approx(f1)
        assert entry["f1"] == pytest.approx(per_class_f1[c])
        assert entry["support"] == float(support)
        assert type(entry["support"]) is float
        positive = labels == c
        if 0 < support < n:
            assert entry["auroc"] == pytest.approx(_mann_whitney(positive, probs[:, c]))
            aurocs.append(entry["auroc"])
        else:
            assert math.isnan(entry["auroc"])
        if support:
            assert entry["auprc"] == pytest.approx(_average_precision(positive, probs[:, c]))
            auprcs.append(entry["auprc"])
        else:
            assert math.isnan(entry["auprc"])

    # macro one-vs-rest ranking metrics: over the classes where they are defined
    if aurocs:
        assert m["auroc"] == pytest.approx(np.mean(aurocs))
    else:
        assert math.isnan(m["auroc"])
    if auprcs:
        assert m["auprc"] == pytest.approx(np.mean(auprcs))
    else:
        assert math.isnan(m["auprc"])
    if k > 2 and len(set(labels.tolist())) == k:  # every class present: sklearn's own macro OvR
        expected_auroc = roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=classes)
        assert m["auroc"] == pytest.approx(expected_auroc)
        onehot = label_binarize(labels, classes=classes)
        assert m["auprc"] == pytest.approx(average_precision_score(onehot, probs, average="macro"))

    # top-k accuracy, k capped at K - 1 (scikit-learn's binary form when K = 2)
    top = min(top_k, k - 1)
    scores = probs[:, 1] if k == 2 else probs
    assert [key for key in m if key.startswith("top")] == [f"top{top}_accuracy"]
    assert m[f"top{top}_accuracy"] == pytest.approx(
        top_k_accuracy_score(labels, scores, k=top, labels=classes)
    )
    if k > 2:
        ranked = np.argsort(-probs, axis=1, kind="stable")[:, :top]
        rank_ties = any(len(set(row.tolist())) < k for row in probs)
        if not rank_ties:
            assert m[f"top{top}_accuracy"] == pytest.approx(np.mean((ranked == labels[:, None]).any(axis=1)))

    # log loss: sklearn's, and the mean negative log-probability of the label
    assert m["log_loss"] == pytest.approx(log_loss(labels, probs, labels=classes))
    eps = np.finfo(np.float64).eps
    hand = -np.mean(np.log(np.clip(probs[np.arange(n), labels], eps, 1 - eps)))
    assert m["log_loss"] == pytest.approx(hand)

    # every top-level number is a python float, in [0, 1] unless nan or a count/loss
    for key, value in m.items():
        if key in ("per_class", "confusion_matrix", "class_names"):
            continue
        assert type(value) is float, key
        if key not in ("n", "log_loss") and not math.isnan(value):
            assert 0.0 <= value <= 1.0, (key, value)
    assert not any(key.startswith("binary_") for key in m)


@settings(max_examples=20, deadline=None)
@given(multiclass())
def test_ece_is_top_label_ece(data: Data) -> None:
    labels, probs = data
    m = multiclass_metrics(labels, probs, _names(probs.shape[1]))
    assert m["ece"] == pytest.approx(_top_label_ece(labels, probs), abs=1e-12)
    assert 0.0 <= m["ece"] <= 1.0
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.int64)
    if confidence.min() >= 0.5:  # always with two classes: the binary ECE bins the same way
        assert m["ece"] == pytest.approx(expected_calibration_error(correct, confidence), abs=1e-12)


@settings(max_examples=20, deadline=None)
@given(multiclass(max_classes=2))
def test_two_class_ece_equals_binary_ece_on_correct_and_confidence(data: Data) -> None:
    labels, probs = data
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.int64)
    m = multiclass_metrics(labels, probs, ["a", "b"])
    assert m["ece"] == pytest.approx(expected_calibration_error(correct, confidence), abs=1e-12)


def test_ece_hand_example_with_low_confidences() -> None:
    # K = 3; two correct rows, of confidence 0.6 and 0.4: top-label gaps 0.4 and 0.6 in two
    # bins. The binary ECE on (correct, confidence) would read the second row as "predicted 0
    # with confidence 0.6, wrong" and put both rows in one bin of accuracy 1/2: 0.1.
    probs = np.array([[0.6, 0.3, 0.1], [0.3, 0.3, 0.4]])
    m = multiclass_metrics([0, 2], probs, ["a", "b", "c"])
    assert m["ece"] == pytest.approx(0.5 * 0.4 + 0.5 * 0.6)
    binary = expected_calibration_error(np.array([1, 1]), np.array([0.6, 0.4]))
    assert binary == pytest.approx(0.1)


# --- derived binary view -----------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(multiclass(), st.data(), st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0.0, 1.0)))
def test_binary_view_equals_compute_metrics_on_hand_derived_arrays(
    data: Data, draw: st.DataObject, threshold: float
) -> None:
    labels, probs = data
    k = probs.shape[1]
    negative = draw.draw(st.integers(0, k - 1))
    binary_labels = np.array([0 if y == negative else 1 for y in labels.tolist()])
    scores = np.array([min(1.0, max(0.0, 1.0 - row[negative])) for row in probs.tolist()])

    got_labels, got_scores = derived_binary(labels, probs, negative)
    assert got_labels.tolist() == binary_labels.tolist()
    assert got_scores.tolist() == scores.tolist()

    m = _quiet(lambda: multiclass_metrics(labels, probs, _names(k), negative=negative, threshold=threshold))
    expected = compute_metrics(binary_labels, scores, threshold)
    binary = {key[len("binary_") :]: value for key, value in m.items() if key.startswith("binary_")}
    assert list(binary) == list(expected)
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(binary[key]), key
        else:
            assert binary[key] == value, key
    assert m["n"] == float(labels.size)


def test_binary_scores_stay_in_unit_interval() -> None:
    probs = np.array([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5], [0.0, 1.0, 0.0]])
    labels, scores = derived_binary([0, 2, 1], probs, 0)
    assert labels.tolist() == [0, 1, 1]
    assert scores.tolist() == pytest.approx([0.0, 0.8, 1.0])
    assert scores.min() >= 0.0 and scores.max() <= 1.0


def test_binary_hand_example() -> None:
    # classes safe, spam, abuse; "safe" is the negative class
    probs = np.array([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.1, 0.2, 0.7], [0.6, 0.2, 0.2]])
    labels = np.array([0, 1, 2, 2])
    m = multiclass_metrics(labels, probs, ["safe", "spam", "abuse"], negative=0, threshold=0.5)
    # binary labels 0 1 1 1, scores 0.2 0.7 0.9 0.4: predictions 0 1 1 0
    assert m["binary_accuracy"] == 0.75
    assert m["binary_precision"] == 1.0
    assert m["binary_recall"] == pytest.approx(2 / 3)
    assert m["binary_auroc"] == 1.0
    assert (m["binary_n"], m["binary_positives"], m["binary_threshold"]) == (4.0, 3.0, 0.5)
    assert m["accuracy"] == 0.75  # argmax 0 1 2 0
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]


# --- perfect classifier and absent classes ---------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(st.integers(2, 14), st.data())
def test_perfect_classifier(k: int, draw: st.DataObject) -> None:
    extra = draw.draw(st.lists(st.integers(0, k - 1), max_size=20))
    labels = np.array(list(range(k)) + extra)  # every class present
    confidence = draw.draw(st.floats(0.55, 1.0))  # above every other class, also with K = 2
    probs = np.full((labels.size, k), (1.0 - confidence) / (k - 1))
    probs[np.arange(labels.size), labels] = confidence
    m = multiclass_metrics(labels, probs, _names(k), negative=0)
    for key in (*FLOAT_KEYS, f"top{min(3, k - 1)}_accuracy"):
        assert m[key] == pytest.approx(1.0), key
    counts = np.bincount(labels, minlength=k)
    assert m["confusion_matrix"] == np.diag(counts).tolist()
    for name in _names(k):
        assert m["per_class"][name]["f1"] == 1.0
    assert m["binary_auroc"] == 1.0
    assert m["ece"] == pytest.approx(1.0 - confidence)


def test_absent_classes_and_single_row() -> None:
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]])
    m = multiclass_metrics([0, 0], probs, ["a", "b", "c"])
    assert math.isnan(m["auroc"])  # class 0 has no negatives, 1 and 2 no positives
    assert m["auprc"] == 1.0  # only class 0 has positive rows
    assert math.isnan(m["per_class"]["b"]["auroc"]) and math.isnan(m["per_class"]["b"]["auprc"])
    assert m["per_class"]["c"]["support"] == 0.0
    # predictions 0 and 1: class 0 has precision 1 and recall 1/2
    assert m["per_class"]["a"]["f1"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx((2 / 3) / 3)  # b and c count 0 in the macro average
    one = multiclass_metrics([2], [[0.1, 0.2, 0.7]], ["a", "b", "c"], negative=2)
    assert math.isnan(one["auroc"]) and math.isnan(one["binary_auroc"])
    assert one["accuracy"] == 1.0 and one["n"] == 1.0


def test_top_k_key_follows_number_of_classes() -> None:
    two = multiclass_metrics([0, 1], [[0.9, 0.1], [0.4, 0.6]], ["a", "b"])
    assert two["top1_accuracy"] == 1.0
    probs = np.array([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]])
    three = multiclass_metrics([1, 2], probs, ["a", "b", "c"], top_k=5)
    assert three["top2_accuracy"] == 0.5
    probs10 = _softmax(np.arange(30, dtype=np.float64).reshape(3, 10))
    assert "top3_accuracy" in multiclass_metrics([9, 8, 6], probs10, _names(10))


def test_float32_softmax_is_accepted_without_warnings() -> None:
    rng = np.random.default_rng(0)
    probs = _softmax(rng.normal(size=(50, 7)) * 3).astype(np.float32)
    labels = rng.integers(0, 7, size=50)
    m = _quiet(lambda: multiclass_metrics(labels, probs, _names(7), negative=3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # float32 rows sum to 1 only within ~1e-7
        expected = log_loss(labels, probs.astype(np.float64), labels=range(7))
    assert m["log_loss"] == pytest.approx(expected, rel=1e-5)


# --- headline ---------------------------------------------------------------------------------


def test_headline_keeps_top_level_floats() -> None:
    probs = np.array([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.1, 0.2, 0.7]])
    m = multiclass_metrics([0, 1, 2], probs, ["safe", "spam", "abuse"], negative=0)
    head = headline(m)
    assert "per_class" not in head and "confusion_matrix" not in head and "class_names" not in head
    assert list(head) == [key for key in m if key not in ("per_class", "confusion_matrix", "class_names")]
    assert {"accuracy", "f1", "top2_accuracy", "log_loss", "n", "binary_auroc", "binary_n"} <= set(head)
    assert all(type(v) is float for v in head.values())
    assert headline({"a": 1, "b": np.float32(0.5), "c": [1.0], "d": True, "e": 2.0}) == {"b": 0.5, "e": 2.0}


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "probs", "message"),
    [
        ([0, 1], [[0.5, 0.5], [0.6, 0.3]], "row 1: probabilities sum to 0.9, not 1"),
        ([0], [[0.5, 0.50011]], "row 0"),
        ([0, 1], [[0.5, 0.5], [math.nan, 1.0]], "non-finite"),
        ([0, 1], [[0.5, 0.5], [math.inf, 0.0]], "non-finite"),
        ([0, 1], [[1.2, -0.2], [0.5, 0.5]], "[0, 1]"),
        ([0, 2], [[0.5, 0.5], [0.5, 0.5]], "0..1"),
        ([0, -1], [[0.5, 0.5], [0.5, 0.5]], "0..1"),
        ([0, 0.5], [[0.5, 0.5], [0.5, 0.5]], "integers"),
        (["a", "b"], [[0.5, 0.5], [0.5, 0.5]], "integers"),
        ([0, 1], [[0.5, 0.5]], "differ in length"),
        ([], np.zeros((0, 3)), "empty"),
        ([0], [[1.0]], "at least 2 columns"),
        ([0, 1], [0.5, 0.5], "2-D"),
        ([[0, 1]], [[0.5, 0.5], [0.5, 0.5]], "1-D"),
        ([0], [[[0.5, 0.5]]], "2-D"),
    ],
)
def test_bad_inputs_raise_user_error(labels: Any, probs: Any, message: str) -> None:
    with pytest.raises(UserError) as excinfo:
        multiclass_inputs(labels, probs)
    assert message in str(excinfo.value)
    assert "\n" not in str(excinfo.value)
    with pytest.raises(UserError):
        multiclass_metrics(labels, probs, ["a", "b"])


def test_row_sum_tolerance_and_num_classes() -> None:
    y, p = multiclass_inputs([True, False], [[0.49995, 0.5], [0.5, 0.50009]])
    assert y.dtype == np.int64 and y.tolist() == [1, 0]
    assert p.dtype == np.float64 and p.shape == (2, 2)
    assert multiclass_inputs(np.array([2.0, 0.0]), np.eye(3)[[2, 0]], num_classes=3)[0].tolist() == [2, 0]
    with pytest.raises(UserError, match="3 columns but there are 4 classes"):
        multiclass_inputs([0], [[0.2, 0.3, 0.5]], num_classes=4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"class_names": ["a", "b"]}, "2 class names for 3 classes"),
        ({"class_names": ["a", "b", "c", "d"]}, "4 class names"),
        ({"class_names": ["a", "b", "a"]}, "distinct"),
        ({"class_names": "abc"}, "string"),
        ({"negative": 3}, "negative"),
        ({"negative": -1}, "negative"),
        ({"negative": 1.0}, "negative"),
        ({"threshold": math.nan}, "threshold"),
        ({"top_k": 0}, "top_k"),
    ],
)
def test_bad_arguments_raise_user_error(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"class_names": ["a", "b", "c"], **kwargs}
    probs = np.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    with pytest.raises(UserError, match=message):
        multiclass_metrics([0, 2], probs, **arguments)


def test_derived_binary_checks_negative() -> None:
    with pytest.raises(UserError, match="negative"):
        derived_binary([0, 1], [[0.5, 0.5], [0.5, 0.5]], 2)
