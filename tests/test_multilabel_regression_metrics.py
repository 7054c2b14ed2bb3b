"""Multi-label metrics with unknown label cells, regression metrics and their plots, against
scikit-learn, SciPy and hand computations done independently here."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    mean_absolute_error,
    mean_squared_error,
    precision_score,
    r2_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from probekit.errors import UserError
from probekit.metrics import headline
from probekit.multilabel_metrics import (
    PER_LABEL_KEYS,
    choose_thresholds,
    multilabel_inputs,
    multilabel_metrics,
)
from probekit.plots_extra import plot_regression, write_multilabel_plots, write_regression_plots
from probekit.regression_metrics import REGRESSION_KEYS, regression_inputs, regression_metrics

Array = np.ndarray[Any, Any]
Data = tuple[Array, Array]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TOP_KEYS = (
    "f1",
    "f1_micro",
    "auroc",
    "auprc",
    "recall_at_1pct_fpr",
    "precision",
    "recall",
    "subset_accuracy",
    "hamming_loss",
    "known_fraction",
    "n",
)


@st.composite
def multilabel(draw: Any, max_rows: int = 40, max_labels: int = 6) -> Data:
    """`(labels, probs)`: N in 1..max_rows, L in 1..max_labels, some cells unknown (nan).

    Each label has its own positive rate (0 and 1 included: one-class columns); the unknown
    share is none, some, most or all; probabilities come from a coarse grid (ties), anywhere in
    [0, 1], or near the label (informative). Hypothesis picks the shape and kind of data; a
    seeded generator fills in the values, which keeps generation fast.
    """
    n = draw(st.integers(1, max_rows))
    k = draw(st.integers(1, max_labels))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rates = rng.choice([0.0, 0.1, 0.5, 0.9, 1.0], size=k)
    truth = (rng.random((n, k)) < rates[None, :]).astype(np.float64)
    unknown = rng.random((n, k)) < draw(st.sampled_from([0.0, 0.3, 0.8, 1.0]))
    labels = np.where(unknown, np.nan, truth)
    kind = draw(st.sampled_from(["grid", "uniform", "informative"]))
    if kind == "grid":
        probs = rng.integers(0, 5, size=(n, k)) / 4.0
    elif kind == "uniform":
        probs = rng.random((n, k))
    else:
        probs = np.clip(0.3 * truth + 0.7 * rng.random((n, k)), 0.0, 1.0)
    return labels, probs


def _names(k: int) -> list[str]:
    return [f"label{j}" for j in range(k)]


def _quiet(call: Any) -> Any:
    """Call, failing on any warning (the modules must not leak scikit-learn's or SciPy's)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return call()


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12)


def _assert_same_entries(got: dict[str, Any], expected: dict[str, Any], skip: tuple[str, ...] = ()) -> None:
    assert list(got) == list(expected)
    for key, value in expected.items():
        if key in skip:
            continue
        if isinstance(value, dict):
            _assert_same_entries(got[key], value)
        elif isinstance(value, float):
            assert _same(got[key], value), (key, got[key], value)
        else:
            assert got[key] == value, key


def _thresholds(draw: st.DataObject, k: int) -> list[float]:
    return draw.draw(st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.6, 1.0]), min_size=k, max_size=k))


# --- (a) unknown cells leave every metric unchanged -----------------------------------------


@settings(max_examples=25, deadline=None)
@given(multilabel(), st.data())
def test_unknown_cells_change_nothing(data: Data, draw: st.DataObject) -> None:
    labels, probs = data
    n, k = labels.shape
    thresholds = _thresholds(draw, k)
    m = _quiet(lambda: multilabel_metrics(labels, probs, _names(k), thresholds))
    unknown = np.isnan(labels)

    # any probabilities in the unknown cells: nothing changes
    noise = np.random.default_rng(n * 31 + k).random((n, k))
    scrambled = np.where(unknown, noise, probs)
    _assert_same_entries(multilabel_metrics(labels, scrambled, _names(k), thresholds), m)

    # an extra fully unknown row: only n and known_fraction change
    more_labels = np.vstack([labels, np.full((1, k), np.nan)])
    more_probs = np.vstack([probs, np.full((1, k), 0.7)])
    bigger = multilabel_metrics(more_labels, more_probs, _names(k), thresholds)
    _assert_same_entries(bigger, m, skip=("n", "known_fraction"))
    assert bigger["n"] == n + 1
    assert bigger["known_fraction"] == pytest.approx(m["known_fraction"] * n / (n + 1))

    # each label equals that label alone, on its known rows only
    for j, name in enumerate(_names(k)):
        known = ~unknown[:, j]
        if not known.any():
            continue
        alone = multilabel_metrics(labels[known, j : j + 1], probs[known, j : j + 1], [name], [thresholds[j]])
        _assert_same_entries(m["per_label"][name], alone["per_label"][name])
        assert alone["known_fraction"] == 1.0


