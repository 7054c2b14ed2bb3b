"""Every plot writes a readable PNG, on ordinary and on degenerate inputs, without warnings."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.image
import numpy as np
import pytest

from probekit.errors import UserError
from probekit.plots import (
    REPORT_PLOTS,
    plot_calibration,
    plot_confusion,
    plot_history,
    plot_pr,
    plot_roc,
    write_report_plots,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
Arrays = tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]

HISTORY = [
    {"epoch": 1, "train_loss": 0.69, "train_accuracy": 0.55, "val_loss": 0.62, "val_accuracy": 0.66},
    {
        "epoch": 2,
        "train_loss": 0.41,
        "train_accuracy": 0.81,
        "val_loss": 0.44,
        "val_accuracy": 0.8,
        "best": True,
    },
    {"epoch": 3, "train_loss": 0.3, "train_accuracy": 0.88, "val_loss": 0.47, "val_accuracy": 0.79},
]


def assert_png(path: Path) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3
    assert image.shape[2] in (3, 4)
    assert image.shape[0] > 100
    assert image.shape[1] > 100
    assert image.std() > 0  # something was drawn


@pytest.fixture(scope="module")
def scored() -> Arrays:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    probs = 1 / (1 + np.exp(-(rng.normal(0, 1.5, 200) + 2.0 * (labels - 0.5))))
    return labels, probs


PlotCall = Callable[[Arrays, Path], Path]
PLOTS: dict[str, PlotCall] = {
    "history": lambda data, path: plot_history(HISTORY, path),
    "roc": lambda data, path: plot_roc(*data, path, threshold=0.5),
    "roc_no_threshold": lambda data, path: plot_roc(*data, path),
    "pr": lambda data, path: plot_pr(*data, path, threshold=0.5),
    "pr_no_threshold": lambda data, path: plot_pr(*data, path),
    "confusion": lambda data, path: plot_confusion(*data, 0.5, path, class_names=("safe", "unsafe")),
    "calibration": lambda data, path: plot_calibration(*data, path),
}


@pytest.mark.parametrize("name", PLOTS)
def test_plot_writes_png(name: str, scored: Arrays, tmp_path: Path) -> None:
    path = tmp_path / "sub" / f"{name}.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        written = PLOTS[name](scored, path)
    assert written == path
    assert_png(path)


@pytest.mark.parametrize("label", [0, 1])
@pytest.mark.parametrize("name", [n for n in PLOTS if n != "history"])
def test_plot_single_class(name: str, label: int, tmp_path: Path) -> None:
    data = (np.full(20, label), np.linspace(0.0, 1.0, 20))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = PLOTS[name](data, tmp_path / f"{name}.png")
    assert_png(path)


@pytest.mark.parametrize(
    "history",
    [
        [],
        [{"train_loss": 0.5}, {"train_loss": 0.4}],  # no epoch, no val, no accuracy
        [{"epoch": 0, "val_loss": math.nan, "val_accuracy": 0.5, "best": True}, {"val_loss": None}],
    ],
    ids=["empty", "partial", "nan"],
)
def test_history_with_missing_values(history: list[dict[str, float | None]], tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = plot_history(history, tmp_path / "curves.png")
    assert_png(path)


def test_threshold_predicting_nothing(scored: Arrays, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_png(plot_pr(*scored, tmp_path / "pr.png", threshold=1.01))
        assert_png(plot_roc(*scored, tmp_path / "roc.png", threshold=1.01))
        assert_png(plot_confusion(*scored, 1.01, tmp_path / "confusion.png"))


def test_write_report_plots(scored: Arrays, tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "one"
    backend = matplotlib.get_backend()
    paths = write_report_plots(run_dir, HISTORY, *scored, 0.42, ("safe", "unsafe"))
    assert [p.name for p in paths] == list(REPORT_PLOTS)
    assert [p.name for p in paths] == ["curves.png", "roc.png", "pr.png", "confusion.png", "calibration.png"]
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(REPORT_PLOTS)
    for path in paths:
        assert path.parent == run_dir
        assert_png(path)
    assert matplotlib.get_backend() == backend  # no global state changed


def test_write_report_plots_single_class(tmp_path: Path) -> None:
    labels, probs = np.zeros(10, dtype=int), np.linspace(0.0, 0.9, 10)
    paths = write_report_plots(tmp_path, [], labels, probs, 0.5, ("0", "1"))
    assert len(paths) == 5
    for path in paths:
        assert_png(path)


def test_bad_inputs_raise(tmp_path: Path) -> None:
    with pytest.raises(UserError):
        plot_confusion(np.array([0, 1]), np.array([0.1, 0.9]), 0.5, tmp_path / "c.png", class_names=("a",))
    with pytest.raises(UserError):
        plot_roc(np.array([0, 1]), np.array([0.1, math.nan]), tmp_path / "r.png")
