"""``probekit train / eval / predict / presets`` in-process, on a tiny offline BERT and toy data."""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from probekit.cli import main

import probekit.training
from probekit import Probe, load_config, preset
from probekit.config import compose_config
from tests import engine_fixtures
from tests.engine_fixtures import ToyData, names, run_cli, write_jsonl

# Shared fixtures (a tiny saved BERT, toy data, one torch thread).
bert_dir = engine_fixtures.bert_dir
toy_data = engine_fixtures.toy_data
single_thread = engine_fixtures.single_thread

METRIC_KEYS = {"accuracy", "f1", "auroc", "auprc", "recall_at_1pct_fpr", "ece"}


def assert_cli_error(code: int, out: str, err: str, *fragments: str) -> None:
    """Exit 2, nothing on stdout, only ``probekit: error:`` lines on stderr, no traceback."""
    assert code == 2, (code, out, err)
    assert out == ""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert lines and all(line.startswith("probekit: error: ") for line in lines), err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in:\n{err}"


def train_args(model: Path, data: ToyData, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data.folder), "--set", "train.cpu=true", *extra]


@pytest.fixture(scope="module")
def cli_run(bert_dir: Path, toy_data: ToyData, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One ``probekit train`` (1 epoch, linear head) run from a fresh working folder, no --out."""
    home = tmp_path_factory.mktemp("cli-home")
    out, err = io.StringIO(), io.StringIO()
    argv = train_args(
        bert_dir,
        toy_data,
        "--set",
        "train.epochs=1",
        "--set",
        "head.kind=linear",
        "--set",
        "model.max_length=16",
    )
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.chdir(home)
        code = main(argv)
    runs = sorted((home / "runs").iterdir()) if (home / "runs").is_dir() else []
    return SimpleNamespace(code=code, out=out.getvalue(), err=err.getvalue(), home=home, runs=runs)


@pytest.fixture
def run_dir(cli_run: SimpleNamespace) -> Path:
    assert cli_run.code == 0, cli_run.err
    assert len(cli_run.runs) == 1
    return cli_run.runs[0]  # type: ignore[no-any-return]


# -- train ----------------------------------------------------------------------------------------
def test_train_writes_a_run_with_the_set_changes(
    cli_run: SimpleNamespace, run_dir: Path, bert_dir: Path, toy_data: ToyData
) -> None:
    assert cli_run.out == ""  # progress and summary go to stderr
    assert "Traceback" not in cli_run.err
    assert "epoch 1: train loss" in cli_run.err and "best epoch 1 of 1" in cli_run.err
    assert re.fullmatch(r"safety8k-\d{8}-\d{6}", run_dir.name)
    assert sorted(p.name for p in cli_run.home.iterdir()) == ["runs"]

    raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert raw["train"]["epochs"] == 1
    assert raw["head"] == {"kind": "linear", "num_classes": 2, "dropout": 0.0}  # no mlp fields left
    assert (raw["model"]["name"], raw["data"]["path"]) == (str(bert_dir), str(toy_data.folder))
    expected = compose_config(
        preset="safety8k",
        model=str(bert_dir),
        data=str(toy_data.folder),
        assignments=["train.cpu=true", "train.epochs=1", "head.kind=linear", "model.max_length=16"],
    )
    assert load_config(run_dir / "config.yaml") == expected
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1


def test_dry_run_prints_the_plan_and_writes_nothing(
    bert_dir: Path,
    toy_data: ToyData,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def no_train(*args: object, **kwargs: object) -> None:
        raise AssertionError("--dry-run trained")

    monkeypatch.setattr(probekit.training, "train", no_train)
    monkeypatch.chdir(tmp_path)
    before = names(toy_data.folder)
    code, out, err = run_cli(capsys, *train_args(bert_dir, toy_data, "--dry-run"))
    assert code == 0, err
    lines = out.splitlines()
    assert "freezing: blocks frozen 0-2, trainable 3 of 4; embeddings frozen" in out
    assert "pooling: multilayer over hidden states [2, 3, 4] -> 32 features" in lines
    assert "parameter groups:" in lines
    groups = {
        m.group(1): (m.group(2), m.group(3))
        for m in re.finditer(r"(\w+/\w+) +lr (\S+) +weight decay (\S+)", out)
    }
    assert groups == {
        "head/decay": ("0.0002", "0.1"),
        "head/no_decay": ("0.0002", "0"),
        "body/decay": ("2e-05", "0.1"),
        "body/no_decay": ("2e-05", "0"),
    }
    assert "batch: 8 per micro-step x 4 accumulation x 1 process(es) = 32 effective" in lines
    assert (
        "steps: 3 optimiser steps per epoch, up to 30 in 10 epochs; warmup 3 steps (cosine schedule)" in lines
    )
    assert "precision: auto -> fp32 on cpu" in lines
    assert names(tmp_path) == []
    assert names(toy_data.folder) == before


def test_set_pooler_kind_replaces_the_whole_pooler_block(
    bert_dir: Path, toy_data: ToyData, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(capsys, *train_args(bert_dir, toy_data, "--set", "pooler.kind=max", "--dry-run"))
    assert code == 0, err
    assert "pooling: max over hidden states [4] -> 32 features" in out.splitlines()
    code, out, err = run_cli(
        capsys,
        *train_args(bert_dir, toy_data, "--set", "pooler.kind=max", "--set", "pooler.layer=-2", "--dry-run"),
    )
    assert code == 0, err
    assert "pooling: max over hidden states [3] -> 32 features" in out.splitlines()
    config = compose_config(preset="safety8k", assignments=["pooler.kind=max"])
    assert config.pooler.model_dump() == {"kind": "max", "layer": -1}


@pytest.mark.parametrize(
    ("assignment", "fragments"),
    [
        ("train.epoch=1", ("train.epoch", "no field 'epoch'", "did you mean 'epochs'?")),
        ("trian.epochs=1", ("trian.epochs", "no field 'trian'", "did you mean 'train'?")),
        ("pooler.layerz=[-1]", ("pooler.layerz", "no field 'layerz'", "did you mean 'layers'?")),
    ],
)
def test_set_with_an_unknown_path_exits_2_with_a_hint(
    capsys: pytest.CaptureFixture[str], assignment: str, fragments: tuple[str, ...]
) -> None:
    code, out, err = run_cli(capsys, "train", "--set", assignment, "--dry-run")
    assert_cli_error(code, out, err, *fragments)


# -- eval -----------------------------------------------------------------------------------------
def test_eval_json_prints_one_object_and_writes_it(
    run_dir: Path, toy_data: ToyData, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(capsys, "eval", run_dir, "--data", toy_data.path("test"), "--json")
    assert code == 0, err
    assert len(out.splitlines()) == 1
    metrics = json.loads(out)
    assert set(metrics) >= METRIC_KEYS
    assert (metrics["n"], metrics["positives"]) == (48, 24)
    written = run_dir / "eval" / "test.json"
    assert json.loads(written.read_text()) == metrics

    code, out, err = run_cli(capsys, "eval", run_dir, "--data", toy_data.path("test"))
    assert code == 0, err
    assert re.search(r"^auroc +\d\.\d{4}$", out, flags=re.M)
    assert f"written to {written}" in out


# -- predict --------------------------------------------------------------------------------------
def predictions(out: str) -> list[dict[str, object]]:
    rows = [json.loads(line) for line in out.splitlines()]
    assert all(set(row) == {"text", "label", "probability", "confidence", "probabilities"} for row in rows)
    return rows


def test_predict_texts_prints_one_json_line_each(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    texts = ["the cat drinks poison", "we like green tea"]
    code, out, err = run_cli(capsys, "predict", run_dir, *texts)
    assert code == 0, err
    rows = predictions(out)
    assert [row["text"] for row in rows] == texts
    probe = Probe.from_pretrained(run_dir)
    assert [row["probability"] for row in rows] == probe.predict_proba(texts)
    for row in rows:
        assert row["label"] == (1 if row["probability"] >= probe.threshold else 0)  # type: ignore[operator]


def test_predict_reads_an_input_file(
    run_dir: Path, toy_data: ToyData, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = tmp_path / "texts.txt"
    lines.write_text("a bird sings\n\n   \nbomb in the park\n", encoding="utf-8")
    code, out, err = run_cli(capsys, "predict", run_dir, "--input", lines)
    assert code == 0, err
    assert [row["text"] for row in predictions(out)] == ["a bird sings", "bomb in the park"]

    code, out, err = run_cli(capsys, "predict", run_dir, "--input", toy_data.path("val"), "--batch-size", "7")
    assert code == 0, err
    assert [row["text"] for row in predictions(out)] == toy_data.texts("val")


@pytest.mark.parametrize("suffix", [".jsonl", ".ndjson", ".json", ".csv"])
def test_predict_input_data_files_give_their_text_field(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], suffix: str
) -> None:
    """Every suffix the data loader reads as records (``FORMAT_SUFFIXES``) gives texts, not raw lines."""
    texts = ["poison in the tea", "the dog ran"]
    path = tmp_path / f"inputs{suffix}"
    if suffix == ".csv":
        path.write_text("text,label\n" + "".join(f"{t},0\n" for t in texts), encoding="utf-8")
    else:
        write_jsonl(path, [{"text": t, "label": 0} for t in texts])
    code, out, err = run_cli(capsys, "predict", run_dir, "--input", path)
    assert code == 0, err
    assert [row["text"] for row in predictions(out)] == texts


def test_predict_reads_stdin(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("poison on the mat\n\n\t\nthe sun is warm\r\n"))
    code, out, err = run_cli(capsys, "predict", run_dir)
    assert code == 0, err
    assert [row["text"] for row in predictions(out)] == ["poison on the mat", "the sun is warm"]


# -- presets --------------------------------------------------------------------------------------
def test_presets_list_and_show(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "presets", "list")
    assert code == 0, err
    assert any(line.startswith("safety8k: prompt-safety recipe") for line in out.splitlines())
    code, out, err = run_cli(capsys, "presets", "show", "safety8k")
    assert code == 0, err
    assert load_config(yaml.safe_load(out)) == preset("safety8k")
    code, out, err = run_cli(capsys, "presets", "show", "safety8k", "--format", "json")
    assert code == 0, err
    assert load_config(json.loads(out)) == preset("safety8k")


# -- error paths ----------------------------------------------------------------------------------
def test_error_paths_exit_2_without_a_traceback(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-run"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a cat", "label": 1}\nnot json\n', encoding="utf-8")
    unknown_label = write_jsonl(tmp_path / "labels.jsonl", [{"text": "a cat", "label": 7}])
    config = tmp_path / "config.yaml"
    config.write_text("train:\n  epochs: 1\n", encoding="utf-8")
    cases = [
        (["eval", missing, "--data", bad], [f"{missing}: no such run folder"]),
        (["predict", missing, "a text"], [f"{missing}: no such run folder"]),
        (["eval", run_dir, "--data", bad], [f"{bad}:2: not valid JSON"]),
        (["eval", run_dir, "--data", tmp_path / "none.jsonl"], ["none.jsonl: no such file"]),
        (["eval", run_dir, "--data", unknown_label], ["labels.jsonl:1", "label"]),
        (["predict", run_dir, "--input", tmp_path / "none.txt"], ["none.txt: no such file"]),
        (
            ["train", "--preset", "safety8k", "--config", config, "--dry-run"],
            ["give --preset or --config, not both"],
        ),
        (["train", "--preset", "nosuch", "--dry-run"], ["nosuch"]),
        (["train", "--set", "train.precision=fp16", "--set", "train.cpu=true"], ["fp16 needs a CUDA device"]),
    ]
    for argv, fragments in cases:
        code, out, err = run_cli(capsys, *argv)
        assert_cli_error(code, out, err, *fragments)


def test_a_diverged_run_exits_3(
    bert_dir: Path,
    toy_data: ToyData,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import torch

    real = torch.nn.functional.cross_entropy

    def nan_when_training(*args: object, **kwargs: object) -> torch.Tensor:
        loss = real(*args, **kwargs)  # type: ignore[arg-type]
        return loss * float("nan") if torch.is_grad_enabled() else loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", nan_when_training)
    code, out, err = run_cli(capsys, *train_args(bert_dir, toy_data, "--out", tmp_path / "run"))
    assert code == 3, err
    assert out == "" and "Traceback" not in err
    assert err.splitlines()[-1].startswith("probekit: error: training diverged: non-finite loss at epoch 1")
    assert names(tmp_path) == []


def test_train_into_a_non_empty_out_exits_2_and_keeps_it(
    bert_dir: Path,
    toy_data: ToyData,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def no_fit(*args: object, **kwargs: object) -> None:
        raise AssertionError("training started")

    monkeypatch.setattr(probekit.training, "fit", no_fit)
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    (out_dir / "mine.txt").write_text("keep me")
    code, out, err = run_cli(capsys, *train_args(bert_dir, toy_data, "--out", out_dir))
    assert code == 2, err
    assert out == "" and "Traceback" not in err
    assert err.splitlines()[-1].startswith(
        f"probekit: error: {out_dir}: the output folder exists and is not empty"
    )
    assert [p.name for p in out_dir.iterdir()] == ["mine.txt"]
