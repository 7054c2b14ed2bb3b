"""Multi-process training: how the work is shared (properties, no processes), then real
2-process runs on the CPU (gloo) through ``torchrun``."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from probekit.batching import length_share
from probekit.config import compose_config
from probekit.distributed import resolve_batch, shard_windows, steps_per_epoch
from probekit.errors import UserError
from probekit.training import train

from .engine_fixtures import (
    ToyData,
    bert_dir,
    leftovers,
    run_cli,
    save_tiny_bert,
    toy_data,
    wait_for_checkpoint,
)

__all__ = ["bert_dir", "toy_data"]


@st.composite
def batch_orders(draw: st.DrawFn) -> list[list[int]]:
    """A global batch order: rows 0..n-1 shuffled, cut into batches of ``size`` (the last short)."""
    n = draw(st.integers(min_value=0, max_value=300))
    size = draw(st.integers(min_value=1, max_value=32))
    rows = draw(st.permutations(range(n)))
    return [list(rows[i : i + size]) for i in range(0, n, size)]


@given(
    batches=batch_orders(),
    accumulation=st.integers(min_value=1, max_value=8),
    processes=st.integers(min_value=1, max_value=6),
)
def test_every_row_is_used_once_and_every_process_runs_in_step(
    batches: list[list[int]], accumulation: int, processes: int
) -> None:
    shares = [shard_windows(batches, accumulation, processes, rank) for rank in range(processes)]
    used = Counter(row for share in shares for micro in share if micro.weight for row in micro.rows)
    assert used == Counter(row for batch in batches for row in batch)  # each row once, none missing
    windows = steps_per_epoch(len(batches), accumulation, processes)
    for share in shares:
        # The same number of micro-batches per window on every process, so gradient synchronisation
        # (the window's last micro-batch) happens together.
        assert [m.window for m in share] == [m.window for m in shares[0]]
        assert [m.last for m in share] == [m.last for m in shares[0]]
        assert sum(m.last for m in share) == windows
        assert all(m.weight in (0.0, 1.0) for m in share)
        assert all(m.rows for m in share)  # a stand-in still has rows to run
    for window in range(windows):
        members = [m for share in shares for m in share if m.window == window]
        examples = sum(len(m.rows) for m in members if m.weight)
        assert {m.window_examples for m in members} == {examples}
        # Each process backpropagates loss_sum x weight x processes / window_examples and DDP
        # averages over the processes: the window's examples weigh 1 / examples each.
        total = sum(len(m.rows) * m.weight * processes / m.window_examples for m in members) / processes
        assert total == pytest.approx(1.0)
        if window < windows - 1:
            assert len(members) == accumulation * processes


@given(
    batches=batch_orders(),
    accumulation=st.integers(min_value=1, max_value=8),
)
def test_one_process_keeps_the_plain_order_in_windows_of_the_accumulation(
    batches: list[list[int]], accumulation: int
) -> None:
    share = shard_windows(batches, accumulation, 1, 0)
    assert [list(m.rows) for m in share] == batches
    assert all(m.weight == 1.0 for m in share)
    assert [m.window for m in share] == [i // accumulation for i in range(len(batches))]


@given(
    batch=st.integers(min_value=1, max_value=64),
    accum=st.integers(min_value=1, max_value=16),
    processes=st.integers(min_value=1, max_value=16),
)
def test_the_effective_batch_is_what_the_spec_says_whatever_the_process_count(
    batch: int, accum: int, processes: int
) -> None:
    effective = batch * accum
    if effective % processes:
        with pytest.raises(UserError, match=f"over {processes} processes"):
            resolve_batch(batch, accum, processes)
        return
    per_device, accumulation = resolve_batch(batch, accum, processes)
    assert per_device * accumulation * processes == effective
    assert 1 <= per_device <= batch
    if accum % processes == 0:  # the accumulation absorbs the processes; the micro-batch stays
        assert (per_device, accumulation) == (batch, accum // processes)


@given(
    lengths=st.lists(st.integers(min_value=1, max_value=512), max_size=200),
    processes=st.integers(min_value=1, max_value=8),
)
def test_inference_shares_hold_every_row_once_and_balance_the_work(
    lengths: list[int], processes: int
) -> None:
    shares = [length_share(lengths, rank, processes) for rank in range(processes)]
    assert sorted(row for share in shares for row in share) == list(range(len(lengths)))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    tokens = [sum(lengths[i] for i in share) for share in shares]
    assert max(tokens) - min(tokens) <= max(lengths, default=0)  # dealt longest first


def test_resolve_batch_examples() -> None:
    assert resolve_batch(8, 4, 1) == (8, 4)
    assert resolve_batch(8, 4, 2) == (8, 2)
    assert resolve_batch(8, 4, 4) == (8, 1)
    assert resolve_batch(8, 4, 8) == (4, 1)
    with pytest.raises(UserError, match=r"8 x 4 = 32 .* 3 processes.*grad_accum=12"):
        resolve_batch(8, 4, 3)
    assert math.prod(resolve_batch(8, 12, 3)) * 3 == 96


# -- real processes: 2 on the CPU, gloo backend ------------------------------------------------
# Batches of 9 over 96 rows: 11 batches, windows of 2 x 2 -> 4, 4, 3. In the last window process 1
# has no batch of its own and runs a zero-weight stand-in.
SETTINGS = (
    "train.batch_size=9",
    "train.grad_accum=4",
    "train.cpu=true",
    "train.precision=fp32",
    "model.max_length=16",
    "head.dropout=0",
)


@pytest.fixture(scope="module")
def quiet_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT without dropout: one process and two draw different dropout masks, so only a
    dropout-free model can show they compute the same thing."""
    return save_tiny_bert(tmp_path_factory.mktemp("quiet-bert"), dropout=0.0)


