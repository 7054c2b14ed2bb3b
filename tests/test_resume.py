"""Training-state checkpoints and --resume: a run stopped anywhere ends bit-identical to one that
never stopped; damaged checkpoints are detected before use; signals stop after a checkpoint."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import probekit.training.plan
from probekit import state
from probekit.batching import Collator
from probekit.config import ProbeConfig
from probekit.errors import TerminatedError, UserError
from probekit.training import Callback, RunResult, train

from .engine_fixtures import (
    ToyData,
    bert_dir,
    leftovers,
    make_config,
    no_plots,
    run_cli,
    toy_data,
    wait_for_checkpoint,
)

__all__ = ["bert_dir", "no_plots", "toy_data"]

# 96 train rows, 8 per micro-batch, 2 per step: 12 micro-batches and 6 steps per epoch.
SETTINGS = ("train.epochs=3", "train.grad_accum=2", "train.checkpoint_every_steps=1", "train.patience=3")
MICRO_PER_EPOCH, EPOCHS = 12, 3


class Killed(BaseException):
    """Stands in for SIGKILL in-process: nothing after it runs (not even except Exception)."""


def config_for(bert_dir: Path, toy_data: ToyData, *extra: str) -> ProbeConfig:
    return make_config(bert_dir, toy_data, *SETTINGS, *extra, test=False)


CALLBACKS: list[Callback] = []
"""Callbacks every run of this module gets (the fp16 tests set one)."""


def run(config: ProbeConfig, out: Path, **kwargs: Any) -> RunResult:
    return train(config, out=out, log=lambda _l: None, progress=False, callbacks=CALLBACKS, **kwargs)


def outcome(run_dir: Path) -> tuple[dict[str, torch.Tensor], str]:
    return load_file(run_dir / "checkpoint" / "probe.safetensors"), (run_dir / "metrics.jsonl").read_text()


def assert_identical(a: Path, b: Path) -> None:
    (wa, ma), (wb, mb) = outcome(a), outcome(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    assert ma == mb


def stop_at_micro_batch(
    config: ProbeConfig, out: Path, monkeypatch: pytest.MonkeyPatch, k: int, n_train: int
) -> None:
    """Train ``config`` into ``out`` and kill it (`Killed`) as it is about to fetch its k-th
    training micro-batch (1-based, all epochs). Only this function's own patch is undone
    afterwards; the caller's stay."""
    fetched = [0]
    real = Collator.__call__

    def call(self: Collator, indices: Any) -> Any:
        if self.cache is not None and len(self.encoded) == n_train:
            fetched[0] += 1
            if fetched[0] == k:
                raise Killed
        return real(self, indices)

    with monkeypatch.context() as patch:
        patch.setattr(Collator, "__call__", call)
        with pytest.raises(Killed):
            run(config, out)


def killed_resumed_and_compared(
    config: ProbeConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, k: int, n_train: int
) -> tuple[Path, Path]:
    """Train ``config`` uninterrupted into ``tmp_path/reference``, and killed at micro-batch ``k``
    then resumed into ``tmp_path/run``; assert both bit-identical and return (run, reference)."""
    reference, out = tmp_path / "reference", tmp_path / "run"
    run(config, reference)
    stop_at_micro_batch(config, out, monkeypatch, k, n_train)
    run(config, out, resume=True)
    assert_identical(out, reference)
    return out, reference