# --- (b) against scikit-learn and hand computations --------------------------------------------


def _recall_at_fpr(y: Array, p: Array, max_fpr: float) -> float:
    fpr, tpr, _ = roc_curve(y, p, drop_intermediate=False)
    return float(tpr[fpr <= max_fpr].max())


def _check_label(entry: dict[str, float], y: Array, p: Array, threshold: float) -> None:
    """One label's entry against scikit-learn on its known rows `y`, `p`."""
    assert tuple(entry) == PER_LABEL_KEYS
    assert all(type(value) is float for value in entry.values())
    assert entry["known"] == float(y.size)
    assert entry["support"] == float(np.sum(y == 1))
    assert entry["threshold"] == threshold
    if y.size == 0:
        assert all(math.isnan(entry[key]) for key in PER_LABEL_KEYS[:6])
        return
    predicted = (p >= threshold).astype(np.int64)
    assert entry["precision"] == pytest.approx(precision_score(y, predicted, zero_division=0))
    assert entry["recall"] == pytest.approx(recall_score(y, predicted, zero_division=0))
    assert entry["f1"] == pytest.approx(f1_score(y, predicted, zero_division=0))
    if 0 < y.sum() < y.size:
        assert entry["auroc"] == pytest.approx(roc_auc_score(y, p))
        assert entry["auprc"] == pytest.approx(average_precision_score(y, p))
        assert entry["recall_at_1pct_fpr"] == pytest.approx(_recall_at_fpr(y, p, 0.01))
    else:
        assert math.isnan(entry["auroc"]) and math.isnan(entry["auprc"])
        assert math.isnan(entry["recall_at_1pct_fpr"])


