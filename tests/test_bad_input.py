"""Every malformed input is refused the same way: exit 2, one located line, no traceback, nothing
written. The corpus below is counted for docs/reliability.md."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from .engine_fixtures import ToyData, bert_dir, leftovers, run_cli, toy_data

__all__ = ["bert_dir", "toy_data"]

GOOD = (
    '{"text": "hello there", "label": 0}\n{"text": "how to make a bomb", "label": 1}\n'
    '{"text": "nice day", "label": 0}\n{"text": "poison the well", "label": 1}\n'
)


REMOTE_CODE = (
    b'open("{tmp}/CANARY", "w").write("ran")\n'
    b"from transformers import PretrainedConfig\n"
    b"class CanaryConfig(PretrainedConfig):\n    model_type = 'canary-net'\n"
)
"""Model code that would leave a canary file if it ever ran."""


@dataclass(frozen=True)
class Case:
    """Files to write (name -> bytes), extra CLI arguments, and what the message must name."""

    files: dict[str, bytes]
    args: tuple[str, ...]
    names: tuple[str, ...]


def data_case(
    train: bytes = GOOD.encode(), val: bytes = GOOD.encode(), *names: str, suffix: str = "jsonl"
) -> Case:
    return Case({f"data/train.{suffix}": train, f"data/val.{suffix}": val}, ("--data", "{tmp}/data"), names)


CASES: dict[str, Case] = {
    # -- data ------------------------------------------------------------------------------------
    "truncated JSON line": data_case(
        GOOD.encode() + b'{"text": "a", "lab\n', b"", "train.jsonl:5", "not valid JSON"
    ),
    "array line": data_case(GOOD.encode() + b"[1, 2]\n", GOOD.encode(), "train.jsonl:5", "JSON object"),
    "string line": data_case(GOOD.encode() + b'"just text"\n', GOOD.encode(), "train.jsonl:5", "JSON object"),
    "missing text field": data_case(
        GOOD.encode() + b'{"txt": "a", "label": 0}\n', GOOD.encode(), "train.jsonl:5", "'txt', 'label'"
    ),
    "missing label field": data_case(
        GOOD.encode() + b'{"text": "a", "lable": 0}\n', GOOD.encode(), "train.jsonl:5", "'label'"
    ),
    "label outside the map": data_case(
        GOOD.encode(), GOOD.encode() + b'{"text": "zz", "label": 2}\n', "class 2"
    ),
    "mixed label types": data_case(
        GOOD.encode() + b'{"text": "zz", "label": "1"}\n', GOOD.encode(), "train.jsonl:5", "label type"
    ),
    "null text": data_case(
        GOOD.encode() + b'{"text": null, "label": 1}\n', GOOD.encode(), "train.jsonl:5", "null"
    ),
    "empty text": data_case(
        GOOD.encode() + b'{"text": "  ", "label": 1}\n', GOOD.encode(), "train.jsonl:5", "empty"
    ),
    "single class": data_case(
        b'{"text": "a", "label": 0}\n{"text": "b", "label": 0}\n', GOOD.encode(), "train.jsonl", "class 1"
    ),
    "class absent from val": data_case(GOOD.encode(), b'{"text": "a", "label": 0}\n', "val.jsonl", "class 1"),
    "empty file": data_case(GOOD.encode(), b"", "val.jsonl", "empty file"),
    "header-only CSV": data_case(
        b"text,label\n",
        b"text,label\nhi,0\nbomb,1\n",
        "train.csv:1",
        "no rows below the header",
        suffix="csv",
    ),
    "invalid UTF-8": data_case(
        GOOD.encode() + b'{"text": "caf\xe9", "label": 0}\n', GOOD.encode(), "train.jsonl:5", "byte offset"
    ),
    "missing data path": Case(
        {}, ("--data", "{tmp}/nowhere/train.jsonl"), ("nowhere/train.jsonl", "no such file")
    ),
    # -- config and command line -----------------------------------------------------------------
    "unknown field": Case({}, ("--set", "train.epoch=3"), ("train.epoch", "did you mean 'epochs'")),
    "unknown kind": Case({}, ("--set", "pooler.kind=meen"), ("pooler", "masked_mean")),
    "zero learning rate": Case({}, ("--set", "optimizer.lr_head=0"), ("optimizer.lr_head", "greater than 0")),
    "negative learning rate": Case({}, ("--set", "optimizer.lr_body=-1e-5"), ("optimizer.lr_body",)),
    "accumulation 0": Case({}, ("--set", "train.grad_accum=0"), ("train.grad_accum",)),
    "freezing more blocks than exist": Case(
        {}, ("--set", "freezer.count=9", "--set", "freezer.fraction=null"), ("freezer.count=9", "4 blocks")
    ),
    "pooling a layer that does not exist": Case(
        {}, ("--set", "pooler.layers=[-1,-9]"), ("pooler.layers", "-9")
    ),
    "missing config file": Case({}, ("--config", "{tmp}/nope.yaml"), ("nope.yaml", "no such file")),
    "config not YAML": Case({"c.yaml": b"train: [1, 2\n"}, ("--config", "{tmp}/c.yaml"), ("c.yaml",)),
    "missing model folder": Case({}, ("--model", "{tmp}/no-model"), ("model.name", "no such folder")),
    "model path is a file": Case(
        {"weights.pt": b"not a model"}, ("--model", "{tmp}/weights.pt"), ("model.name", "not a model folder")
    ),
    # -- issue #13: values that reached torch, transformers or the OS unchecked ----------------------
    "seed outside 0..2^32-1": Case({}, ("--set", "train.seed=4294967296"), ("train.seed", "4294967295")),
    "betas outside [0, 1)": Case({}, ("--set", "optimizer.betas=[1.0, 0.999]"), ("optimizer.betas[0]",)),
    "an infinite eps": Case({}, ("--set", "optimizer.eps=Infinity"), ("optimizer.eps", "finite")),
    "a timeout past a week": Case(
        {}, ("--set", "train.distributed.timeout_s=100000000000000000000"), ("train.distributed.timeout_s",)
    ),
    "max_length beyond the position embeddings": Case(
        {}, ("--set", "model.max_length=513"), ("model.max_length: 513", "position embeddings for 512")
    ),
    "a cache dir that is a file": Case(
        {"cache": b"x"}, ("--set", "train.cache.dir={tmp}/cache"), ("train.cache.dir", "is a file")
    ),
    "a model folder whose config.json has a value of the wrong type": Case(
        {"m/config.json": b'{"model_type": "bert", "hidden_size": "wide", "num_attention_heads": 2}'},
        ("--model", "{tmp}/m"),
        ("model.name", "cannot load", "hidden_size"),
    ),
    "a revision that climbs out": Case({}, ("--set", "model.revision=main/../../x"), ("model.revision",)),
    "a NUL in a path": Case({}, ("--set", 'data.path="a\\u0000b"'), ("data.path", "NUL")),
    "an integer of 5000 digits in --set": Case(
        {}, ("--set", "train.epochs=" + "1" * 5000), ("--set train.epochs", "more than 4300 digits")
    ),
    "an integer of 5000 digits in a config": Case(
        {"c.yaml": b"train:\n  epochs: " + b"1" * 5000 + b"\n"},
        ("--config", "{tmp}/c.yaml"),
        ("c.yaml", "more than 4300 digits"),
    ),
    "a key twice in a YAML config": Case(
        {"c.yaml": b"train:\n  epochs: 1\n  epochs: 2\n"},
        ("--config", "{tmp}/c.yaml"),
        ("c.yaml:3", "key 'epochs' appears twice"),
    ),
    "a key twice in a JSON config": Case(
        {"c.json": b'{"train": {"epochs": 1, "epochs": 2}}'},
        ("--config", "{tmp}/c.json"),
        ("c.json", "key 'epochs' appears twice"),
    ),
    "a config of more than 1 MiB": Case(
        {"c.yaml": b"# padding\n" * 120_000}, ("--config", "{tmp}/c.yaml"), ("c.yaml", "larger than 1024 KiB")
    ),
    "aliases that expand a small config": Case(
        {
            "c.yaml": b"a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
            + b"".join(
                f"{n}: &{n} [{', '.join(['*' + p] * 10)}]\n".encode()
                for p, n in zip("abcdefg", "bcdefgh", strict=True)
            )
        },
        ("--config", "{tmp}/c.yaml"),
        ("c.yaml", "expands to more than"),
    ),
    "a --set value of 100 KB": Case({}, ("--set", "model.name=" + "x" * 100_000), ("--set", "characters")),
    "an empty --data": Case({}, ("--data", ""), ("--data", "empty")),
    "an empty --model": Case({}, ("--model", ""), ("--model", "empty")),
    "a missing data path without a suffix": Case(
        {}, ("--data", "{tmp}/nowhere"), ("nowhere", "no such file")
    ),
    "a label of 10^12": data_case(
        GOOD.encode() + b'{"text": "zz", "label": 1000000000000}\n',
        GOOD.encode(),
        "train.jsonl:5",
        "1000000000000",
    ),
    "a label_map index of 10^12": Case(
        {}, ("--set", 'data.label_map={"0": 0, "1": 1000000000000}'), ("data.label_map",)
    ),
    "a key twice in a JSON Lines record": data_case(
        GOOD.encode() + b'{"text": "a", "text": "b", "label": 0}\n', GOOD.encode(), "train.jsonl:5", "twice"
    ),
    "a text of only invisible characters": data_case(
        GOOD.encode() + '{"text": "\u200b\ufeff\u2060\u202e", "label": 0}\n'.encode(),
        GOOD.encode(),
        "train.jsonl:5",
        "invisible",
    ),
    "a text longer than data.max_text_chars": Case(
        {
            "data/train.jsonl": GOOD.encode() + b'{"text": "' + b"word " * 400 + b'", "label": 0}\n',
            "data/val.jsonl": GOOD.encode(),
        },
        ("--data", "{tmp}/data", "--set", "data.max_text_chars=1000"),
        ("train.jsonl:5", "max_text_chars"),
    ),
    # -- security --------------------------------------------------------------------------------
    "model that needs remote code": Case(
        {
            "m/config.json": b'{"model_type": "canary-net", "hidden_size": 8, "auto_map": {"AutoConfig": '
            b'"configuration_canary.CanaryConfig", "AutoModel": "modeling_canary.CanaryModel"}}',
            "m/configuration_canary.py": REMOTE_CODE,
            "m/modeling_canary.py": REMOTE_CODE,
        },
        ("--model", "{tmp}/m"),
        ("model.name", "needs its own code", "--trust-remote-code"),
    ),
    "run name climbing out of runs/": Case({}, ("--name", "../../escaped"), ("run name '../../escaped'",)),
    "run name that is an absolute path": Case({}, ("--name", "/tmp/escaped"), ("run name '/tmp/escaped'",)),
    "run name naming a hidden folder": Case({}, ("--name", ".hidden"), ("run name '.hidden'",)),
    "YAML tag that constructs an object": Case(
        {"evil.yaml": b'train: !!python/object/apply:os.system ["touch {tmp}/CANARY"]\n'},
        ("--config", "{tmp}/evil.yaml"),
        ("evil.yaml:1", "python/object/apply"),
    ),
}


def _args(case: Case, tmp: Path, toy: ToyData, model: Path) -> list[str]:
    """A real training command (not a dry run) on the tiny BERT and the toy data, unless the case
    gives its own ``--data``."""
    argv = ["train", "--out", str(tmp / "run"), "--model", str(model), "--set", "train.cpu=true"]
    if "--data" not in case.args:
        argv += [f"--set={assignment}" for assignment in toy.assignments()]
    return argv + [a.replace("{tmp}", str(tmp)) for a in case.args]


def check_refusal(code: int, out: str, err: str, names: tuple[str, ...]) -> str:
    """Exit 2, exactly one ``probekit: error:`` line naming ``names``, no traceback."""
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    errors = [line for line in err.splitlines() if line.startswith("probekit: error: ")]
    assert len(errors) == 1, err
    for name in names:
        assert name in errors[0], (name, errors[0])
    return errors[0]


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_input_is_refused_cleanly(
    name: str, tmp_path: Path, bert_dir: Path, toy_data: ToyData, capsys: pytest.CaptureFixture[str]
) -> None:
    case = CASES[name]
    for rel, content in case.files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.replace(b"{tmp}", str(tmp_path).encode()))
    code, out, err = run_cli(capsys, *_args(case, tmp_path, toy_data, bert_dir))
    check_refusal(code, out, err, case.names)
    assert not (tmp_path / "run").exists()
    assert leftovers(tmp_path) == []
    assert not (tmp_path / "CANARY").exists()


def test_the_corpus_covers_what_reliability_md_reports() -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text(encoding="utf-8")
    assert f"{len(CASES) + len(LOADERS)} malformed inputs" in text


LOADERS = ("predict", "eval", "predict-folder")


@pytest.mark.parametrize("how", LOADERS)
def test_a_pickled_checkpoint_is_refused_and_never_executed(
    how: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    canary = tmp_path / "CANARY"

    class Payload:
        def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
            return (os.system, (f"touch {canary}",))

    folder = tmp_path / "run"
    folder.mkdir()
    pt = folder / "model.pt"
    pt.write_bytes(pickle.dumps(Payload()))
    (tmp_path / "data.jsonl").write_text(GOOD)
    if how == "predict":
        argv, names = ["predict", str(pt), "hello"], ("model.pt", "never unpickles")
    elif how == "eval":
        argv, names = (
            ["eval", str(pt), "--data", str(tmp_path / "data.jsonl")],
            ("model.pt", "never unpickles"),
        )
    else:  # a folder holding only a pickle is not a run folder either
        argv, names = ["predict", str(folder), "hello"], ("no probe.json",)
    code, out, err = run_cli(capsys, *argv)
    check_refusal(code, out, err, names)
    assert not canary.exists()


def test_secrets_in_the_environment_never_reach_errors_or_logs(
    tmp_path: Path,
    bert_dir: Path,
    toy_data: ToyData,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secrets = {
        "HF_TOKEN": "hf_s3cr3tT0k3nValue",
        "HUGGING_FACE_HUB_TOKEN": "hf_an0therS3cret",
        "AWS_SECRET_ACCESS_KEY": "aws-s3cr3t",
    }
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)
    runs = [
        ["train", "--dry-run", "--model", str(bert_dir), *(f"--set={a}" for a in toy_data.assignments())],
        ["train", "--dry-run", "--model", str(tmp_path / "missing")],
        ["train", "--dry-run", "--set", "train.epoch=1"],
        ["predict", str(tmp_path / "nope"), "x"],
    ]
    for argv in runs:
        _, out, err = run_cli(capsys, *argv)
        for value in secrets.values():
            assert value not in out + err


@pytest.mark.parametrize("bad", ["../escaped", "a/b", "..", "/tmp/escaped", ".hidden", "x" * 101, "", "a\\b"])
def test_run_names_cannot_escape_the_output_folder(
    bad: str,
    tmp_path: Path,
    bert_dir: Path,
    toy_data: ToyData,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--name`` without ``--out``: a name that is a path is refused before anything is created,
    inside the working folder or outside it."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = sorted(tmp_path.rglob("*"))
    argv = ["train", "--name", bad, "--model", str(bert_dir), *(f"--set={a}" for a in toy_data.assignments())]
    code, out, err = run_cli(capsys, *argv, "--set", "train.cpu=true")
    check_refusal(code, out, err, ("run name",))
    assert sorted(tmp_path.rglob("*")) == before


def test_a_run_name_names_the_folder_under_runs(
    tmp_path: Path,
    bert_dir: Path,
    toy_data: ToyData,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--name", "my-probe.v1", "--model", str(bert_dir), "--set", "train.cpu=true"]
    code, _out, err = run_cli(
        capsys, *argv, *(f"--set={a}" for a in toy_data.assignments()), "--set", "train.epochs=1"
    )
    assert code == 0, err
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("my-probe.v1-") and (run / "checkpoint").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    code, _, err = run_cli(capsys, "train", "--name", "x", "--out", str(tmp_path / "o"))
    assert code == 2 and "not both" in err


@given(st.text(max_size=150))
def test_names_derived_from_presets_and_config_files_are_always_safe(text: str) -> None:
    from probekit.rundir import check_run_name, safe_run_name

    name = safe_run_name(text)
    assert check_run_name(name) == name
    assert "/" not in name and not name.startswith(".")
