"""Run folders cannot be turned against the user's files: what ``--out`` may be, the lock that
gives one process a run folder, what survives a full disk or a signal, and the data check of
``--resume`` (issue #13: data loss, messages)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import probekit.hub
import probekit.training.plan
from probekit.errors import InterruptedRunError, TerminatedError
from probekit.rundir import RunLock
from probekit.training import Callback, train

from .engine_fixtures import (
    FAST,
    bert_dir,
    leftovers,
    names,
    no_plots,
    run_cli,
    toy_data,
    wait_for_checkpoint,
    write_toy_data,
)
from .test_bad_input import check_refusal

__all__ = ["bert_dir", "no_plots", "toy_data"]


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> sha256), to show inputs stay untouched."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def train_args(model: Path, data: Path, *extra: Any) -> list[str]:
    """A real, fast ``probekit train`` on ``model`` and the data folder ``data``."""
    return [
        "train",
        "--model",
        str(model),
        "--data",
        str(data),
        *(f"--set={a}" for a in FAST),
        "--set=train.epochs=1",
        *map(str, extra),
    ]


@pytest.fixture
def inputs(tmp_path: Path, bert_dir: Path) -> tuple[Path, Path]:
    """A data folder and a copy of the tiny BERT, both the user's own, inside ``tmp_path/work``."""
    import shutil

    work = tmp_path / "work"
    data = write_toy_data(work / "data", train=32, val=16, test=16).folder
    model = work / "model"
    shutil.copytree(bert_dir, model)
    return data, model