def train_argv(model: Path, data: ToyData, out: Path, *extra: str, test: bool = True) -> list[str]:
    sets = [*data.assignments(test=test), *SETTINGS, *extra]
    return ["train", "--model", str(model), *(f"--set={s}" for s in sets), "--out", str(out)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(launcher: str, argv: list[str]) -> list[str]:
    """``probekit argv`` under ``torchrun`` or ``accelerate launch`` with 2 processes."""
    if launcher == "torchrun":
        head = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    else:
        head = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
        head += ["--main_process_port", str(free_port())]
    return [sys.executable, *head, "-m", "probekit", *argv]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def finish(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoint" / "probe.safetensors")


def rows(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(quiet_bert: Path, toy_data: ToyData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: one process, batches of 9, accumulation 4 (effective 36)."""
    out = tmp_path_factory.mktemp("one") / "run"
    config = compose_config(
        preset="safety8k",
        assignments=[f"model.name={quiet_bert}", *toy_data.assignments(), *SETTINGS, "train.epochs=3"],
    )
    train(config, out=out, log=lambda _l: None, progress=False)
    return out


def assert_same_as_one_process(run: Path, one_process: Path, toy_data: ToyData) -> dict[str, Any]:
    """A 2-process run matches the 1-process reference; returns its report."""
    # The same weights within float tolerance (the sums run in another order).
    one, two = weights(one_process), weights(run)
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-6, msg=name)
    # Metrics are over every process's examples: the same as one process's.
    for a, b in zip(rows(run), rows(one_process), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
    report: dict[str, Any] = json.loads((run / "report.json").read_text())
    # Evaluation saw every example exactly once.
    assert report["metrics"]["val"]["n"] == len(toy_data.texts("val"))
    assert report["metrics"]["test"]["n"] == len(toy_data.texts("test"))
    # The activation cache was built in shares: every row through the frozen blocks once.
    for split, counts in report["activation_cache"]["rows_computed_per_process"].items():
        assert len(counts) == 2 and all(counts) and sum(counts) == len(toy_data.texts(split))
    # Only the main process wrote, and only the run folder.
    assert sorted(p.name for p in run.parent.iterdir()) == ["run"]
    return report


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_reach_the_weights_of_one_process_with_the_same_effective_batch(
    launcher: str, one_process: Path, quiet_bert: Path, toy_data: ToyData, tmp_path: Path
) -> None:
    done = finish(
        launch(launcher, train_argv(quiet_bert, toy_data, tmp_path / "run", "train.epochs=3")), tmp_path
    )
    # The spec's effective batch, resolved over the processes and printed.
    assert "batch: 9 per micro-step x 2 accumulation x 2 process(es) = 36 effective" in done.stderr
    report = assert_same_as_one_process(tmp_path / "run", one_process, toy_data)
    assert report["distributed"] == {
        "processes": 2,
        "strategy": "ddp",
        "parameters_per_process": None,
        "per_device_batch": 9,
        "accumulation": 2,
        "effective_batch": 36,
    }


@pytest.mark.slow
def test_fsdp_shards_the_model_and_reaches_the_weights_of_one_process(
    one_process: Path, quiet_bert: Path, toy_data: ToyData, tmp_path: Path
) -> None:
    """The same spec with train.distributed.strategy=fsdp: each process holds about half of the
    parameters, and training, evaluation, the activation cache and the written probe are those of
    one process."""
    argv = train_argv(
        quiet_bert, toy_data, tmp_path / "run", "train.epochs=3", "train.distributed.strategy=fsdp"
    )
    done = finish(launch("torchrun", argv), tmp_path)
    report = assert_same_as_one_process(tmp_path / "run", one_process, toy_data)
    assert report["distributed"]["strategy"] == "fsdp"
    found = re.search(
        r"fsdp: ([\d,]+) parameters sharded over 2 processes: ([\d,]+) \+ ([\d,]+)", done.stderr
    )
    assert found is not None, done.stderr[-2000:]
    total, *held = (int(g.replace(",", "")) for g in found.groups())
    # Every parameter (frozen blocks included) is held by exactly one process, about half each.
    assert report["distributed"]["parameters_per_process"] == held and sum(held) == total
    assert all(0.4 < share / total < 0.6 for share in held)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_two_process_run_stopped_by_sigterm_resumes_bit_identical(
    strategy: str, quiet_bert: Path, toy_data: ToyData, tmp_path: Path
) -> None:
    """Under fsdp the checkpoint holds the gathered weights and optimiser state; resuming
    shards them again."""
    extra = (
        "train.epochs=30",
        "train.patience=30",
        "train.checkpoint_every_steps=1",
        f"train.distributed.strategy={strategy}",
    )
    reference = tmp_path / "reference"
    finish(launch("torchrun", train_argv(quiet_bert, toy_data, reference, *extra, test=False)), tmp_path)

    out = tmp_path / "run"
    argv = launch("torchrun", train_argv(quiet_bert, toy_data, out, *extra, test=False))
    process = subprocess.Popen(argv, cwd=tmp_path, env=ENV, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(process, tmp_path, at_least=7)
    process.send_signal(signal.SIGTERM)  # torchrun passes it to both processes
    _, err = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "probekit: error: [rank 0] stopped by SIGTERM after step" in err
    assert "probekit: error: [rank 1] stopped by SIGTERM" in err
    assert not out.exists()

    finish(
        launch(
            "torchrun", [*train_argv(quiet_bert, toy_data, out, *extra, test=False), "--resume", str(out)]
        ),
        tmp_path,
    )
    first, second = weights(out), weights(reference)
    assert all(torch.equal(first[k], second[k]) for k in second)
    assert (out / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    assert leftovers(tmp_path) == []


def rank_pid(parent: int, rank: int) -> int:
    """The pid of the training process of ``rank`` that ``parent`` (torchrun) started (Linux)."""
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            env = environ.read_bytes().split(b"\0")
            ppid = int((environ.parent / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(environ.parent.name)
    raise AssertionError(f"no process of rank {rank} under {parent}")


LONG = ("train.epochs=300", "train.patience=300", "train.checkpoint_every_steps=1")
"""Long enough to be stopped mid-run; the tests never let it finish."""


@pytest.mark.slow
def test_a_killed_process_ends_the_job_with_a_clear_error_and_the_run_resumes(
    quiet_bert: Path, toy_data: ToyData, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    argv = launch("torchrun", train_argv(quiet_bert, toy_data, out, *LONG, test=False))
    process = subprocess.Popen(argv, cwd=tmp_path, env=ENV, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(process, tmp_path, at_least=3)
    os.kill(rank_pid(process.pid, 1), signal.SIGKILL)
    began = time.monotonic()
    _, err = process.communicate(timeout=120)
    assert process.returncode != 0
    assert time.monotonic() - began < 60  # no hang
    (line,) = [ln for ln in err.splitlines() if ln.startswith("probekit: error: [rank 0]")]
    assert "lost contact with another training process" in line and "--resume" in line
    # The checkpoints survive the crash: the run continues (here shortened to 2 epochs).
    resume = [
        *train_argv(quiet_bert, toy_data, out, *LONG, "train.epochs=2", test=False),
        "--resume",
        str(out),
    ]
    finish(launch("torchrun", [*resume, "--allow-spec-change"]), tmp_path)
    assert (out / "checkpoint").is_dir() and len(rows(out)) == 2
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_a_stuck_process_fails_the_run_after_the_collective_timeout(
    quiet_bert: Path, toy_data: ToyData, tmp_path: Path
) -> None:
    """Two processes started by hand (the environment torchrun would set); process 1 is frozen
    with SIGSTOP. Process 0 gives up after train.distributed.timeout_s instead of waiting forever."""
    timeout = 10
    argv = train_argv(quiet_bert, toy_data, tmp_path / "run", *LONG, f"train.distributed.timeout_s={timeout}")
    port = str(free_port())
    processes = []
    for rank in (0, 1):
        env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2"}
        env.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"})
        command = [sys.executable, "-m", "probekit", *argv]
        processes.append(subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True))
    try:
        wait_for_checkpoint(processes[0], tmp_path, at_least=3)
        processes[1].send_signal(signal.SIGSTOP)
        began = time.monotonic()
        _, err = processes[0].communicate(timeout=timeout + 60)
        waited = time.monotonic() - began
    finally:
        processes[1].kill()
        processes[1].communicate()
    assert processes[0].returncode == 1, err
    assert waited < timeout + 30
    (line,) = [ln for ln in err.splitlines() if ln.startswith("probekit: error:")]
    assert line.startswith("probekit: error: [rank 0] lost contact with another training process")
    assert "Traceback" not in err


def test_dry_run_prints_the_batch_resolved_for_a_process_count(
    bert_dir: Path, toy_data: ToyData, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["train", "--dry-run", "--model", str(bert_dir), *(f"--set={a}" for a in toy_data.assignments())]
    code, out, _ = run_cli(capsys, *base, "--processes", "2")
    assert code == 0
    assert "batch: 8 per micro-step x 2 accumulation x 2 process(es) = 32 effective" in out
    code, out, _ = run_cli(capsys, *base, "--processes", "8")
    assert "batch: 4 per micro-step x 1 accumulation x 8 process(es) = 32 effective" in out
    code, _, err = run_cli(capsys, *base, "--processes", "3")
    assert code == 2 and "cannot be split evenly over 3 processes" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, *base[:1], *base[2:], "--processes", "2")
    assert code == 2 and "--processes only plans" in err


@pytest.mark.slow
def test_two_processes_share_a_kept_cache_and_memory_mapped_storage(
    one_process: Path, quiet_bert: Path, toy_data: ToyData, tmp_path: Path
) -> None:
    """Stored in ``train.cache.dir`` (written by rank 0 only) and memory-mapped (a tiny memory
    limit): the first 2-process run builds the cache in shares, the second reuses it without
    computing a row; both match the 1-process run."""
    cache = tmp_path / "cache"
    extra = ("train.epochs=3", f"train.cache.dir={cache}", "train.cache.max_memory_gb=0.000001")
    for attempt, builds in (("first", True), ("second", False)):
        out = tmp_path / attempt
        finish(launch("torchrun", train_argv(quiet_bert, toy_data, out, *extra)), tmp_path)
        report = json.loads((out / "report.json").read_text())
        computed = report["activation_cache"]["rows_computed_per_process"]
        rows_in = {"train": len(toy_data.texts("train")), "val": len(toy_data.texts("val"))}
        assert {split: sum(computed[split]) for split in rows_in} == {
            split: n if builds else 0 for split, n in rows_in.items()
        }
        one, two = weights(one_process), weights(out)
        for name in one:
            torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-6, msg=name)
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["train", "val"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "first", "second"]


@pytest.mark.slow
def test_fsdp_trains_a_scalar_mix_pooler_like_one_process(
    quiet_bert: Path, toy_data: ToyData, tmp_path: Path
) -> None:
    """A pooler with parameters of its own (scalar_mix's mixing weights and scale) is sharded and
    trained like the head: 2 fsdp processes against 1."""
    extra = ("train.epochs=2", "pooler.combine=scalar_mix")
    reference = tmp_path / "one"
    config = compose_config(
        preset="safety8k",
        assignments=[f"model.name={quiet_bert}", *toy_data.assignments(), *SETTINGS, *extra],
    )
    train(config, out=reference, log=lambda _l: None, progress=False)
    argv = train_argv(quiet_bert, toy_data, tmp_path / "run", *extra, "train.distributed.strategy=fsdp")
    finish(launch("torchrun", argv), tmp_path)
    one, two = weights(reference), weights(tmp_path / "run")
    assert {"pooler.mix_logits", "pooler.mix_scale"} <= one.keys() and one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-6, msg=name)


def test_accelerates_own_sharding_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A launch set up for Accelerate's FSDP or DeepSpeed would wrap the probe behind probekit's
    back: refused with a one-line error that says what to do."""
    import accelerate
    from accelerate.utils import DistributedType

    from probekit.distributed import DistributedSpec, make_accelerator

    class Launched:
        def __init__(self, **_kwargs: Any) -> None:
            self.distributed_type = DistributedType.DEEPSPEED

    monkeypatch.setattr(accelerate, "Accelerator", Launched)
    spec = compose_config(preset="safety8k").train
    assert isinstance(spec.distributed, DistributedSpec)
    with pytest.raises(UserError, match=r"set up for DEEPSPEED.*--multi_gpu.*strategy=fsdp"):
        make_accelerator("no", spec)