def _mean_or_nan(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


@settings(max_examples=30, deadline=None)
@given(multilabel(), st.data())
def test_metrics_match_sklearn_and_hand_computation(data: Data, draw: st.DataObject) -> None:
    labels, probs = data
    n, k = labels.shape
    thresholds = _thresholds(draw, k)
    m = _quiet(lambda: multilabel_metrics(labels, probs, _names(k), thresholds))
    assert tuple(m)[: len(TOP_KEYS)] == TOP_KEYS
    assert m["label_names"] == _names(k)
    assert list(m["per_label"]) == _names(k)
    for j, name in enumerate(_names(k)):
        known = ~np.isnan(labels[:, j])
        _check_label(m["per_label"][name], labels[known, j].astype(np.int64), probs[known, j], thresholds[j])

    entries = list(m["per_label"].values())
    for key in ("f1", "precision", "recall", "auroc", "auprc", "recall_at_1pct_fpr"):
        assert _same(m[key], _mean_or_nan([entry[key] for entry in entries])), key

    # pooled over the known cells, by plain loops
    cells = [
        (int(labels[i, j]), int(probs[i, j] >= thresholds[j]))
        for i in range(n)
        for j in range(k)
        if not math.isnan(labels[i, j])
    ]
    assert m["known_fraction"] == pytest.approx(len(cells) / (n * k))
    assert m["n"] == float(n)
    rows = [
        [labels[i, j] == (probs[i, j] >= thresholds[j]) for j in range(k) if not math.isnan(labels[i, j])]
        for i in range(n)
    ]
    rows = [row for row in rows if row]
    if cells:
        truth, predicted = zip(*cells, strict=True)
        assert m["f1_micro"] == pytest.approx(f1_score(truth, predicted, zero_division=0))
        assert m["hamming_loss"] == pytest.approx(sum(t != p for t, p in cells) / len(cells))
        assert m["subset_accuracy"] == pytest.approx(sum(all(row) for row in rows) / len(rows))
    else:
        assert math.isnan(m["f1_micro"]) and math.isnan(m["hamming_loss"])
        assert math.isnan(m["subset_accuracy"])

    top = headline(m)
    assert tuple(top) == TOP_KEYS
    for key, value in top.items():
        assert type(value) is float
        if key != "n" and not math.isnan(value):
            assert 0.0 <= value <= 1.0, (key, value)


def test_hand_example_with_unknown_cells() -> None:
    nan = math.nan
    labels = [[1, 0, nan], [0, nan, nan], [1, 1, 0], [nan, nan, nan]]
    probs = [[0.9, 0.2, 0.5], [0.6, 0.9, 0.1], [0.4, 0.7, 0.8], [0.3, 0.3, 0.3]]
    m = multilabel_metrics(labels, probs, ["a", "b", "c"])
    # known cells: a: (1,.9) (0,.6) (1,.4); b: (0,.2) (1,.7); c: (0,.8)
    # predictions at 0.5: a: 1 1 0 -> tp 1 fp 1 fn 1; b: 0 1 -> tp 1; c: 1 -> fp 1
    assert m["per_label"]["a"]["f1"] == pytest.approx(0.5)
    assert m["per_label"]["b"]["f1"] == 1.0
    assert m["per_label"]["c"]["f1"] == 0.0
    assert m["f1"] == pytest.approx(0.5)
    assert m["f1_micro"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
    assert m["hamming_loss"] == pytest.approx(3 / 6)
    assert m["subset_accuracy"] == pytest.approx(1 / 3)  # row 0 right; rows 1, 2 wrong; row 3 unknown
    assert m["known_fraction"] == pytest.approx(6 / 12)
    assert m["per_label"]["a"]["auroc"] == pytest.approx(0.5)
    assert math.isnan(m["per_label"]["c"]["auroc"])
    assert (m["per_label"]["c"]["known"], m["per_label"]["c"]["support"]) == (1.0, 0.0)


def test_all_unknown_is_nan_not_an_error() -> None:
    m = _quiet(lambda: multilabel_metrics(np.full((3, 2), np.nan), np.full((3, 2), 0.5), ["a", "b"]))
    for key in TOP_KEYS:
        if key == "n":
            assert m[key] == 3.0
        elif key == "known_fraction":
            assert m[key] == 0.0
        else:
            assert math.isnan(m[key]), key
    assert choose_thresholds(np.full((3, 2), np.nan), np.full((3, 2), 0.5)) == [0.5, 0.5]


# --- (c) thresholds --------------------------------------------------------------------------


def _f1_at(y: Array, p: Array, t: float) -> float:
    predicted = p >= t
    tp = int(np.sum(predicted & (y == 1)))
    fp = int(np.sum(predicted & (y == 0)))
    fn = int(np.sum(~predicted & (y == 1)))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


@settings(max_examples=30, deadline=None)
@given(multilabel())
def test_max_f1_thresholds_are_best_by_brute_force(data: Data) -> None:
    labels, probs = data
    chosen = _quiet(lambda: choose_thresholds(labels, probs))
    assert len(chosen) == labels.shape[1]
    m = multilabel_metrics(labels, probs, _names(labels.shape[1]), chosen)
    for j, threshold in enumerate(chosen):
        known = ~np.isnan(labels[:, j])
        y, p = labels[known, j], probs[known, j]
        if not 0 < y.sum() < y.size:
            assert threshold == 0.5
            continue
        best = max(_f1_at(y, p, t) for t in set(p.tolist()))
        assert _f1_at(y, p, threshold) == pytest.approx(best)
        assert m["per_label"][f"label{j}"]["f1"] == pytest.approx(best)


@settings(max_examples=20, deadline=None)
@given(multilabel(), st.sampled_from([0.0, 0.05, 0.3, 1.0]))
def test_target_fpr_thresholds_keep_the_budget(data: Data, budget: float) -> None:
    labels, probs = data
    chosen = choose_thresholds(labels, probs, rule="target_fpr", target_fpr=budget)
    for j, threshold in enumerate(chosen):
        known = ~np.isnan(labels[:, j])
        y, p = labels[known, j], probs[known, j]
        if not 0 < y.sum() < y.size:
            assert threshold == 0.5
            continue
        fpr = float(np.sum((p >= threshold) & (y == 0)) / np.sum(y == 0))
        assert fpr <= budget
        lower = p[p < threshold]
        if lower.size:  # the next lower probability would break the budget
            t = lower.max()
            assert np.sum((p >= t) & (y == 0)) / np.sum(y == 0) > budget


# --- (d) regression ----------------------------------------------------------------------------


@st.composite
def regression(draw: Any) -> Data:
    """`(targets, predictions)`: N in 1..50, values on a coarse grid (ties) or continuous, the
    predictions noisy, constant, or exact."""
    n = draw(st.integers(1, 50))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e4]))
    if draw(st.booleans()):
        targets = rng.integers(-3, 4, size=n).astype(np.float64) * scale
    else:
        targets = rng.normal(0.0, scale, size=n)
    kind = draw(st.sampled_from(["noisy", "constant", "exact"]))
    if kind == "noisy":
        predictions = targets + rng.normal(0.0, scale, size=n)
    elif kind == "constant":
        predictions = np.full(n, 0.5 * scale)
    else:
        predictions = targets.copy()
    return targets, predictions