@pytest.fixture(scope="module")
def reference(bert_dir: Path, toy_data: ToyData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    run(config_for(bert_dir, toy_data), out)
    return out


KILLS = {
    "first batch of step 2": 3,
    "mid-accumulation": 8,
    "right after an epoch boundary": MICRO_PER_EPOCH + 1,
    "mid-accumulation, last step of an epoch": 2 * MICRO_PER_EPOCH,
    "first batch of the last step": EPOCHS * MICRO_PER_EPOCH - 1,
    "mid-accumulation, the very last step": EPOCHS * MICRO_PER_EPOCH,
}
"""Kill points (the micro-batch about to be fetched, 1-based; 2 micro-batches per step)."""


@pytest.mark.parametrize("k", list(KILLS.values()), ids=list(KILLS))
def test_killed_at_any_micro_batch_and_resumed_is_bit_identical(
    k: int,
    reference: Path,
    bert_dir: Path,
    toy_data: ToyData,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_plots: list[Any],
) -> None:
    """Each kill point of `KILLS`: epoch boundaries, the last step and mid-accumulation."""
    config = config_for(bert_dir, toy_data)
    out = tmp_path / "run"
    stop_at_micro_batch(config, out, monkeypatch, k, len(toy_data.texts("train")))
    assert not out.exists() and len(leftovers(tmp_path)) == 1
    result = run(config, out, resume=True)
    assert result.epochs_run == EPOCHS
    assert leftovers(tmp_path) == []
    assert_identical(out, reference)


DAMAGES = {
    "a flipped bit in the tensors": (
        "tensors.safetensors",
        lambda b: b[: len(b) // 2] + bytes([b[len(b) // 2] ^ 0x10]) + b[len(b) // 2 + 1 :],
        "checksum",
    ),
    "truncated tensors": ("tensors.safetensors", lambda b: b[: len(b) - 100], "bytes"),
    "truncated state": ("state.json", lambda b: b[:-5], "bytes"),
    "a missing manifest": ("manifest.json", None, "no readable manifest"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_newest_checkpoint_is_detected_and_the_previous_one_used(
    damage: str,
    reference: Path,
    bert_dir: Path,
    toy_data: ToyData,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = config_for(bert_dir, toy_data)
    out = tmp_path / "run"
    stop_at_micro_batch(config, out, monkeypatch, 17, len(toy_data.texts("train")))
    (partial,) = leftovers(tmp_path)
    newest, previous = sorted((partial / "state").iterdir(), reverse=True)[:2]
    name, change, reason = DAMAGES[damage]
    if change is None:
        (newest / name).unlink()
    else:
        (newest / name).write_bytes(change((newest / name).read_bytes()))
    lines: list[str] = []
    train(config, out=out, log=lines.append, progress=False, resume=True)
    assert any(f"checkpoint {newest.name} is damaged" in line and reason in line for line in lines), lines
    assert any(line.startswith(f"resumed from checkpoint {previous.name}") for line in lines)
    assert_identical(out, reference)


CRASH_POINTS = (
    "before the tensors",
    "mid-way through the tensors",
    "before the rename",
    "before the pruning",
)


@pytest.mark.parametrize("where", CRASH_POINTS)
def test_a_crash_while_writing_a_checkpoint_loses_nothing(
    where: str,
    reference: Path,
    bert_dir: Path,
    toy_data: ToyData,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The 5th checkpoint write dies at a point of the write; resuming uses the 4th."""
    writes = [0]
    real_save, real_fsync, real_rmtree = state.save_tensors, state._fsync, state.shutil.rmtree

    def nth() -> bool:
        return writes[0] == 5

    def save_file(tensors: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        writes[0] += 1
        if nth() and where == "before the tensors":
            raise Killed
        real_save(tensors, path, *args, **kwargs)
        if nth() and where == "mid-way through the tensors":
            Path(path).write_bytes(Path(path).read_bytes()[: Path(path).stat().st_size // 2])
            raise Killed

    def fsync(path: Path) -> None:
        if nth() and where == "before the rename" and path.name == "manifest.json":
            raise Killed
        real_fsync(path)

    def rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
        if nth() and where == "before the pruning" and Path(path).name.startswith("step-"):
            raise Killed
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(state, "save_tensors", save_file)
    monkeypatch.setattr(state, "_fsync", fsync)
    monkeypatch.setattr(state.shutil, "rmtree", rmtree)
    config = config_for(bert_dir, toy_data)
    out = tmp_path / "run"
    with pytest.raises(Killed):
        run(config, out)
    monkeypatch.undo()
    run(config, out, resume=True)
    assert_identical(out, reference)


def test_resume_with_a_changed_spec_is_refused_with_the_diff(
    bert_dir: Path,
    toy_data: ToyData,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    stop_at_micro_batch(config_for(bert_dir, toy_data), out, monkeypatch, 9, len(toy_data.texts("train")))
    base = [
        "train",
        "--model",
        str(bert_dir),
        *(f"--set={a}" for a in (*toy_data.assignments(test=False), *SETTINGS)),
    ]
    base += [
        "--set=train.epochs=3",
        "--set=train.cpu=true",
        "--set=train.precision=fp32",
        "--set=model.max_length=16",
    ]
    code, _, err = run_cli(
        capsys, *base, "--set=train.epochs=4", "--set=head.dropout=0.3", "--resume", str(out)
    )
    assert code == 2
    assert "config differs from the stopped run's" in err
    assert "head.dropout: 0.2 -> 0.3" in err and "train.epochs: 3 -> 4" in err
    assert len(leftovers(tmp_path)) == 1  # the stopped run is untouched
    code, _, err = run_cli(capsys, *base, "--set=train.epochs=4", "--allow-spec-change", "--resume", str(out))
    assert code == 0, err
    assert len(json.loads("[" + ",".join((out / "metrics.jsonl").read_text().splitlines()) + "]")) == 4


def test_nothing_to_resume_is_a_clear_error(tmp_path: Path, bert_dir: Path, toy_data: ToyData) -> None:
    with pytest.raises(UserError, match="nothing to resume"):
        run(config_for(bert_dir, toy_data), tmp_path / "never-started", resume=True)


# -- real processes and real signals -----------------------------------------------------------------
def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "probekit", *args]


def _train_args(bert_dir: Path, toy_data: ToyData, out: Path, epochs: int) -> list[str]:
    sets = [
        *toy_data.assignments(test=False),
        *SETTINGS,
        f"train.epochs={epochs}",
        f"train.patience={epochs}",
    ]
    sets += ["train.cpu=true", "train.precision=fp32", "model.max_length=16"]
    return ["train", "--model", str(bert_dir), *(f"--set={s}" for s in sets), "--out", str(out)]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_a_real_process_stopped_by_a_signal_resumes_bit_identical(
    how: str, bert_dir: Path, toy_data: ToyData, tmp_path: Path
) -> None:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    epochs = 8
    reference = tmp_path / "ref" / "run"
    done = subprocess.run(
        cli(*_train_args(bert_dir, toy_data, reference, epochs)),
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]

    out = tmp_path / "stopped" / "run"
    out.parent.mkdir()
    process = subprocess.Popen(
        cli(*_train_args(bert_dir, toy_data, out, epochs)),
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    wait_for_checkpoint(process, out.parent, at_least=random.Random(how).randint(4, 14))
    process.send_signal(getattr(signal, how))
    _, err = process.communicate(timeout=120)
    expected = {"SIGKILL": -signal.SIGKILL, "SIGTERM": 143, "SIGINT": 130}[how]
    assert process.returncode == expected, err[-2000:]
    if how != "SIGKILL":
        assert f"stopped by {how} after step" in err and "Traceback" not in err
    # A killed process leaves its lock file too: the next run takes it over (the kernel freed it).
    assert not out.exists() and len(leftovers(out.parent)) == (2 if how == "SIGKILL" else 1)

    resumed = subprocess.run(
        cli(*_train_args(bert_dir, toy_data, out, epochs), "--resume", str(out)),
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from checkpoint step-" in resumed.stderr
    assert ("which is no longer running; taken" in resumed.stderr) == (how == "SIGKILL")
    assert leftovers(out.parent) == []
    assert_identical(out, reference)


# -- fp16: steps the grad scaler skips ---------------------------------------------------------
POISON_ROW = 5
"""The train row whose micro-batch gets non-finite gradients: one skipped step per epoch."""


@pytest.fixture
def fp16_scaler(monkeypatch: pytest.MonkeyPatch) -> None:
    """An fp16-style run on the CPU: the real loop with a real ``torch.amp.GradScaler`` (Accelerate
    creates one only on GPUs), and NaN gradients in every window holding `POISON_ROW` (decided by
    the data, so a resumed run poisons the same windows). Both come in through a callback, at the
    start of the fit, as a user's could."""
    rows: list[int] = []
    real_call = Collator.__call__

    def call(self: Collator, indices: Any) -> Any:
        if self.cache is not None:
            rows[:] = list(indices)
        return real_call(self, indices)

    class Fp16OnCpu(Callback):
        def on_fit_start(self, fit: Any) -> None:
            accelerator = fit.ctx.accelerator
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
            accelerator.scaler = scaler
            # What Accelerate's optimizer wrapper sets up when it is made with a scaler.
            from accelerate.optimizer import patch_optimizer_step  # type: ignore[import-untyped]

            wrapper = fit.optimizer
            wrapper.scaler, wrapper._accelerate_step_called = scaler, False
            wrapper._optimizer_original_step_method = wrapper.optimizer.step
            wrapper._optimizer_patched_step_method = patch_optimizer_step(wrapper, wrapper.optimizer.step)
            accelerator.unscale_gradients = lambda optimizer=None: [
                scaler.unscale_(o.optimizer) for o in accelerator._optimizers
            ]
            weight = next(fit.probe.head.parameters())
            weight.register_hook(lambda grad: grad * float("nan") if POISON_ROW in rows else grad)

    monkeypatch.setattr(Collator, "__call__", call)
    monkeypatch.setattr(sys.modules[__name__], "CALLBACKS", [Fp16OnCpu()])


def test_fp16_skipped_steps_are_counted_and_do_not_move_the_schedule(
    bert_dir: Path, toy_data: ToyData, tmp_path: Path, fp16_scaler: None, no_plots: list[Any]
) -> None:
    config = config_for(bert_dir, toy_data)
    result = run(config, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    windows_per_epoch = MICRO_PER_EPOCH // 2
    assert [r["skipped_steps"] for r in rows] == [1, 1, 1]
    # Skipped steps are not optimiser steps: the step count and the schedule stand still.
    assert [r["step"] for r in rows] == [(windows_per_epoch - 1) * e for e in (1, 2, 3)]
    total = windows_per_epoch * EPOCHS
    lam = config.scheduler.lr_lambda(total, windows_per_epoch)
    assert [r["lr_head"] for r in rows] == pytest.approx(
        [2e-4 * lam(r["step"]) for r in rows], rel=1e-9, abs=1e-15
    )
    report = json.loads((result.run_dir / "report.json").read_text())
    assert report["numerics"]["skipped_steps"] == 3
    # Halved once per skip, doubled after every 2 good steps.
    assert report["numerics"]["loss_scale"] not in (None, 2.0**10)
    for tensor in load_file(result.run_dir / "checkpoint" / "probe.safetensors").values():
        assert torch.isfinite(tensor).all()


def test_the_grad_scaler_is_resumed_with_the_run(
    bert_dir: Path,
    toy_data: ToyData,
    tmp_path: Path,
    fp16_scaler: None,
    monkeypatch: pytest.MonkeyPatch,
    no_plots: list[Any],
) -> None:
    """Killed after skipped steps and resumed: the same weights, metrics and final loss scale (a
    scaler restarted from its initial scale would end elsewhere)."""
    config = config_for(bert_dir, toy_data)
    out, reference = killed_resumed_and_compared(
        config, tmp_path, monkeypatch, MICRO_PER_EPOCH + 7, len(toy_data.texts("train"))
    )
    scale = [json.loads((d / "report.json").read_text())["numerics"]["loss_scale"] for d in (out, reference)]
    assert scale[0] == scale[1]


def test_resume_under_bf16_mixed_precision_is_bit_identical(
    bert_dir: Path,
    toy_data: ToyData,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_plots: list[Any],
) -> None:
    """Frozen modules held in bf16, trainable ones in fp32 under bf16 autocast (CUDA's default
    precision, run here on the CPU): a resumed run is still bit-identical."""
    config = config_for(bert_dir, toy_data, "train.precision=bf16")
    _, reference = killed_resumed_and_compared(
        config, tmp_path, monkeypatch, MICRO_PER_EPOCH + 5, len(toy_data.texts("train"))
    )
    assert json.loads((reference / "report.json").read_text())["numerics"]["precision"] == "bf16"


def test_resume_that_would_change_the_micro_batch_is_refused(
    bert_dir: Path,
    toy_data: ToyData,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_plots: list[Any],
) -> None:
    """Resumed with a process count that splits the effective batch into other micro-batches
    (here: as 4 processes would split 8 x 2 -> 4 x 1), the data order would differ: refused."""
    config = config_for(bert_dir, toy_data)
    out = tmp_path / "run"
    stop_at_micro_batch(config, out, monkeypatch, 9, len(toy_data.texts("train")))
    monkeypatch.setattr(probekit.training.plan, "resolve_batch", lambda batch, accum, processes: (4, 1))
    with pytest.raises(UserError, match=r"micro-batches of 8 per process; .* would be 4"):
        run(config, out, resume=True)
    assert len(leftovers(tmp_path)) == 1  # the stopped run is kept for a proper resume


# -- train.deterministic ------------------------------------------------------------------------
def test_deterministic_kernels_are_on_for_the_run_only_and_a_missing_one_is_named(
    bert_dir: Path, toy_data: ToyData, tmp_path: Path, no_plots: list[Any]
) -> None:
    """train.deterministic turns torch's deterministic mode on while the run lasts (the plan says
    so) and restores the process's setting after it, also when the run fails. An operation torch
    has no deterministic kernel for stops the run in one line that names it and says what to
    change; the run is kept for --resume. (On a GPU: tests/test_gpu.py.)"""

    class NoDeterministicKernel(Callback):
        """Raises torch's error at the second window (a checkpoint of the first exists)."""

        def on_window_end(self, fit: Any) -> None:
            assert torch.are_deterministic_algorithms_enabled()
            assert os.environ["CUBLAS_WORKSPACE_CONFIG"]
            if fit.state.step < 2:
                return
            raise RuntimeError(
                "scatter_add_cuda_kernel does not have a deterministic implementation, but you set "
                "'torch.use_deterministic_algorithms(True)'. You can turn off determinism just for "
                "this operation, or you can use the 'warn_only=True' option"
            )

    config = config_for(bert_dir, toy_data, "train.deterministic=true")
    lines: list[str] = []
    with pytest.raises(UserError) as raised:
        train(
            config,
            out=tmp_path / "run",
            log=lines.append,
            progress=False,
            callbacks=[NoDeterministicKernel()],
        )
    message = str(raised.value)
    assert message.startswith(
        "train.deterministic: scatter_add_cuda_kernel has no deterministic kernel on this device; "
        "set train.deterministic=false to train with it; the unfinished run and its last checkpoint "
        "are kept in "
    ), message
    assert "\n" not in message
    assert any(
        line.startswith("precision: fp32 -> fp32 on cpu; deterministic kernels only") for line in lines
    )
    assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert len(leftovers(tmp_path)) == 1


# -- train.resumable ----------------------------------------------------------------------------
def test_a_run_that_is_not_resumable_writes_no_checkpoint_and_trains_the_same(
    reference: Path,
    bert_dir: Path,
    toy_data: ToyData,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_plots: list[Any],
) -> None:
    """train.resumable=false: no checkpoint is ever written (a big trainable part's optimiser
    state would cost tens of GB a write), the plan says so, and the run ends with the weights
    and metrics of a resumable one (the checkpoints draw no random numbers)."""
    import probekit.training.callbacks

    writes: list[str] = []
    real_save = state.save_state
    monkeypatch.setattr(  # where StateCheckpoints calls it
        probekit.training.callbacks, "save_state", lambda *a, **k: writes.append(a[1]) or real_save(*a, **k)
    )
    lines: list[str] = []
    config = config_for(bert_dir, toy_data, "train.resumable=false")
    out = tmp_path / "run"
    train(config, out=out, log=lines.append, progress=False, callbacks=CALLBACKS)
    assert writes == []
    assert "checkpoints: none (train.resumable is false): a stopped run cannot be resumed" in lines
    (wa, ma), (wb, mb) = outcome(out), outcome(reference)
    assert all(torch.equal(wa[k], wb[k]) for k in wb) and wa.keys() == wb.keys()
    assert [json.loads(r)["val_auroc"] for r in ma.splitlines()] == [
        json.loads(r)["val_auroc"] for r in mb.splitlines()
    ]
    # A resumable run's plan gives the checkpoints' size: trainable weights + AdamW's 2 moments.
    planned = probekit.training.plan.prepare(config_for(bert_dir, toy_data))
    trainable = sum(p.numel() for p in planned.probe.parameters() if p.requires_grad)
    from probekit import memplan

    assert memplan.checkpoint_bytes(planned) == 12 * trainable
    assert (
        "checkpoints: every 1 optimiser steps and after each epoch, "
        f"{memplan.size(12 * trainable)} each (trainable weights and optimizer state), the newest 2 "
        "kept; train.resumable=false writes none"
    ) in planned.describe()


def test_a_run_that_is_not_resumable_stopped_by_sigterm_says_it_cannot_be_continued(
    bert_dir: Path, toy_data: ToyData, tmp_path: Path, no_plots: list[Any]
) -> None:
    class Sigterm(Callback):
        def on_window_end(self, fit: Any) -> None:
            if fit.state.step == 2:
                fit.signal = signal.SIGTERM

    config = config_for(bert_dir, toy_data, "train.resumable=false")
    with pytest.raises(TerminatedError) as raised:  # exit 143
        train(config, out=tmp_path / "run", log=lambda _l: None, progress=False, callbacks=[Sigterm()])
    assert str(raised.value).startswith(  # every process agrees on a stop at the next window end
        "stopped by SIGTERM after step 3; no checkpoint was written (train.resumable is false), so "
        "the run cannot be continued"
    ), str(raised.value)
    assert leftovers(tmp_path) == [] and not (tmp_path / "run").exists()
