"""`TrainState` and the callbacks: each policy on its own, in milliseconds, with its state round
trip; then a user's callback through a real run, its state carried across a stop and a resume."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from probekit.errors import TerminatedError
from probekit.state import Saved
from probekit.tasks.base import Scores
from probekit.training import Callback, TrainState, train
from probekit.training.callbacks import (
    BestWeights,
    EarlyStopping,
    MetricsFile,
    StopOnSignal,
    callback_states,
    improves,
    state_keys,
)

from .engine_fixtures import bert_dir, make_config, no_plots, toy_data

__all__ = ["bert_dir", "no_plots", "toy_data"]


class OneProcess:
    """The process group of a single process, as the callbacks use it."""

    is_main, active, sharded, size, rank = True, False, False, 1, 0

    def max_flags(self, *flags: int) -> list[int]:
        return list(flags)

    def barrier(self) -> None:
        pass


def fake_fit(**fields: Any) -> Any:
    """What a callback reads from `probekit.training.loop.Fit`, with its own ``fields``."""
    logged: list[str] = []
    ctx = SimpleNamespace(group=OneProcess(), is_main=True, log=logged.append)
    plan = SimpleNamespace(task=SimpleNamespace(epoch_line=lambda m: f"auroc {m['auroc']:.2f}"))
    base = {"ctx": ctx, "plan": plan, "state": TrainState(), "notes": [], "signal": 0, "logged": logged}
    return SimpleNamespace(**{**base, **fields})


def test_train_state_round_trips_through_json() -> None:
    state = TrainState(
        epoch=3,
        window=2,
        step=14,
        skipped=1,
        epoch_skipped=1,
        loss_sum=1.5,
        correct=7,
        seen=9,
        history=[{"epoch": 1, "best": True}, {"epoch": 2, "best": False}],
        stopped_early=False,
    )
    data = json.loads(json.dumps(state.to_json()))
    assert data["skipped_steps"] == [1, 1] and data["accumulators"] == [1.5, 7, 9]
    again = TrainState.from_json(data)
    assert again == state
    assert (
        TrainState.from_json(data, sums=False).seen == 0
    )  # another process: the sums stay with the main one
    assert state.to_json((10.0, 20, 30))["accumulators"] == [10.0, 20, 30]
    state.next_epoch()
    assert (state.epoch, state.window, state.loss_sum, state.seen, state.epoch_skipped) == (4, 0, 0.0, 0, 0)
    assert state.step == 14 and state.skipped == 1


@pytest.mark.parametrize(
    ("monitor", "values", "best", "stop_after"),
    [
        ("auroc", [0.6, 0.9, 0.8, 0.7, 0.95], [True, True, False, False], 4),
        ("loss", [0.7, 0.4, 0.5, 0.6, 0.1], [True, True, False, False], 4),
        ("auroc", [math.nan, 0.5, 0.5, 0.6, 0.4], [False, True, False, True, False], None),
    ],
)
def test_early_stopping_marks_the_best_epochs_and_stops_after_patience(
    monitor: str, values: list[float], best: list[bool], stop_after: int | None
) -> None:
    early = EarlyStopping(monitor, patience=2, epochs=5)
    marks = []
    for epoch, value in enumerate(values, 1):
        fit = fake_fit(row={"epoch": epoch}, monitored=value)
        early.on_epoch_end(fit)
        marks.append(fit.row["best"])
        if fit.state.stopped_early:
            assert epoch == stop_after and fit.notes == [
                f"early stop: no val {monitor} improvement for 2 epochs"
            ]
            break
    else:
        assert stop_after is None
    assert marks == best[: len(marks)]
    again = EarlyStopping(monitor, patience=2, epochs=5)
    again.load_state_dict(json.loads(json.dumps(early.state_dict())))
    assert (again.best, again.best_epoch, again.bad_epochs) == (
        early.best,
        early.best_epoch,
        early.bad_epochs,
    )


def test_early_stopping_never_stops_after_the_last_epoch() -> None:
    early = EarlyStopping("auroc", patience=1, epochs=2)
    for epoch, value in ((1, 0.9), (2, 0.1)):
        fit = fake_fit(row={"epoch": epoch}, monitored=value)
        early.on_epoch_end(fit)
    assert not fit.state.stopped_early


def test_improves_is_lower_for_loss_and_never_for_nan() -> None:
    assert improves("loss", 0.1, 0.2) and not improves("loss", 0.3, 0.2)
    assert improves("auroc", 0.3, 0.2) and not improves("auroc", math.nan, None)
    assert improves("f1", 0.0, None)


def test_best_weights_keeps_the_best_epoch_and_restores_it() -> None:
    model = nn.Linear(3, 2)
    best = BestWeights(OneProcess())  # type: ignore[arg-type]
    fit = fake_fit(parts=SimpleNamespace(probe=model), probe=model, failed=None)
    best.on_fit_start(fit)
    scores = Scores(np.array([0, 1]), np.array([0.2, 0.7]), 0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    fit.row, fit.val = {"best": True}, scores
    best.on_epoch_end(fit)
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(5.0)
    fit.row = {"best": False}
    best.on_epoch_end(fit)
    best.on_fit_end(fit)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in kept.items())
    assert best.val is scores

    state = best.state_dict()
    assert set(state) == {"best.weight", "best.bias", "bestval.probs", "bestval.labels"}
    again = BestWeights(OneProcess())  # type: ignore[arg-type]
    again.load_state_dict({**state, "best": 0.9})  # the checkpoint's other keys are ignored
    assert again.weights is not None and all(torch.equal(again.weights[k], kept[k]) for k in kept)
    assert again.val is not None and list(again.val.scores) == [0.2, 0.7] and math.isnan(again.val.loss)

    failed = fake_fit(parts=SimpleNamespace(probe=model), probe=model, failed=RuntimeError("x"))
    with torch.no_grad():
        model.weight.add_(1.0)
    again.on_fit_end(failed)  # after an error nothing is restored
    assert not torch.equal(model.weight, kept["weight"])


def test_metrics_file_appends_rows_and_logs_the_epoch(tmp_path: Path) -> None:
    metrics = MetricsFile(tmp_path)
    row = {
        "epoch": 1,
        "train_loss": 0.5,
        "train_accuracy": 0.75,
        "val_loss": 0.4,
        "val_auroc": 0.9,
        "skipped_steps": 0,
        "best": True,
        "val_nan": math.nan,
    }
    fit = fake_fit(row=row, notes=["early stop: x"])
    metrics.on_epoch_end(fit)
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line)["val_nan"] is None  # valid JSON: no NaN
    assert fit.logged == [
        "epoch 1: train loss 0.5000 acc 0.7500 | val loss 0.4000 auroc 0.90  *best*",
        "early stop: x",
    ]
    resumed = fake_fit(state=TrainState(history=[{"epoch": 1}, {"epoch": 2}]))
    metrics.on_fit_start(resumed)
    assert [json.loads(x)["epoch"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_callback_states_keep_built_in_keys_and_name_a_users_block() -> None:
    class Counter(Callback):
        pass

    class MyEarlyStopping(EarlyStopping):  # a subclass is the user's: its state is its own
        pass

    callbacks = [EarlyStopping("auroc", 1, 1), Counter(), Counter(), MyEarlyStopping("loss", 1, 1)]
    keys = state_keys(callbacks)
    assert [keys.get(id(cb)) for cb in callbacks] == [None, "Counter", "Counter#2", "MyEarlyStopping"]
    saved = Saved(
        Path("state/step-1"),
        {"best.w": torch.ones(1), "callback.Counter.t": torch.zeros(2)},
        {"best": 0.5, "epochs": [1, 0], "callbacks": {"Counter": {"count": 3}, "Counter#2": {"count": 4}}},
    )
    builtin = callback_states(saved, callbacks[0], None)
    assert builtin["best"] == 0.5 and "best.w" in builtin
    own = callback_states(saved, callbacks[1], "Counter")
    assert own["count"] == 3 and torch.equal(own["t"], torch.zeros(2)) and "best" not in own
    assert callback_states(saved, callbacks[2], "Counter#2") == {"count": 4}
    damaged = Saved(Path("state/step-1"), {}, {"callbacks": ["not", "a", "mapping"]})
    assert callback_states(damaged, callbacks[1], "Counter") == {}


def test_stop_on_signal_stops_after_the_checkpoint_and_a_second_ctrl_c_at_once() -> None:
    stop = StopOnSignal(None)
    fit = fake_fit(requested=0, last_window=False)
    stop.on_fit_start(fit)
    try:
        stop.handle(signal.SIGTERM, None)
        assert fit.signal == signal.SIGTERM
        with pytest.raises(TerminatedError, match="stopped by SIGTERM after step 0"):
            stop.on_epoch_end(fit)
        fit.signal = 0
        stop.handle(signal.SIGINT, None)
        with pytest.raises(KeyboardInterrupt):
            stop.handle(signal.SIGINT, None)
    finally:
        stop.on_fit_end(fit)
    assert signal.getsignal(signal.SIGINT) is not stop.handle


class Counter(Callback):
    """A user's callback with state: windows seen, and a tensor it keeps."""

    def __init__(self) -> None:
        self.windows = 0
        self.total = torch.zeros(1)
        self.loaded: dict[str, Any] = {}

    def on_window_end(self, fit: Any) -> None:
        self.windows += 1
        self.total += fit.window_loss

    def state_dict(self) -> dict[str, Any]:
        return {"windows": self.windows, "total": self.total.clone()}

    def load_state_dict(self, state: Any) -> None:
        self.loaded = dict(state)
        self.windows, self.total = state["windows"], state["total"].clone()