@settings(max_examples=40, deadline=None)
@given(regression())
def test_regression_matches_sklearn_and_scipy(data: Data) -> None:
    y, p = data
    m = _quiet(lambda: regression_metrics(y, p))
    assert tuple(m) == REGRESSION_KEYS
    assert all(type(value) is float for value in m.values())
    assert m["n"] == float(y.size)
    assert m["mae"] == pytest.approx(mean_absolute_error(y, p))
    assert m["rmse"] == pytest.approx(math.sqrt(mean_squared_error(y, p)))
    assert m["target_mean"] == pytest.approx(float(np.mean(y)))
    assert m["target_std"] == pytest.approx(math.sqrt(float(np.mean((y - y.mean()) ** 2))))
    constant_y = bool(np.all(y == y[0]))
    constant_p = bool(np.all(p == p[0]))
    if y.size < 2 or constant_y:
        assert math.isnan(m["r2"])
    else:
        assert m["r2"] == pytest.approx(r2_score(y, p))
    if y.size < 2 or constant_y or constant_p:
        assert math.isnan(m["pearson"]) and math.isnan(m["spearman"])
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert m["pearson"] == pytest.approx(pearsonr(y, p).statistic, abs=1e-9)
            assert m["spearman"] == pytest.approx(spearmanr(y, p).statistic, abs=1e-9)


def test_regression_constant_targets_and_single_example() -> None:
    m = _quiet(lambda: regression_metrics([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]))
    assert math.isnan(m["r2"]) and math.isnan(m["pearson"]) and math.isnan(m["spearman"])
    assert m["mae"] == pytest.approx(2 / 3)
    assert (m["target_mean"], m["target_std"]) == (2.0, 0.0)
    one = _quiet(lambda: regression_metrics([1.5], [1.0]))
    assert math.isnan(one["r2"]) and math.isnan(one["pearson"])
    assert (one["mae"], one["rmse"], one["n"]) == (0.5, 0.5, 1.0)
    perfect = regression_metrics([1.0, 2.0, 4.0], [1.0, 2.0, 4.0])
    assert (perfect["r2"], perfect["mae"]) == (1.0, 0.0)
    assert perfect["pearson"] == pytest.approx(1.0) and perfect["spearman"] == pytest.approx(1.0)


# --- (e) bad input -------------------------------------------------------------------------------

NAN = math.nan
BAD_MULTILABEL: dict[str, tuple[Any, Any, str]] = {
    "1-D labels": ([1, 0], [0.5, 0.5], "2-D"),
    "shapes differ": ([[1, 0]], [[0.5, 0.5, 0.5]], "differ in shape"),
    "no rows": (np.zeros((0, 2)), np.zeros((0, 2)), "no rows"),
    "no labels": (np.zeros((2, 0)), np.zeros((2, 0)), "at least one column"),
    "label 2": ([[1, 0], [2, NAN]], [[0.5, 0.5], [0.5, 0.5]], "labels[1, 0]"),
    "label 0.5": ([[1, 0.5]], [[0.5, 0.5]], "labels[0, 1]"),
    "label inf": ([[1, math.inf]], [[0.5, 0.5]], "labels[0, 1]"),
    "text labels": ([["x", "1"]], [[0.5, 0.5]], "numeric"),
    "nan prob": ([[1, 0], [0, 1]], [[0.5, 0.5], [0.5, NAN]], "probs[1, 1]"),
    "prob above 1": ([[1, NAN]], [[0.5, 1.5]], "probs[0, 1]"),
    "prob below 0": ([[1, 0]], [[-0.1, 0.5]], "probs[0, 0]"),
}


@pytest.mark.parametrize("case", BAD_MULTILABEL)
def test_bad_multilabel_input(case: str) -> None:
    labels, probs, needle = BAD_MULTILABEL[case]
    for call in (
        lambda: multilabel_inputs(labels, probs),
        lambda: multilabel_metrics(labels, probs, ["a", "b"]),
        lambda: choose_thresholds(labels, probs),
    ):
        with pytest.raises(UserError) as info:
            call()
        assert needle in str(info.value), (case, str(info.value))
        assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"label_names": ["a"]}, "1 label names for 2"),
        ({"label_names": ["a", "a"]}, "repeated: a"),
        ({"label_names": "ab"}, "not the string"),
        ({"thresholds": [0.5]}, "one threshold per label"),
        ({"thresholds": [0.5, NAN]}, "label 1 is nan"),
        ({"thresholds": ["x", 0.5]}, "must be numbers"),
    ],
)
def test_bad_names_and_thresholds(kwargs: dict[str, Any], needle: str) -> None:
    call: dict[str, Any] = {"label_names": ["a", "b"], **kwargs}
    with pytest.raises(UserError, match=needle):
        multilabel_metrics([[1, 0], [0, 1]], [[0.5, 0.5], [0.5, 0.5]], **call)


