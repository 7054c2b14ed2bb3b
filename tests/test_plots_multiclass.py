"""Every multi-class plot writes a readable PNG, for 2 to 13 classes, long names, absent classes
and a single example, without warnings and without leaving a matplotlib figure open."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest

from probekit.errors import UserError
from probekit.metrics import expected_calibration_error
from probekit.plots_multiclass import (
    per_class_metrics,
    plot_confusion_matrix,
    plot_per_class_bars,
    plot_pr_per_class,
    plot_reliability,
    top_label_ece,
    write_multiclass_plots,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
Data = tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], list[str]]

SHORT = ["safe", "vcr", "src", "cse", "ssh", "iwp", "sxc_prn", "ipv", "dfm", "ncr", "hte", "prv", "spc"]
LONG = [
    "safe",
    "violent_crimes",
    "sex_related_crimes",
    "child_sexual_exploitation",
    "suicide_and_self_harm",
    "indiscriminate_weapons",
    "sexual_content",
    "intellectual_property",
    "defamation",
    "non_violent_crimes",
    "hate",
    "privacy",
    "specialized_advice",
]
HISTORY = [
    {"epoch": 1, "train_loss": 1.9, "train_accuracy": 0.4, "val_loss": 1.6, "val_accuracy": 0.5},
    {
        "epoch": 2,
        "train_loss": 1.1,
        "train_accuracy": 0.7,
        "val_loss": 1.2,
        "val_accuracy": 0.66,
        "best": True,
    },
]


def make_data(names: list[str], n: int = 300, absent: int | None = None, seed: int = 0) -> Data:
    """Noisy but informative probabilities; class `absent` never occurs in the labels."""
    rng = np.random.default_rng(seed)
    k = len(names)
    labels = rng.integers(0, k, n)
    if absent is not None:
        labels[labels == absent] = (absent + 1) % k
    logits = rng.normal(0.0, 1.0, (n, k))
    logits[np.arange(n), labels] += rng.uniform(0.0, 3.0, n)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return labels, probs, names


DATA: dict[str, Callable[[], Data]] = {
    "k2": lambda: make_data(["safe", "unsafe"]),
    "k13_absent_class": lambda: make_data(SHORT, absent=7),
    "k13_long_names": lambda: make_data(LONG),
    "n1": lambda: (np.array([4]), np.full((1, 13), 1 / 13), SHORT),
}


def read_png(path: Path) -> np.ndarray[Any, Any]:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3
    assert image.shape[2] in (3, 4)
    assert image.shape[0] > 100
    assert image.shape[1] > 100
    assert image.std() > 0  # something was drawn
    return image


@pytest.fixture(autouse=True)
def strict() -> Iterator[None]:
    """Warnings are errors, and no pyplot figure is open before or after a test."""
    plt.close("all")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield
    assert plt.get_fignums() == []


PlotCall = Callable[[Data, Path], Path]
PLOTS: dict[str, PlotCall] = {
    "confusion": lambda d, path: plot_confusion_matrix(d[0], d[1], d[2], path),
    "pr_per_class": lambda d, path: plot_pr_per_class(d[0], d[1], d[2], path),
    "reliability": lambda d, path: plot_reliability(d[0], d[1], path),
    "per_class": lambda d, path: plot_per_class_bars(per_class_metrics(*d), path),
}


@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("name", PLOTS)
def test_plot_writes_png(name: str, data: str, tmp_path: Path) -> None:
    path = tmp_path / "sub" / f"{name}.png"
    assert PLOTS[name](DATA[data](), path) == path
    read_png(path)
    assert plt.get_fignums() == []


def test_confusion_grows_with_classes(tmp_path: Path) -> None:
    small = read_png(plot_confusion_matrix(*make_data(["a", "b"]), tmp_path / "k2.png"))
    large = read_png(plot_confusion_matrix(*make_data(SHORT), tmp_path / "k13.png"))
    assert small.shape[0] < large.shape[0]
    assert small.shape[1] < large.shape[1]
    longer = read_png(plot_confusion_matrix(*make_data(LONG), tmp_path / "long.png"))
    assert longer.shape[1] > large.shape[1]  # room for the long tick labels


def test_per_class_bars_with_missing_values(tmp_path: Path) -> None:
    values = {
        "safe": {"f1": 0.9, "auroc": 0.97},
        "violent_crimes": {"f1": math.nan, "auroc": 0.8},
        "hate": {"f1": 0.4},  # auroc missing
        "privacy": {"f1": None, "auroc": math.inf},  # type: ignore[dict-item]
    }
    read_png(plot_per_class_bars(values, tmp_path / "bars.png", metrics=("f1", "auroc")))
    read_png(plot_per_class_bars({"a": {"f1": math.nan}}, tmp_path / "all_nan.png", metrics=("f1",)))
    read_png(plot_per_class_bars({}, tmp_path / "empty.png"))


def test_per_class_metrics() -> None:
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.3, 0.6, 0.1]])
    rows = per_class_metrics(labels, probs, ["a", "b", "c"])
    assert list(rows) == ["a (n=2)", "b (n=2)", "c (n=0)"]
    assert rows["a (n=2)"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3})
    assert rows["b (n=2)"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8})
    assert rows["c (n=0)"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_reliability_bins(tmp_path: Path) -> None:
    labels, probs, _ = make_data(SHORT)
    read_png(plot_reliability(labels, probs, tmp_path / "five.png", bins=5))
    read_png(plot_reliability(labels, probs, tmp_path / "one.png", bins=1))
    with pytest.raises(UserError, match="bins"):
        plot_reliability(labels, probs, tmp_path / "none.png", bins=0)


def test_top_label_ece_matches_binary_ece() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 400)
    positive = rng.uniform(0.0, 1.0, 400)
    positive[positive == 0.5] = 0.6  # ties break differently (argmax vs `>= 0.5`)
    probs = np.stack([1 - positive, positive], axis=1)
    assert top_label_ece(labels, probs) == pytest.approx(expected_calibration_error(labels, positive))


FILES = ["history.png", "confusion.png", "pr_per_class.png", "reliability.png", "per_class.png"]


@pytest.mark.parametrize(
    ("history", "negative"), [(HISTORY, 0), ([], None)], ids=["history_negative", "bare"]
)
def test_write_multiclass_plots(
    negative: int | None, history: list[dict[str, float | None]], tmp_path: Path
) -> None:
    folder = tmp_path / "runs" / "mc"
    backend = matplotlib.get_backend()
    paths = write_multiclass_plots(
        folder, history, *make_data(LONG, absent=5), negative=negative, threshold=0.3
    )
    expected = FILES if history else FILES[1:]
    if negative is not None:
        expected = [*expected, "binary_roc.png", "binary_pr.png"]
    assert [p.name for p in paths] == expected
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected)
    for path in paths:
        assert path.parent == folder
        read_png(path)
    assert matplotlib.get_backend() == backend


def test_write_multiclass_plots_only_negative_class(tmp_path: Path) -> None:
    """The binary view with every example in the negative class: undefined curves, still drawn."""
    _, probs, names = make_data(["safe", "vcr", "hte"], n=20)
    paths = write_multiclass_plots(tmp_path, [], np.zeros(20, dtype=int), probs, names, negative=0)
    assert [p.name for p in paths][-2:] == ["binary_roc.png", "binary_pr.png"]
    for path in paths:
        read_png(path)


@pytest.mark.parametrize(
    ("labels", "probs", "names"),
    [
        ([0, 1], [[0.5, 0.5], [0.2, 0.8]], ["a"]),  # one name for two classes
        ([0, 1], [[0.5, 0.5], [0.2, 0.8]], ["a", "a"]),  # duplicate names
        ([0, 2], [[0.5, 0.5], [0.2, 0.8]], ["a", "b"]),  # label out of range
        ([0, 1], [[0.5, 0.5], [math.nan, 0.8]], ["a", "b"]),  # nan
        ([0, 1], [0.5, 0.2], ["a", "b"]),  # 1-D probs
        ([0], [[1.0]], ["a"]),  # one class
        ([], np.zeros((0, 2)), ["a", "b"]),  # empty
    ],
)
def test_bad_inputs_raise(labels: Any, probs: Any, names: list[str], tmp_path: Path) -> None:
    with pytest.raises(UserError):
        plot_confusion_matrix(labels, probs, names, tmp_path / "c.png")


def test_bad_negative_raises(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="negative"):
        write_multiclass_plots(tmp_path, [], *make_data(["a", "b"]), negative=2)