OUT_CASES = {
    "the data folder": ("data", "is the data folder"),
    "inside the data folder": ("data/run", "lies inside the data folder"),
    "the model folder": ("model", "is the model folder"),
    "inside the model folder": ("model/runs/x", "lies inside the model folder"),
    "a folder holding the data": (".", "holds"),
    "the working folder": ("{cwd}", "is the working folder"),
    "the root": ("/", "root of the file system"),
}


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("case", list(OUT_CASES))
def test_an_out_that_would_touch_the_inputs_is_refused_before_anything_happens(
    case: str,
    overwrite: bool,
    inputs: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data, model = inputs
    work = data.parent
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    target, expected = OUT_CASES[case]
    out = target.replace("{cwd}", str(cwd)) if target.startswith(("/", "{")) else str(work / target)
    before = tree(tmp_path)
    argv = train_args(model, data, "--out", out, *(["--overwrite"] if overwrite else []))
    code, out_text, err = run_cli(capsys, *argv)
    check_refusal(code, out_text, err, ("--out", expected))
    assert tree(tmp_path) == before
    assert sorted(p.name for p in work.iterdir()) == ["data", "model"]
    assert names(cwd) == []


def test_the_config_file_is_an_input_too(
    inputs: tuple[Path, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data, model = inputs
    config = tmp_path / "cfg" / "c.yaml"
    config.parent.mkdir()
    config.write_text("train:\n  epochs: 1\n")
    code, out, err = run_cli(capsys, *train_args(model, data, "--config", config, "--out", config.parent))
    check_refusal(code, out, err, ("--out", "config file"))
    assert config.read_text() == "train:\n  epochs: 1\n"


def test_overwrite_replaces_only_an_earlier_run(
    inputs: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_plots: list[Any],
) -> None:
    data, model = inputs
    mine = tmp_path / "documents"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    code, out, err = run_cli(capsys, *train_args(model, data, "--out", mine, "--overwrite"))
    check_refusal(code, out, err, ("--overwrite replaces only an earlier probekit run", "thesis.tex"))
    assert names(mine) == ["thesis.tex"]

    run = tmp_path / "run"
    for attempt in range(2):  # the second replaces the first
        code, _, err = run_cli(capsys, *train_args(model, data, "--out", run, "--overwrite"))
        assert code == 0, (attempt, err)
    assert (run / "report.json").is_file() and leftovers(tmp_path) == []


def test_overwrite_of_a_symlinked_out_replaces_the_link_and_keeps_its_target(
    inputs: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_plots: list[Any],
) -> None:
    data, model = inputs
    first = tmp_path / "first"
    code, _, err = run_cli(capsys, *train_args(model, data, "--out", first))
    assert code == 0, err
    before = tree(first)
    link = tmp_path / "latest"
    link.symlink_to(first)
    code, _, err = run_cli(capsys, *train_args(model, data, "--out", link, "--overwrite"))
    assert code == 0, err
    assert not link.is_symlink() and (link / "report.json").is_file()
    assert tree(first) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first", "latest", "work"]


BAD_OUTS = {
    "a file": ("file", "exists and is a file"),
    "below a file": ("file/run", "is a file, not a folder"),
    "a name too long for the file system": ("x" * 250, "too long"),
    "empty": ("", "empty path"),
}


@pytest.mark.parametrize("case", list(BAD_OUTS))
def test_an_out_that_cannot_be_written_is_one_line(
    case: str, inputs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, model = inputs
    (tmp_path / "file").write_text("mine")
    name, expected = BAD_OUTS[case]
    out = str(tmp_path / name) if name else ""
    before = tree(tmp_path)
    code, stdout, err = run_cli(capsys, *train_args(model, data, "--out", out, "--overwrite"))
    check_refusal(code, stdout, err, (expected,))
    assert tree(tmp_path) == before


def test_a_failed_run_removes_the_parent_folders_it_created(
    inputs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The data fails to load after the folder was claimed: nothing of the run stays."""
    _, model = inputs
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    (bad / "val.jsonl").write_text('{"text": "c", "label": 0}\n{"text": "d", "label": 7}\n')
    out = tmp_path / "new" / "deep" / "run"
    code, stdout, err = run_cli(capsys, *train_args(model, bad, "--out", out))
    check_refusal(code, stdout, err, ("val.jsonl:2",))
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("option", ["--model", "--data", "--config", "--resume"])
def test_empty_path_options_are_refused(
    option: str, inputs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--data ''`` trained on the demo data and ``--model ''`` loaded MiniLM."""
    data, model = inputs
    given = {"--model": str(model), "--data": str(data)}
    argv = ["train", "--out", str(tmp_path / "o"), *(f"--set={a}" for a in FAST)]
    for name, value in given.items():
        argv += [name, "" if name == option else value]
    if option not in given:
        argv += [option, ""]
    code, stdout, err = run_cli(capsys, *argv)
    check_refusal(code, stdout, err, (option, "empty"))
    assert names(tmp_path) == ["work"]


# -- one process per run folder ----------------------------------------------------------------
def test_a_locked_run_folder_is_refused_naming_the_holder(
    inputs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, model = inputs
    out = tmp_path / "run"
    held = RunLock(out)
    held.acquire(print)
    try:
        for extra in ([], ["--resume", out]):
            code, stdout, err = run_cli(capsys, *train_args(model, data, "--out", out, *extra))
            check_refusal(code, stdout, err, (f"process {os.getpid()} is already writing this run folder",))
    finally:
        held.release()
    assert names(tmp_path) == ["work"]


def test_a_stale_lock_of_a_dead_process_is_taken_over(
    inputs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], no_plots: list[Any]
) -> None:
    data, model = inputs
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    (tmp_path / ".run.lock").write_text(f"{dead.pid}\n")
    code, _, err = run_cli(capsys, *train_args(model, data, "--out", out))
    assert code == 0, err
    assert f"left by process {dead.pid}, which is no longer running" in err
    assert names(tmp_path) == ["run", "work"]


def _cli(*args: Any) -> list[str]:
    return [sys.executable, "-m", "probekit", *map(str, args)]


@pytest.mark.slow
def test_two_real_processes_on_one_run_folder(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    """While a run trains, a second ``train`` on its folder, a concurrent ``--resume`` of it and an
    ``--overwrite`` are refused naming its pid; the first run is untouched (stopped here by
    SIGTERM: its history has one row per epoch, none twice)."""
    data, model = inputs
    out = tmp_path / "run"
    args = train_args(model, data, "--out", out, "--set=train.epochs=100000", "--set=train.patience=100000")
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    first = subprocess.Popen(
        _cli(*args), env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    try:
        wait_for_checkpoint(first, tmp_path, at_least=1)
        for extra in ([], ["--resume", str(out)], ["--overwrite"]):
            second = subprocess.run(_cli(*args, *extra), env=env, capture_output=True, text=True, check=False)
            assert second.returncode == 2, second.stderr[-2000:]
            assert f"process {first.pid} is already writing this run folder" in second.stderr
            assert "Traceback" not in second.stderr
        assert first.poll() is None, "the first run ended before the others were refused"
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 143, err[-2000:]
    (partial,) = leftovers(tmp_path)
    epochs = [json.loads(line)["epoch"] for line in (partial / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, len(epochs) + 1))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([partial.name, "work"])


# -- what survives -----------------------------------------------------------------------------
def test_a_full_disk_while_writing_a_checkpoint_keeps_the_last_one_and_says_so(
    inputs: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    no_plots: list[Any],
) -> None:
    """The third checkpoint write fails the way safetensors reports a full disk (its own error
    type, not OSError): one line saying what survives, then ``--resume`` finishes the run."""
    import safetensors.torch
    from safetensors import SafetensorError

    data, model = inputs
    out = tmp_path / "run"
    real_save, calls = safetensors.torch.save_file, [0]

    def full(tensors: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 3:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    extra = ("--set=train.epochs=2", "--set=train.checkpoint_every_steps=1", "--set=train.grad_accum=1")
    code, stdout, err = run_cli(capsys, *train_args(model, data, "--out", out, *extra))
    line = check_refusal(code, stdout, err, ("No space left on device", "last checkpoint are kept in"))
    assert "tensors.safetensors: cannot write" in line and "continue with --resume" in line
    (partial,) = leftovers(tmp_path)
    assert len([p for p in (partial / "state").iterdir() if p.name.startswith("step-")]) == 2
    assert not [p for p in (partial / "state").iterdir() if ".tmp-" in p.name]
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    code, _, err = run_cli(capsys, *train_args(model, data, "--out", out, *extra, "--resume", out))
    assert code == 0, err
    assert "resumed from checkpoint step-00000002" in err and leftovers(tmp_path) == []


@pytest.mark.slow
def test_a_real_write_failure_is_one_line_and_leaves_nothing(
    inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    """A real process whose file writes fail past 64 KiB (``RLIMIT_FSIZE``, as on a full disk):
    the first checkpoint cannot be written, and the run ends with one line, exit 2."""
    import resource

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))

    data, model = inputs
    args = train_args(model, data, "--out", tmp_path / "run", "--set=train.checkpoint_every_steps=1")
    done = subprocess.run(_cli(*args), capture_output=True, text=True, preexec_fn=limit, check=False)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("probekit: error:")]
    assert "File too large" in line and "no run folder was written" in line
    assert names(tmp_path) == ["work"]


def test_ctrl_c_before_training_says_so_and_leaves_nothing(
    inputs: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data, model = inputs

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(probekit.hub, "load_backbone", interrupted)
    code, stdout, err = run_cli(capsys, *train_args(model, data, "--out", tmp_path / "run"))
    assert code == 130 and "Traceback" not in stdout + err
    assert err.strip() == "probekit: error: interrupted by Ctrl-C; no run folder was written"
    assert names(tmp_path) == ["work"]


class SignalAt(Callback):
    """Sends ``signals`` to this process at the end of optimiser step ``step`` (as a user pressing
    Ctrl-C, or a scheduler sending SIGTERM, would at that moment)."""

    def __init__(self, step: int, *signals: signal.Signals) -> None:
        self.step, self.signals = step, signals

    def on_window_end(self, fit: Any) -> None:
        if fit.state.step == self.step:
            for signum in self.signals:
                os.kill(os.getpid(), signum)
            time.sleep(0.2)  # let the handlers run here


def api_train(model: Path, data: Path, out: Path, *extra: str, callbacks: tuple[Callback, ...] = ()) -> Any:
    """`train` on the same settings as `train_args`, from Python (so a callback can be passed)."""
    from probekit.config import compose_config

    config = compose_config(
        preset="safety8k",
        model=str(model),
        data=str(data),
        assignments=[*FAST, "train.epochs=1", *(a.removeprefix("--set=") for a in extra)],
    )
    return train(config, out=out, log=lambda _line: None, progress=False, callbacks=callbacks)


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(
    inputs: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data, model = inputs
    extra = ("--set=train.checkpoint_every_steps=1", "--set=train.grad_accum=1")
    second = SignalAt(3, signal.SIGINT, signal.SIGINT)  # the second one stops the run at once
    with pytest.raises(InterruptedRunError) as caught:
        api_train(model, data, tmp_path / "run", *extra, callbacks=(second,))
    assert caught.value.exit_code == 130
    line = str(caught.value)
    assert "interrupted by Ctrl-C; the unfinished run and its last checkpoint are kept in" in line
    assert "continue with --resume" in line and len(leftovers(tmp_path)) == 1


def test_sigterm_during_start_up_is_not_swallowed_by_library_code(
    inputs: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Model loading catches ``Exception`` in places (huggingface_hub printed the signal as its own
    error, on stdout); SIGTERM must unwind past it."""
    data, model = inputs

    def loading(*args: Any, **kwargs: Any) -> Any:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except Exception as exc:  # what library code does
            print(f"hub error: {exc!r}")
        raise AssertionError("SIGTERM was swallowed")

    monkeypatch.setattr(probekit.hub, "load_backbone", loading)
    code, stdout, err = run_cli(capsys, *train_args(model, data, "--out", tmp_path / "run"))
    assert code == 143 and stdout == ""
    assert err.strip() == "probekit: error: terminated by SIGTERM; no run folder was written"
    assert names(tmp_path) == ["work"]


# -- resume checks the data --------------------------------------------------------------------
def test_resume_on_changed_data_is_refused(
    inputs: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data, model = inputs
    out = tmp_path / "run"
    extra = ("--set=train.checkpoint_every_steps=1", "--set=train.grad_accum=1", "--set=train.epochs=2")
    with pytest.raises(TerminatedError) as caught:
        api_train(model, data, out, *extra, callbacks=(SignalAt(2, signal.SIGTERM),))
    assert caught.value.exit_code == 143
    rows = (data / "train.jsonl").read_text().splitlines(keepends=True)
    (data / "train.jsonl").write_text("".join(rows[:16]))
    code, stdout, err = run_cli(capsys, *train_args(model, data, "--out", out, *extra, "--resume", out))
    check_refusal(code, stdout, err, ("--resume: the data differs", "train: 32 rows -> 16 rows"))
    (data / "train.jsonl").write_text("".join(rows[:-1]) + rows[-1].replace('"label": 1', '"label": 0'))
    code, stdout, err = run_cli(capsys, *train_args(model, data, "--out", out, *extra, "--resume", out))
    check_refusal(code, stdout, err, ("train: the same 32 rows, other texts or labels",))
    (data / "train.jsonl").write_text("".join(rows))
    code, _, err = run_cli(capsys, *train_args(model, data, "--out", out, *extra, "--resume", out))
    assert code == 0, err


def test_max_length_beyond_the_position_embeddings_is_refused(
    inputs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, model = inputs
    argv = [*train_args(model, data, "--out", tmp_path / "run"), "--set=model.max_length=513"]
    code, stdout, err = run_cli(capsys, *argv)
    check_refusal(code, stdout, err, ("model.max_length: 513", "position embeddings for 512"))
    assert names(tmp_path) == ["work"]


@pytest.mark.slow
def test_max_length_beyond_minilm_is_refused() -> None:
    from probekit.errors import UserError
    from probekit.hub import ModelSpec, load_backbone

    with pytest.raises(UserError, match="position embeddings for 512"):
        load_backbone(ModelSpec(max_length=1000))


@pytest.mark.parametrize("kind", ["a file", "below a file"])
def test_a_cache_dir_that_is_not_a_folder_is_refused_before_loading(
    kind: str, inputs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, model = inputs
    (tmp_path / "cache").write_text("x")
    where = tmp_path / "cache" if kind == "a file" else tmp_path / "cache" / "sub"
    argv = [*train_args(model, data, "--out", tmp_path / "run"), f"--set=train.cache.dir={where}"]
    code, stdout, err = run_cli(capsys, *argv)
    check_refusal(code, stdout, err, ("train.cache.dir",))
    assert names(tmp_path) == ["cache", "work"]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_a_signal_at_any_moment_of_start_up_is_one_line(
    how: str, inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    """While Python imports probekit and torch (seconds), while the model loads, and while it
    trains: always one line, exit 130 or 143, no traceback, and nothing left unless a checkpoint
    was written (then the unfinished run is kept for --resume and the line says so)."""
    data, model = inputs
    code = {"SIGINT": 130, "SIGTERM": 143}[how]
    for delay in (0.3, 1.5, 3.0, 4.5):
        out = tmp_path / f"run-{delay}"
        args = train_args(model, data, "--out", out, "--set=train.epochs=1000", "--set=train.patience=1000")
        process = subprocess.Popen(_cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        process.send_signal(getattr(signal, how))
        stdout, err = process.communicate(timeout=120)
        assert process.returncode == code, (delay, err[-2000:])
        assert stdout == "" and "Traceback" not in err, (delay, err[-2000:])
        said = [line for line in err.splitlines() if line.startswith("probekit: ")]
        assert len(said) == 1, (delay, err[-2000:])  # the whole of stderr when it is not one line
        (line,) = said
        kept = leftovers(tmp_path)
        if "nothing was written" in line or "no run folder was written" in line:
            assert kept == [] and not out.exists(), (delay, line)
        else:
            assert "--resume" in line and len(kept) == 1, (delay, line)
            shutil.rmtree(kept[0])


def test_importing_probekit_leaves_signal_handlers_alone() -> None:
    """The start-up guard acts in the ``probekit`` command's own process only."""
    from probekit._startup import launched_as_cli

    code = (
        "import signal; before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}; "
        "import probekit; assert all(signal.getsignal(s) is h for s, h in before.items())"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert launched_as_cli(["python", "/venv/bin/probekit", "train"])
    assert launched_as_cli(["python", "-m", "probekit", "train"])
    assert not launched_as_cli(["python", "-m", "pytest"])
    assert not launched_as_cli(["python", "notebook.py"])