class Killed(BaseException):
    pass


class KillAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_window_end(self, fit: Any) -> None:
        if fit.state.step == self.step:
            raise Killed


def test_a_users_callback_state_survives_a_stop_and_a_resume(
    bert_dir: Path, toy_data: Any, tmp_path: Path, no_plots: list[Any]
) -> None:
    """96 rows, 12 micro-batches of 8 per epoch, 2 per step: 6 windows an epoch, 12 in all."""
    config = make_config(
        bert_dir, toy_data, "train.grad_accum=2", "train.checkpoint_every_steps=1", test=False
    )
    quiet = {"log": lambda _line: None, "progress": False}
    whole = Counter()
    train(config, out=tmp_path / "whole", callbacks=[whole], **quiet)
    assert whole.windows == 12

    first = Counter()
    with pytest.raises(Killed):
        train(config, out=tmp_path / "run", callbacks=[first, KillAt(8)], **quiet)
    resumed = Counter()
    train(config, out=tmp_path / "run", callbacks=[resumed], resume=True, **quiet)
    assert resumed.loaded["windows"] == 7  # the checkpoint of step 7: step 8 died before its own
    assert resumed.windows == whole.windows == 12
    torch.testing.assert_close(resumed.total, whole.total, rtol=0, atol=0)


def test_every_on_fit_end_runs_even_when_one_raises() -> None:
    """The signal handlers always come back, and the first error is handed to the caller (which
    lets the fit's own error win when there was one)."""
    from probekit.training.loop import _end_fit

    class Broken(Callback):
        def on_fit_end(self, fit: Any) -> None:
            raise RuntimeError("broken")

    stop = StopOnSignal(None)
    fit = fake_fit(callbacks=[Broken(), stop])
    before = signal.getsignal(signal.SIGTERM)
    stop.on_fit_start(fit)
    assert signal.getsignal(signal.SIGTERM) == stop.handle
    error = _end_fit(fit)
    assert isinstance(error, RuntimeError) and signal.getsignal(signal.SIGTERM) is before
