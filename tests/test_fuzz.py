"""Property-based fuzzing of everything a user or an attacker hands probekit (issue #13).

Each draw is a real ``probekit`` command, in-process, in a fresh sandbox holding the user's inputs
(a data folder, a model folder, a config file). Whatever is drawn, every draw must end with:

* exit code 0, 2 (bad input) or 3 (training diverged), never 1 and never an escaped exception;
* no traceback, and every error line in the ``probekit: error:`` form;
* the inputs byte-identical;
* nothing left behind: on an error no output folder, and never a hidden ``.partial``/``.old``
  folder or ``.lock`` file (only the output folder, and a cache folder the config asked for).

The draws: configs mutated from the schema and outside it (values of every JSON type, numbers at
and past every bound, non-finite floats, paths that climb out or hold NUL, blocks of the wrong
type, unknown keys and kinds), delivered as a YAML file, a JSON file or ``--set`` assignments;
most run ``train --dry-run`` (validation and preparation), some train for real. The counts per
CI run are in docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import probekit

from .engine_fixtures import bert_dir, leftovers, no_plots, run_cli, toy_data, write_toy_data
from .test_run_trust import edit_json, trained

__all__ = ["bert_dir", "no_plots", "toy_data", "trained"]

FUZZ = settings(
    max_examples=int(os.environ.get("PROBEKIT_FUZZ_EXAMPLES", "25")),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
"""Draws per property in CI (``PROBEKIT_FUZZ_EXAMPLES`` raises it for a long local run)."""


def digest(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``: files by content, folders and links by kind."""
    found: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            found[rel] = f"link -> {path.readlink()}"
        elif path.is_file():
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[rel] = "folder"
    return found


def check_outcome(code: int, out: str, err: str) -> None:
    """Exit 0, 2 or 3; no traceback; errors in the documented form."""
    assert code in (0, 2, 3), (code, err[-3000:])
    assert "Traceback" not in out + err, err[-3000:]
    if code != 0:
        errors = [line for line in err.splitlines() if line.startswith("probekit: error: ")]
        assert errors, err[-3000:]


