"""What the report plots show: the split and its row count in every title, the ROC's log-FPR
panel with the recall at 1% FPR marked, and the monitored metric and learning rate in the curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from probekit import plots


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The figures the plot functions draw, captured before they are saved and cleared."""
    seen: list[Any] = []

    def keep(fig: Any, path: Any) -> Path:
        seen.append(
            [(ax.get_title(), ax.get_xscale(), [line.get_label() for line in ax.lines]) for ax in fig.axes]
        )
        return Path(path)

    monkeypatch.setattr(plots, "_save", keep)
    return seen


def test_titles_name_the_split_and_rows_and_the_roc_shows_low_fpr(figures: list[Any], tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    p = np.clip(0.35 * y + 0.65 * rng.random(400), 0, 1)
    history = [
        {"epoch": 1, "train_loss": 0.6, "val_loss": 0.5, "val_auroc": 0.8, "lr_head": 1e-4},
        {"epoch": 2, "train_loss": 0.5, "val_loss": 0.4, "val_auroc": 0.85, "lr_head": 5e-5, "best": True},
    ]
    plots.write_report_plots(tmp_path, history, y, p, 0.5, ("safe", "unsafe"), split="test", monitor="auroc")
    curves, roc, pr, confusion, calibration = figures
    assert roc[0][0] == "ROC curve (test, n=400)"
    assert roc[1][1] == "log" and any(label.startswith("recall at 1% FPR = ") for label in roc[1][2])
    expected = float(np.max(plots.roc_curve(y, p)[1][plots.roc_curve(y, p)[0] <= 0.01]))
    assert f"recall at 1% FPR = {expected:.3f}" in roc[1][2]
    assert pr[0][0] == "Precision-recall curve (test, n=400)"
    assert confusion[0][0].endswith("(test, n=400)")
    assert "test, n=400" in calibration[0][0]
    assert "val auroc (monitored)" in curves[1][2]
    assert curves[2][0].startswith("Learning rate") and "head learning rate" in curves[2][2]