@pytest.mark.parametrize(
    ("rule", "target_fpr", "needle"),
    [
        ("max_f1", 0.1, "only used with"),
        ("target_fpr", None, "needs target_fpr"),
        ("target_fpr", 1.5, "needs target_fpr"),
        ("best", None, "unknown threshold rule"),
    ],
)
def test_bad_threshold_rules(rule: Any, target_fpr: float | None, needle: str) -> None:
    # also with no label that has both classes: the rule is checked first
    for labels in ([[1, 0], [0, 1]], [[NAN, 1], [NAN, 1]]):
        with pytest.raises(UserError, match=needle):
            choose_thresholds(labels, [[0.2, 0.5], [0.7, 0.5]], rule=rule, target_fpr=target_fpr)


@pytest.mark.parametrize(
    ("targets", "predictions", "needle"),
    [
        ([[1.0, 2.0]], [[1.0, 2.0]], "1-D"),
        ([1.0, 2.0], [1.0], "differ in length"),
        ([], [], "empty"),
        ([1.0, NAN], [1.0, 2.0], "targets[1]"),
        ([1.0, 2.0], [math.inf, 2.0], "predictions[0]"),
        (["a", "b"], [1.0, 2.0], "numeric"),
    ],
)
def test_bad_regression_input(targets: Any, predictions: Any, needle: str) -> None:
    for call in (regression_inputs, regression_metrics):
        with pytest.raises(UserError) as info:
            call(targets, predictions)
        assert needle in str(info.value)
        assert "\n" not in str(info.value)
    with pytest.raises(UserError):
        plot_regression(targets, predictions, "unused.png")


# --- (f) plots -----------------------------------------------------------------------------------

HISTORY = [
    {"epoch": 1, "train_loss": 0.7, "train_accuracy": 0.6, "val_loss": 0.65, "val_accuracy": 0.62},
    {
        "epoch": 2,
        "train_loss": 0.5,
        "train_accuracy": 0.75,
        "val_loss": 0.55,
        "val_accuracy": 0.7,
        "best": True,
    },
]


@pytest.fixture
def no_figures() -> Iterator[None]:
    """Warnings are errors, and no pyplot figure is open before or after the test."""
    plt.close("all")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield
    assert plt.get_fignums() == []


def _read_png(path: Path) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.usefixtures("no_figures")
@pytest.mark.parametrize("k", [1, 3, 12])
def test_multilabel_plots_write_pngs(k: int, tmp_path: Path) -> None:
    rng = np.random.default_rng(k)
    n = 40
    truth = (rng.random((n, k)) < 0.4).astype(np.float64)
    labels = np.where(rng.random((n, k)) < 0.3, np.nan, truth)
    labels[:, -1] = np.nan  # one label never known: crosses, not bars
    if k > 1:
        labels[:, 0] = np.where(np.isnan(labels[:, 0]), np.nan, 1.0)  # one class only: no AUROC
    probs = np.clip(0.4 * truth + 0.6 * rng.random((n, k)), 0.0, 1.0)
    names = [f"category_{j}_with_a_long_name" for j in range(k)]
    history = HISTORY if k != 3 else []
    written = write_multilabel_plots(tmp_path / "out", history, labels, probs, names, [0.5] * k)
    expected = ["per_label.png", "per_label_ranking.png"]
    if history:
        expected.insert(0, "history.png")
    assert [path.name for path in written] == expected
    for path in written:
        _read_png(path)


@pytest.mark.usefixtures("no_figures")
@pytest.mark.parametrize(("n", "constant"), [(1, False), (5, True), (300, False)])
def test_regression_plots_write_pngs(n: int, constant: bool, tmp_path: Path) -> None:
    rng = np.random.default_rng(n)
    targets = np.full(n, 3.0) if constant else rng.normal(10.0, 2.0, n)
    predictions = targets + rng.normal(0.0, 1.0, n)
    written = write_regression_plots(tmp_path / "out", HISTORY if n > 1 else [], targets, predictions)
    assert [path.name for path in written] == (["history.png"] if n > 1 else []) + ["regression.png"]
    for path in written:
        _read_png(path)