# -- configs -----------------------------------------------------------------------------------
def leaf_paths(value: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(value, dict):
        return [p for key, item in value.items() for p in leaf_paths(item, (*prefix, key))] or [prefix]
    return [prefix]


BASE = probekit.preset("safety8k").model_dump(mode="json")
PATHS = leaf_paths(BASE)
BLOCKS = sorted({p[:1] for p in PATHS} | {p[:2] for p in PATHS if len(p) > 2})

PATH_TEXTS = [
    "",
    " ",
    ".",
    "..",
    "../..",
    "/",
    "/etc/passwd",
    "data",
    "data/train.jsonl",
    "model",
    "config.yaml",
    "nowhere/x",
    "a\0b",
    "x" * 300,
    "\u200b",
    "~",
    "out",
]
"""Paths a config may name: the sandbox's own inputs, places outside it, and malformed ones."""

NUMBERS = st.one_of(
    st.integers(min_value=-3, max_value=70),
    st.sampled_from([2**31, 2**32 - 1, 2**32, 2**63, -(2**63), 10**30, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1.0, 0.5, 1e-300, 1e300, 0.999999, 1.000001]),
)
VALUES = st.one_of(
    NUMBERS,
    st.booleans(),
    st.none(),
    st.text(max_size=12),
    st.sampled_from(PATH_TEXTS),
    st.sampled_from(
        ["auto", "fp16", "bf16", "fp32", "masked_mean", "mlp", "bottom", "cosine", "ddp", "fsdp"]
    ),
    st.lists(st.integers(min_value=-6, max_value=6), max_size=4),
    st.dictionaries(st.sampled_from(["kind", "a", "0", "layers"]), st.integers(-2, 2), max_size=2),
)


def near(value: Any) -> st.SearchStrategy[Any]:
    """Values of the same JSON type as ``value``, around it and across the bounds a field of
    that type tends to have (so that drawn configs often validate and reach training)."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.one_of(st.integers(min_value=-1, max_value=2 * value + 2), st.sampled_from([0, 1, 2, 64]))
    if isinstance(value, float):
        return st.one_of(
            st.floats(min_value=0.0, max_value=1.0), st.sampled_from([0.0, 1.0, value / 10, value * 10])
        )
    if isinstance(value, list):
        return st.lists(st.integers(min_value=-5, max_value=5), min_size=0, max_size=4)
    return VALUES


@st.composite
def mutated_configs(draw: st.DrawFn) -> dict[str, Any]:
    """The shipped preset with 1-4 mutations: a leaf replaced, removed or added beside, a block
    replaced by another type, a kind changed to a registered or an unknown one."""
    data = json.loads(json.dumps(BASE))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        op = draw(st.sampled_from(["set", "set", "set", "remove", "unknown", "block", "kind"]))
        if op in {"set", "remove"}:
            path = draw(st.sampled_from(PATHS))
            parent = _walk(data, path[:-1])
            if not isinstance(parent, dict):
                continue
            if op == "remove":
                parent.pop(path[-1], None)
            else:
                wild = draw(st.booleans())
                parent[path[-1]] = draw(VALUES if wild else near(_walk(BASE, path)))
        elif op == "unknown":
            parent = _walk(data, draw(st.sampled_from([(), *BLOCKS])))
            if isinstance(parent, dict):
                parent[draw(st.sampled_from(["epoch", "lr", "extra", "kind2", "__class__"]))] = draw(VALUES)
        elif op == "block":
            block = draw(st.sampled_from(BLOCKS))
            parent = _walk(data, block[:-1])
            if isinstance(parent, dict):
                parent[block[-1]] = draw(VALUES)
        else:
            family = draw(st.sampled_from(["pooler", "head", "freezer", "scheduler"]))
            registry = probekit.REGISTRIES[family + "s"]
            kind = draw(st.one_of(st.sampled_from(registry.kinds()), st.text(max_size=8)))
            data[family] = {"kind": kind}
    return data


def _walk(data: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def assignments(data: dict[str, Any]) -> list[str]:
    """``--set`` assignments that turn the preset into ``data`` (leaves set as JSON text; a
    non-finite float as the bare word Python's json writes)."""
    return [f"{'.'.join(path)}={json.dumps(_walk(data, path))}" for path in leaf_paths(data) if path]


@contextmanager
def sandbox(bert_dir: Path) -> Iterator[Path]:
    """A working folder holding the user's inputs: ``data/`` (toy JSONL), ``model/`` (the tiny
    BERT) and ``config.yaml``; the test changes into it and back."""
    with tempfile.TemporaryDirectory() as root:
        work = Path(root) / "work"
        write_toy_data(work / "data", train=24, val=12, test=12)
        shutil.copytree(bert_dir, work / "model")
        (work / "config.yaml").write_text("train:\n  epochs: 1\n")
        before = Path.cwd()
        os.chdir(work)
        try:
            yield work
        finally:
            os.chdir(before)


DELIVERY = st.sampled_from(["yaml", "json", "set"])
FAST = ["--set=train.cpu=true", "--set=model.max_length=32"]


def fuzz_train(
    work: Path, data: dict[str, Any], how: str, capsys: pytest.CaptureFixture[str], *extra: str
) -> tuple[int, str, str]:
    """Run ``probekit train`` with the drawn config delivered ``how``; check the outcome, the
    inputs and what is left. Returns the outcome."""
    inputs = {name: digest(work / name) for name in ("data", "model")}
    config_text = (work / "config.yaml").read_bytes()
    argv = ["train", "--model", "model", "--data", "data", "--out", "out", *FAST]
    if how == "set":
        argv += [f"--set={a}" for a in assignments(data)]
    else:
        path = work / f"drawn.{how}"
        text = yaml.safe_dump(data) if how == "yaml" else json.dumps(data)  # json writes NaN as-is
        path.write_text(text, encoding="utf-8")
        argv += ["--config", str(path)]
    before = digest(work)
    code, out, err = run_cli(capsys, *argv, *extra)
    event(f"exit {code}")
    check_outcome(code, out, err)
    assert {name: digest(work / name) for name in ("data", "model")} == inputs
    assert (work / "config.yaml").read_bytes() == config_text
    assert leftovers(work) == [], leftovers(work)
    after = {k: v for k, v in digest(work).items() if not k.startswith("out")}
    cache = _walk(data, ("train", "cache", "dir"))
    if isinstance(cache, str) and code == 0:
        after = {k: v for k, v in after.items() if not k.startswith(cache.strip("/"))}
    assert after == {k: v for k, v in before.items() if not k.startswith("out")}
    if code != 0:
        assert not (work / "out").exists()
    return code, out, err


@FUZZ
@given(data=mutated_configs(), how=DELIVERY)
def test_drawn_configs_are_validated_and_prepared_or_refused_cleanly(
    data: dict[str, Any], how: str, bert_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with sandbox(bert_dir) as work:
        fuzz_train(work, data, how, capsys, "--dry-run")


@settings(FUZZ, max_examples=max(4, FUZZ.max_examples // 3))
@given(data=mutated_configs(), how=DELIVERY)
def test_drawn_configs_train_or_are_refused_cleanly(
    data: dict[str, Any], how: str, bert_dir: Path, capsys: pytest.CaptureFixture[str], no_plots: list[Any]
) -> None:
    """Real training runs; the epochs are capped after the draw so that each one is short."""
    with sandbox(bert_dir) as work:
        code, _, err = fuzz_train(work, data, how, capsys, "--set=train.epochs=1")
        if code == 0:
            assert (work / "out" / "checkpoint" / "probe.json").is_file(), err[-2000:]


@FUZZ
@given(
    path=st.one_of(st.sampled_from([".".join(p) for p in PATHS]), st.text(max_size=20)),
    raw=st.one_of(
        st.text(max_size=20),
        st.sampled_from(["1" * 5000, "[" * 5000, '{"a": 1, "a": 2}', "NaN", "-Infinity", "1e999", "", "="]),
        NUMBERS.map(lambda n: json.dumps(n)),
    ),
)
def test_drawn_set_assignments_are_refused_or_accepted_cleanly(
    path: str, raw: str, bert_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--set path=value`` as typed: any path (known, misspelt, junk) and any value text."""
    with sandbox(bert_dir) as work:
        before = digest(work)
        code, out, err = run_cli(
            capsys, "train", "--dry-run", "--model", "model", "--data", "data", *FAST, f"--set={path}={raw}"
        )
        event(f"exit {code}")
        check_outcome(code, out, err)
        assert digest(work) == before


# -- run folders -------------------------------------------------------------------------------
FILE_EDITS = st.sampled_from(["delete", "truncate", "folder", "link out", "garbage", "empty"])
"""What may happen to a file of a run folder: removed, cut short, replaced by a folder, by a
symlink leading out of the run folder, by random bytes, or emptied."""


def edit_file(path: Path, how: str, outside: Path) -> None:
    """Apply a `FILE_EDITS` edit to ``path`` (a file of a copied run folder)."""
    if path.is_symlink() or not path.is_file():  # an earlier draw replaced it already
        return
    data = path.read_bytes()
    path.unlink()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "folder":
        path.mkdir()
    elif how == "link out":
        outside.write_bytes(data)
        path.symlink_to(outside)
    elif how == "garbage":
        path.write_bytes(bytes(range(256)) * 4)
    elif how == "empty":
        path.write_bytes(b"")


@FUZZ
@given(data=st.data(), command=st.sampled_from(["predict", "eval"]))
def test_drawn_damage_to_a_run_folder_is_refused_cleanly_and_changes_nothing(
    data: st.DataObject,
    command: str,
    trained: Any,
    toy_data: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Files of a finished run removed, cut, swapped for folders, links leading out or garbage,
    and probe.json edited (resealed or not): ``predict`` and ``eval`` exit 0 or 2 and the run
    folder is as it was (``eval`` may add only its ``eval/`` result)."""
    from .test_run_trust import copy_run, meta_of, sealed, snapshot, write_json

    with tempfile.TemporaryDirectory() as folder:
        run = copy_run(trained, Path(folder))
        if data.draw(st.booleans(), label="edit probe.json"):
            meta = edit_json(meta_of(run), data.draw)
            write_json(run / "checkpoint" / "probe.json", sealed(meta) if data.draw(st.booleans()) else meta)
        files = sorted(p for p in run.rglob("*") if p.is_file())
        for _ in range(data.draw(st.integers(0, 2), label="file edits")):
            target = data.draw(st.sampled_from(files), label="file")
            edit_file(target, data.draw(FILE_EDITS, label="how"), Path(folder) / "outside")
        before = snapshot(run)
        if command == "predict":
            code, out, err = run_cli(capsys, "predict", run, "the cat sat")
        else:
            code, out, err = run_cli(capsys, "eval", run, "--data", toy_data.path("test"))
        event(f"{command} exit {code}")
        check_outcome(code, out, err)
        after = {k: v for k, v in snapshot(run).items() if not k.startswith("eval")}
        assert after == {k: v for k, v in before.items() if not k.startswith("eval")}


@FUZZ
@given(data=st.data())
def test_drawn_damage_to_a_stopped_run_resumes_or_is_refused_cleanly(
    data: st.DataObject, trained: Any, capsys: pytest.CaptureFixture[str], no_plots: list[Any]
) -> None:
    """A stopped run's checkpoints edited (state.json resealed so that its checksum passes, or
    not) and its files damaged: ``train --resume`` continues from an intact checkpoint or refuses
    with one line, leaving the unfinished run as it was."""
    from .test_run_trust import copy_stopped, rewrite, snapshot

    with tempfile.TemporaryDirectory() as folder:
        where = Path(folder)
        partial, checkpoints = copy_stopped(trained, where)
        for _ in range(data.draw(st.integers(1, 3), label="edits")):
            checkpoint = data.draw(st.sampled_from(checkpoints), label="checkpoint")
            try:
                state = json.loads((checkpoint / "state.json").read_text())
            except (OSError, ValueError):  # damaged by an earlier draw
                state = None
            if state is not None and data.draw(st.booleans(), label="state edit"):
                edited = edit_json(state, data.draw)
                (checkpoint / "state.json").write_text(json.dumps(edited))
                if data.draw(st.booleans(), label="resealed"):
                    with contextlib.suppress(OSError):  # a file an earlier draw damaged
                        rewrite(checkpoint)
            else:
                files = sorted(p for p in checkpoint.iterdir() if p.is_file())
                edit_file(data.draw(st.sampled_from(files)), data.draw(FILE_EDITS), where / "outside")
        config = where / "config.yaml"
        config.write_text(probekit.dump_config(trained.config))
        before = snapshot(partial)
        code, out, err = run_cli(
            capsys, "train", "--config", config, "--out", where / "run", "--resume", where / "run"
        )
        event(f"resume exit {code}")
        check_outcome(code, out, err)
        assert leftovers(where) == ([] if code == 0 else [partial])
        if code == 0:
            assert (where / "run" / "checkpoint" / "probe.json").is_file()
        else:
            assert snapshot(partial) == before
