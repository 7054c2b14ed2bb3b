"""Per-step scalars: ``steps.jsonl`` in every run folder, and the ``train.report_to`` trackers
(through Accelerate) read back from their files, offline."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from probekit.errors import ConfigError, UserError
from probekit.training import RunResult
from probekit.training import trackers as trackers_module

from .engine_fixtures import (
    ToyData,
    bert_dir,
    leftovers,
    make_config,
    no_plots,
    quiet_train,
    read_jsonl,
    run_cli,
    toy_data,
)
from .test_resume import config_for, run, stop_at_micro_batch

__all__ = ["bert_dir", "no_plots", "toy_data"]


def check_steps(out: Path, result: RunResult, *, clipped: bool) -> list[dict[str, Any]]:
    """``steps.jsonl`` holds one row per optimiser step, its lr agreeing with the epoch rows."""
    rows = read_jsonl(out / "steps.jsonl")
    total = result.history[-1]["step"]
    assert [r["step"] for r in rows] == list(range(1, total + 1))
    by_step = {r["step"]: r for r in rows}
    for epoch in result.history:
        at_end = by_step[epoch["step"]]
        assert at_end["epoch"] == epoch["epoch"]
        assert next(iter(at_end["lr"].values())) == epoch["lr_head"]  # the first group is head/decay
    for row in rows:
        assert set(row["lr"]) >= {"head/decay", "head/no_decay"}
        assert math.isfinite(row["loss"]) and row["loss"] > 0
        assert ("grad_norm" in row) == clipped
        if clipped:
            assert row["grad_norm"] > 0
    return rows


def test_steps_file_and_tensorboard_events(
    bert_dir: Path, toy_data: ToyData, tmp_path: Path, no_plots: Any
) -> None:
    pytest.importorskip("tensorboard", reason="the tensorboard tracker needs the tensorboard package")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = make_config(bert_dir, toy_data, "train.report_to=tensorboard", "train.max_grad_norm=1.0")
    out = tmp_path / "run"
    result = quiet_train(config, out)
    rows = check_steps(out, result, clipped=True)

    events = EventAccumulator(str(out / "trackers" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/grad_norm", "lr/head/decay", "train/accuracy", "val/auroc"} <= tags
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [r["step"] for r in rows]
    assert [e.value for e in losses] == pytest.approx([r["loss"] for r in rows], rel=1e-5)
    val = events.Scalars("val/auroc")
    assert [(e.step, e.value) for e in val] == [
        (h["step"], pytest.approx(h["val_auroc"], rel=1e-5)) for h in result.history
    ]


def test_no_clipping_no_grad_norm(bert_dir: Path, toy_data: ToyData, tmp_path: Path, no_plots: Any) -> None:
    config = make_config(bert_dir, toy_data, "train.max_grad_norm=null", "train.epochs=1")
    result = quiet_train(config, tmp_path / "run")
    check_steps(tmp_path / "run", result, clipped=False)
    assert not (tmp_path / "run" / "trackers").exists()


def test_a_resumed_run_keeps_steps_up_to_its_checkpoint(
    bert_dir: Path, toy_data: ToyData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_plots: Any
) -> None:
    # 6 steps per epoch, a checkpoint every 4 steps and after each epoch: killed as step 8 starts
    # (micro-batch 15), the newest checkpoint is the end of epoch 1 (step 6), step 7 is lost.
    config = config_for(bert_dir, toy_data, "train.checkpoint_every_steps=4")
    reference, out = tmp_path / "reference", tmp_path / "run"
    run(config, reference)
    stop_at_micro_batch(config, out, monkeypatch, 15, len(toy_data.texts("train")))
    (partial,) = (p for p in leftovers(tmp_path) if ".partial-" in p.name)
    assert [r["step"] for r in read_jsonl(partial / "steps.jsonl")] == list(range(1, 8))
    result = run(config, out, resume=True)
    check_steps(out, result, clipped=True)
    assert (out / "steps.jsonl").read_text() == (reference / "steps.jsonl").read_text()


def test_mlflow_file_store(bert_dir: Path, toy_data: ToyData, tmp_path: Path, no_plots: Any) -> None:
    mlflow = pytest.importorskip("mlflow", reason="the mlflow tracker needs mlflow or mlflow-skinny")
    config = make_config(bert_dir, toy_data, "train.report_to=mlflow", "train.epochs=1")
    out = tmp_path / "run"
    result = quiet_train(config, out)
    rows = read_jsonl(out / "steps.jsonl")
    client = mlflow.tracking.MlflowClient(tracking_uri=(out / "trackers" / "mlruns").as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "probekit"]
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == "run" and found.info.status == "FINISHED"
    assert found.data.params["train.epochs"] == "1"
    history = client.get_metric_history(found.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(r["step"], pytest.approx(r["loss"])) for r in rows]
    assert found.data.metrics["val/auroc"] == pytest.approx(result.history[-1]["val_auroc"])


def test_wandb_offline(
    bert_dir: Path, toy_data: ToyData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_plots: Any
) -> None:
    pytest.importorskip("wandb", reason="the wandb tracker needs the wandb package (not installed)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):  # nothing in the home folder
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    config = make_config(bert_dir, toy_data, "train.report_to=wandb", "train.epochs=1")
    quiet_train(config, tmp_path / "run")
    assert list((tmp_path / "run" / "trackers" / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('["tensorbord"]', "unknown tracker 'tensorbord'.*did you mean 'tensorboard'"),
        ('["mlflow", "mlflow"]', "mlflow named more than once"),
        ("tensorboard,swanlab", "unknown tracker 'swanlab'"),
        ("3", "expected a list of tracker names"),
    ],
)
def test_report_to_is_checked(bert_dir: Path, toy_data: ToyData, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        make_config(bert_dir, toy_data, f"train.report_to={value}")
    assert "\n" not in str(caught.value)


def test_a_missing_tracker_package_is_one_line_before_training(
    bert_dir: Path,
    toy_data: ToyData,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(trackers_module.PACKAGES, "dvclive", (("no_such_module_here",), "dvclive"))
    with pytest.raises(UserError, match="dvclive needs the no_such_module_here package"):
        quiet_train(make_config(bert_dir, toy_data, "train.report_to=dvclive"), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    args = ["train", "--model", bert_dir, "--data", toy_data.folder, "--set", "train.cpu=true"]
    code, _out, err = run_cli(capsys, *args, "--set", "train.report_to=dvclive", "--dry-run")
    assert code == 2
    assert err.strip().count("\n") == 0 and "pip install dvclive" in err


def test_dry_run_names_the_trackers(
    bert_dir: Path,
    toy_data: ToyData,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("tensorboard", reason="the tensorboard tracker needs the tensorboard package")
    monkeypatch.chdir(tmp_path)
    args = ["train", "--model", bert_dir, "--data", toy_data.folder, "--set", "train.cpu=true"]
    code, out, err = run_cli(capsys, *args, "--set", "train.report_to=tensorboard", "--dry-run")
    assert code == 0, err
    assert "per-step scalars: steps.jsonl; trackers: tensorboard" in out.splitlines()
