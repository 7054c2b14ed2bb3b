"""Progress where a person can see it: bars in a terminal or a notebook, and a heartbeat line at
most every 30 s with the running loss and an ETA when the log is not a terminal (CI, batch jobs)."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest

from probekit.batching import Progress, in_notebook
from tests import engine_fixtures
from tests.engine_fixtures import ToyData, make_config

bert_dir = engine_fixtures.bert_dir
toy_data = engine_fixtures.toy_data
single_thread = engine_fixtures.single_thread


class Clock:
    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        value = self.now
        self.now += self.step
        return value


def test_heartbeat_lines_come_at_most_every_30_s_with_values_and_eta() -> None:
    lines: list[str] = []
    shown = Progress(
        range(100), bar=False, desc="epoch 1/3", total=100, heartbeat=lines.append, clock=Clock(7.0)
    )
    for i in shown:
        shown.note(loss=1.0 / (i + 1), lr=2e-5)
    assert 20 <= len(lines) <= 25  # 700 s of work, a line per >= 30 s
    assert lines[0] == "epoch 1/3: 5/100 (5%), loss 0.2, lr 2e-05; 35s elapsed, ETA 11m05s"
    assert lines[-1].startswith("epoch 1/3: ") and "ETA" in lines[-1]


def test_no_heartbeat_for_a_fast_loop_or_without_a_log() -> None:
    lines: list[str] = []
    assert list(
        Progress(range(5), bar=False, desc="x", total=5, heartbeat=lines.append, clock=Clock(1.0))
    ) == [
        0,
        1,
        2,
        3,
        4,
    ]
    assert lines == []
    assert list(Progress(range(3), bar=False, desc="x")) == [0, 1, 2]


def test_a_bar_shows_the_noted_values(capsys: pytest.CaptureFixture[str]) -> None:
    shown = Progress(range(3), bar=True, desc="epoch 1/1", total=3)
    for _ in shown:
        shown.note(loss=0.5)
    assert "epoch 1/1" in capsys.readouterr().err


def test_a_notebook_is_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not in_notebook()
    shell = type("ZMQInteractiveShell", (), {})()
    fake = types.ModuleType("IPython")
    fake.get_ipython = lambda: shell  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "IPython", fake)
    assert in_notebook()


def test_a_run_logs_heartbeats_when_not_a_terminal(
    bert_dir: Path, toy_data: ToyData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real (tiny) run with progress off and a clock that runs fast: its log gets heartbeat lines
    with the step count and the running loss."""
    import probekit.batching
    from probekit.training import train

    clock = Clock(40.0)
    real = probekit.batching.Progress.__init__

    def fast(self: Any, *args: Any, **kwargs: Any) -> None:
        real(self, *args, **kwargs)
        self.clock = clock

    monkeypatch.setattr(probekit.batching.Progress, "__init__", fast)
    lines: list[str] = []
    config = make_config(bert_dir, toy_data, "train.epochs=1", "train.cache.enabled=false")
    train(config, out=tmp_path / "run", log=lines.append, progress=False)
    beats = [line for line in lines if line.startswith("epoch 1/1: ")]
    assert beats and all("elapsed" in line and "ETA" in line for line in beats)
    assert any(", loss " in line and ", lr " in line for line in beats)  # once a window has ended
