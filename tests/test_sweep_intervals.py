"""The sweep's bootstrap: intervals of every candidate's ranking metrics, the winner against the
runner-up on the same resamples (paired), and the plot that names each combination's layers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from probekit import plots
from probekit.bootstrap import binary_resamples, percentile_interval
from probekit.config import ThresholdSpec
from probekit.sweep import Candidate, compare, layer_text
from probekit.tasks.base import Scores
from probekit.tasks.binary import BinaryTask

from .engine_fixtures import ToyData, bert_dir, run_cli, toy_data
from .test_sweep import sweep_args

__all__ = ["bert_dir", "toy_data"]

TASK = BinaryTask(ThresholdSpec())


def candidate(name: str, labels: np.ndarray, scores: np.ndarray, layer: int = 0) -> Candidate:
    """A candidate scored ``scores`` on val, with the metrics the task computes there."""
    val = Scores(labels, scores, 0.5)
    metrics = {"val": {**TASK.metrics(val, TASK.choose_threshold(val)), "loss": 0.5}}
    return Candidate(name, (layer,), None, metrics, 0.5, 1, 1, scores={"val": val})


def rows(n: int, separation: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    return labels, 1 / (1 + np.exp(-(separation * (labels - 0.5) + rng.normal(size=n))))


def test_the_comparison_is_paired_and_says_when_the_data_cannot_tell() -> None:
    labels, strong = rows(200, 3.0, 0)
    _, close = rows(200, 2.9, 1)
    _, weak = rows(200, 0.3, 2)
    probes = [
        candidate("layer 0", labels, weak, 0).with_intervals(TASK, 500, 7),
        candidate("layer 1", labels, strong, 1).with_intervals(TASK, 500, 7),
        candidate("layer 2", labels, close, 2).with_intervals(TASK, 500, 7),
    ]
    best = probes[1] if probes[1].value("auroc") >= probes[2].value("auroc") else probes[2]
    other = probes[2] if best is probes[1] else probes[1]
    result = compare(probes, best, "auroc")
    assert result is not None
    assert result.runner_up == other.name  # the next best, not the first other one
    assert result.runner_up_interval == other.interval("auroc")
    low, high = result.runner_up_interval
    assert low <= result.runner_up_value <= high and result.within
    assert "within the runner-up's 95% interval" in result.line()
    # paired: the same resamples of the same rows, so the difference is per resample
    mine = binary_resamples(labels, best.scores["val"].scores, 500, 7)["auroc"]
    theirs = binary_resamples(labels, other.scores["val"].scores, 500, 7)["auroc"]
    gap = best.value("auroc") - other.value("auroc")
    assert result.difference_interval == percentile_interval(mine - theirs, gap)
    assert result.difference_interval[0] < 0 < result.difference_interval[1]

    clear = compare(probes[:2], probes[1], "auroc")
    assert clear is not None and not clear.within
    assert clear.difference_interval[0] > 0
    assert "outside the runner-up's 95% interval" in clear.line()
    assert json.loads(json.dumps(clear.as_json()))["within"] is False


def test_no_comparison_without_an_interval_for_the_monitor_or_a_second_candidate() -> None:
    labels, scores = rows(60, 2.0, 0)
    one = candidate("layer 0", labels, scores).with_intervals(TASK, 200, 0)
    two = candidate("layer 1", labels, scores[::-1].copy(), 1).with_intervals(TASK, 200, 0)
    assert compare([one], one, "auroc") is None
    assert compare([one, two], one, "loss") is None  # the loss has no bootstrap
    assert compare([one, two], one, "accuracy") is None
    plain = candidate("layer 0", labels, scores).with_intervals(TASK, 0, 0)
    assert plain.intervals == {} and compare([plain, two], plain, "auroc") is None


def test_intervals_cover_the_point_of_every_candidate(
    bert_dir: Path, toy_data: ToyData, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sweep"
    code, stdout, err = run_cli(
        capsys, *sweep_args(bert_dir, toy_data, "--layers", "1,2,4", "--resamples", "300", "--out", out)
    )
    assert code == 0, err
    report = json.loads((out / "sweep.json").read_text())
    assert report["bootstrap"] == {"resamples": 300, "seed": 0, "level": 0.95}
    for c in report["candidates"]:
        assert set(c["intervals"]) == {"val", "test"}
        for split, bands in c["intervals"].items():
            assert set(bands) == {"auroc", "auprc", "recall_at_1pct_fpr", "recall_at_5pct_fpr"}
            for key, band in bands.items():
                assert band is not None and band[0] <= c["metrics"][split][key] + 1e-12
                assert c["metrics"][split][key] <= band[1] + 1e-12
    comparison = report["comparison"]
    values = {c["name"]: c["metrics"]["val"]["auroc"] for c in report["candidates"]}
    best = report["best"]["name"]
    assert comparison["winner"] == best and comparison["runner_up"] != best
    assert values[comparison["runner_up"]] == max(v for name, v in values.items() if name != best)
    band = comparison["runner_up_interval"]
    assert comparison["within"] == (band[0] <= values[best] <= band[1])
    assert f"runner-up: {comparison['runner_up']}, val auroc" in err
    header, _, *lines = stdout.splitlines()
    assert "[" in lines[0].split("|")[header.split("|").index(" val auroc ")]

    code, stdout, err = run_cli(
        capsys,
        *sweep_args(
            bert_dir, toy_data, "--layers", "1,2", "--no-combos", "--resamples", "0", "--out", tmp_path / "b"
        ),
    )
    assert code == 0, err
    report = json.loads((tmp_path / "b" / "sweep.json").read_text())
    assert report["bootstrap"] == {} and report["comparison"] is None and "[" not in stdout
    assert "runner-up" not in err


@pytest.mark.parametrize(
    ("option", "value"), [("--resamples", "-1"), ("--resamples", "100001"), ("--seed", "-3")]
)
def test_bad_bootstrap_options_are_one_line_errors(
    option: str,
    value: str,
    bert_dir: Path,
    toy_data: ToyData,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = run_cli(capsys, *sweep_args(bert_dir, toy_data, option, value, "--out", tmp_path / "x"))
    assert code == 2 and err.startswith(f"probekit: error: {option} {value}:") and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


@given(st.sets(st.integers(0, 40), min_size=1, max_size=20))
def test_layer_text_names_exactly_the_layers(layers: set[int]) -> None:
    named: set[int] = set()
    for part in layer_text(sorted(layers)).split(","):
        first, _, last = part.partition("-")
        named |= set(range(int(first), int(last or first) + 1))
    assert named == layers
    assert layer_text(range(33)) == "0-32" and layer_text([3, 4]) == "3,4"


def test_the_plot_names_each_combinations_layers_and_draws_intervals(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: list[Any] = []

    def keep(fig: Any, path: Any) -> Path:
        (ax,) = fig.axes
        seen.append((ax.get_title(), [t.get_text() for t in ax.get_xticklabels()], ax.collections, ax.lines))
        return Path(path)

    monkeypatch.setattr(plots, "_save", keep)
    metrics = [{"auroc": 0.7, "accuracy": 0.6}, {"auroc": 0.8, "accuracy": 0.7}]
    bands: list[dict[str, Any]] = [{"auroc": [0.6, 0.8]}, {"auroc": [0.7, 0.9]}, {"auroc": [0.75, 0.95]}]
    plots.plot_layers(
        [0, 1],
        metrics,
        tmp_path / "p.png",
        [("top 2\n0,1", {"auroc": 0.85})],
        best="top 2\n0,1",
        intervals=bands,
        rows=120,
    )
    title, ticks, shaded, lines = seen[0]
    assert title == "Probe per layer: val, n=120 (shaded: 95% interval)"
    assert ticks == ["0", "1", "top 2\n0,1"]
    assert len(shaded) == 1  # the band around the AUROC line
    bars = [(list(line.get_xdata()), list(line.get_ydata())) for line in lines]
    # the combination's AUROC bar beside its tick (accuracy, AUROC, AUPRC sit left, at, right of it)
    assert ([3.0, 3.0], [0.75, 0.95]) in bars
    with pytest.raises(Exception, match="2 rows of intervals for 2 layers and 1 combinations"):
        plots.plot_layers([0, 1], metrics, tmp_path / "q.png", [("all", {})], intervals=bands[:2])
