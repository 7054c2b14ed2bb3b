"""The benchmark script runs end to end (tiny settings: a smoke test, never a timed assertion)."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from .engine_fixtures import BAD, NEUTRAL, ToyData, bert_dir, make_rows, toy_data, write_jsonl

__all__ = ["bert_dir", "toy_data"]

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "vs_hf_trainer.py"
LAST_LINE = re.compile(r"^speedup=\d+\.\d\d accuracy_delta=[+-]\d+\.\d\d memory_ratio=\d+\.\d\d$")

pytestmark = pytest.mark.slow


def bench(*args: str, tmp_path: Path) -> tuple[list[str], dict[str, object]]:
    out = tmp_path / "result.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    return lines, json.loads(out.read_text())


def test_partial_scenario_on_a_given_jsonl(tmp_path: Path) -> None:
    """--data takes one JSONL file (split 80/20 by the script); the real MiniLM backbone."""
    data = write_jsonl(tmp_path / "mix.jsonl", make_rows(120, names=("safe", "unsafe")))
    lines, result = bench(
        "--scenario", "partial", "--data", str(data), "--rows", "64", "--epochs", "1", tmp_path=tmp_path
    )
    assert LAST_LINE.match(lines[-1]), lines[-1]
    assert re.fullmatch(r"scenario partial: 64 train / 24 val rows, [\d,]+ train tokens, 1 epochs", lines[0])
    assert any(line.startswith("probekit activation cache: hidden states [4] per token") for line in lines)
    assert any(line.startswith("GFLOP/s, trainable blocks") for line in lines)
    for side in ("baseline", "probekit"):
        figures = result["results"][side]  # type: ignore[index]
        assert len(figures["epoch_s"]) == 1
        assert 0.0 <= figures["val_accuracy"] <= 1.0
        assert figures["peak_rss_mb"] > 0


def test_the_gpu_check_script_dry_runs_on_the_cpu(tmp_path: Path) -> None:
    """benchmarks/gpu_check.sh --tiny: every step of the GPU check (install check, pytest -m gpu,
    the gpu scenario at toy size, versions), its files as the device tool brings them back (at
    most 8, none in a sub-folder), the benchmark's figures and targets line."""
    out = tmp_path / "check"
    done = subprocess.run(
        [
            "bash",
            str(ROOT / "benchmarks" / "gpu_check.sh"),
            "--tiny",
            "--out",
            str(out),
            "--python",
            sys.executable,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    summary = (out / "summary.txt").read_text()
    assert done.returncode == 0, summary + done.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    expected = "bench.json bench.log bench.png env.txt install.log summary.txt tests.log tests.xml"
    assert files == expected.split()
    for name in (
        "0. install",
        "1. pytest -m gpu",
        "2. benchmark: gpu scenario",
        "3. nvidia-smi and versions",
    ):
        assert f"== {name}: ok (exit 0)" in summary, name
    assert re.search(r"\d+ passed, \d+ skipped", summary)  # the cpu cases ran, the cuda ones skipped
    assert "targets: 10 epochs under 10 min: " in summary and "optimiser step, ms (median)" in summary
    result = json.loads((out / "bench.json").read_text())
    assert result["sizes"] == {"train": 64, "val": 16}
    assert result["train_tokens"] > 64 * 96  # 96-160 words a row, plus <s>
    for side in ("baseline", "probekit"):
        figures = result["results"][side]
        assert len(figures["epoch_s"]) == len(figures["train_s"]) == 1
        assert 0 < figures["train_s"][0] <= figures["epoch_s"][0]
        assert len(figures["step_s"]) == 2  # 64 rows / (8 x 4) per optimiser step
        assert result["projected_10_epochs_s"][side] > 0
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


RESULTS = ROOT / "benchmarks" / "results.py"


def test_results_report_runs_every_method(bert_dir: Path, toy_data: ToyData, tmp_path: Path) -> None:
    """benchmarks/results.py (the numbers of docs/results.md) at toy size: every method, the
    tables, the per-layer plot, the operating point and the per-source errors."""
    out = tmp_path / "out"
    args = ["--data", str(toy_data.folder), "--out", str(out), "--model", str(bert_dir), "--epochs", "1"]
    done = subprocess.run(
        [sys.executable, str(RESULTS), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["tfidf", "sweep", "probe", "safety8k", "finetune"]
    keys = {"accuracy", "f1", "auroc", "auprc", "recall_at_1pct_fpr", "recall_at_5pct_fpr", "ece"}
    for method in ("tfidf", "probe", "safety8k", "finetune"):
        for split in ("val", "test"):
            metrics = results["methods"][method]["metrics"][split]
            assert keys <= metrics.keys()
            assert metrics["n"] == len(toy_data.texts(split))
    candidates = [c["name"] for c in results["methods"]["sweep"]["candidates"]]
    assert candidates[:5] == [f"layer {i}" for i in range(5)]  # the tiny BERT: 4 blocks
    assert (out / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    point = results["operating_point"]
    assert point["val"]["fpr"] <= 0.01
    per_source = point["test_errors_per_source"]
    assert sum(row["rows"] for row in per_source.values()) == len(toy_data.texts("test"))
    table = (out / "results.md").read_text()
    assert done.stdout == table
    assert "| TF-IDF + logistic regression | test |" in table and "Operating point of" in table


def load_results_module() -> Any:
    spec = importlib.util.spec_from_file_location("benchmark_results", RESULTS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_report_detects_the_task() -> None:
    """--task auto: integer or boolean 0/1 labels are binary; more labels, or names, multi-class."""
    detect = load_results_module().detect_task
    assert detect([0, 1], "auto") == "binary"
    assert detect([False, True], "auto") == "binary"
    assert detect([0, 1, 2], "auto") == "multiclass"
    assert detect(["safe", "unsafe"], "auto") == "multiclass"
    assert detect(["safe", "vcr", "ssh"], "auto") == "multiclass"
    assert detect([0, 1], "multiclass") == "multiclass"


def write_three_classes(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """96 / 48 / 48 rows labelled by their `BAD` word (``bomb``, ``poison``) or ``safe``."""
    rows = make_rows(192, seed=3)
    for row in rows:
        row["label"] = next((word for word in row["text"].split() if word in BAD), "safe")
    splits = {"train": rows[:96], "val": rows[96:144], "test": rows[144:]}
    for name, split_rows in splits.items():
        write_jsonl(folder / f"{name}.jsonl", split_rows)
    return splits


def test_results_report_on_multiclass_data(bert_dir: Path, tmp_path: Path) -> None:
    """Three string labels: the multi-class methods (TF-IDF, the hazards13 sweep and preset, one
    epoch on the tiny BERT), judged by multiclass_metrics with the "any class vs safe" view; the
    summary, per-class and confusion tables; a confusion plot per method."""
    splits = write_three_classes(tmp_path / "data")
    out = tmp_path / "out"
    args = ["--data", str(tmp_path / "data"), "--out", str(out), "--model", str(bert_dir), "--epochs", "1"]
    done = subprocess.run(
        [sys.executable, str(RESULTS), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "multiclass" and results["preset"] == "hazards13"
    assert results["class_names"] == ["bomb", "poison", "safe"] and results["negative_class"] == "safe"
    assert list(results["methods"]) == ["tfidf", "sweep", "preset"]
    assert results["best"] in results["methods"]
    scalar = ("accuracy", "f1", "auroc", "auprc", "binary_auroc", "binary_recall_at_1pct_fpr", "ece")
    for method, outcome in results["methods"].items():
        if method == "sweep":
            outcome = next(c for c in outcome["candidates"] if c["name"] == outcome["best"])
        for split in ("val", "test"):
            metrics = outcome["metrics"][split]
            for key in scalar:
                assert metrics[key] is None or 0.0 <= metrics[key] <= 1.0, (method, split, key)
            assert metrics["n"] == len(splits[split])
            assert sum(map(sum, metrics["confusion_matrix"])) == len(splits[split])
            assert sorted(metrics["per_class"]) == ["bomb", "poison", "safe"]
        assert (out / f"confusion_{method}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tfidf = results["methods"]["tfidf"]
    assert tfidf["C"] in (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
    assert tfidf["metrics"]["test"]["f1"] >= 0.9  # the class is the word: TF-IDF gets it
    assert not math.isnan(tfidf["threshold"])
    assert (out / "layers.png").is_file()
    table = (out / "results.md").read_text()
    assert done.stdout == table
    assert "| method | split | acc | macro F1 | macro AUROC | bin AUROC | bin R@1%FPR | ECE |" in table
    assert (
        "| TF-IDF + logistic regression | test |" in table
        and "| hazards13 preset (as shipped) | val |" in table
    )
    assert (
        "| class | n | tfidf F1 | tfidf AUPRC | sweep F1 | sweep AUPRC | preset F1 | preset AUPRC |" in table
    )
    test_rows = {name: sum(r["label"] == name for r in splits["test"]) for name in ("bomb", "poison", "safe")}
    for name, count in test_rows.items():
        assert re.search(rf"^\| {name} \| {count} \|( \d\.\d{{3}} \|){{6}}$", table, re.M), name
    assert "| true \\ predicted | bomb | poison | safe |" in table
    assert "Sweep, every candidate:" in table


def test_results_report_detects_multilabel_and_regression() -> None:
    """--task auto: list labels are multi-label, numbers that are not all integers a regression."""
    detect = load_results_module().detect_task
    assert detect([["bomb"], [], ["bomb", "poison"]], "auto") == "multilabel"
    assert detect([0.5, 1.0, 2], "auto") == "regression"
    assert detect([0.0, 1.0], "auto") == "binary"
    assert detect([1, 2, 3], "auto") == "multiclass"
    assert detect([1, 2, 3], "regression") == "regression"


def test_results_report_refuses_label_fields_with_another_task(tmp_path: Path) -> None:
    write_three_classes(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        load_results_module().main(["--data", str(tmp_path), "--label-fields", "a,b", "--task", "binary"])
    assert exit_info.value.code == 2


FLAGS = ("poison", "bomb", "tea")
"""The labels of the multi-label data: 1 when the text holds the word."""


def write_flags(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """96 / 48 / 48 rows with a 0/1 column per `FLAGS` word, about a fifth of the ``bomb`` and
    ``tea`` cells null (unknown)."""
    rng = random.Random(7)
    neutral = [word for word in NEUTRAL if word not in FLAGS]
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    while len(rows) < 192:
        words = rng.choices(neutral, k=rng.randint(2, 5))
        cells = {flag: int(rng.random() < 0.4) for flag in FLAGS}
        for flag in FLAGS:
            if cells[flag]:
                words.insert(rng.randint(0, len(words)), flag)
        text = " ".join(words)
        if text in seen:
            continue
        seen.add(text)
        row: dict[str, Any] = {"text": text, **cells}
        for flag in FLAGS[1:]:
            if rng.random() < 0.2:
                row[flag] = None
        rows.append(row)
    splits = {"train": rows[:96], "val": rows[96:144], "test": rows[144:]}
    for name, split_rows in splits.items():
        write_jsonl(folder / f"{name}.jsonl", split_rows)
    return splits


def run_results(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, str(RESULTS), *args], capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def best_or_self(outcome: dict[str, Any]) -> dict[str, Any]:
    """A method's outcome, or the best candidate of a sweep."""
    if "candidates" in outcome:
        return next(c for c in outcome["candidates"] if c["name"] == outcome["best"])
    return outcome


def in_unit(value: Any) -> bool:
    return value is None or 0.0 <= value <= 1.0


def test_results_report_on_multilabel_data(bert_dir: Path, tmp_path: Path) -> None:
    """Three labels in 0/1/null columns (--label-fields): TF-IDF per label, the sweep and a safety8k
    multi-label run (one epoch on the tiny BERT), judged by multilabel_metrics with unknown cells
    left out; the summary and per-label tables."""
    splits = write_flags(tmp_path / "data")
    out = tmp_path / "out"
    done = run_results(
        *("--data", str(tmp_path / "data"), "--out", str(out), "--model", str(bert_dir)),
        *("--epochs", "1", "--label-fields", ",".join(FLAGS)),
    )
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "multilabel" and results["label_names"] == list(FLAGS)
    assert list(results["methods"]) == ["tfidf", "sweep", "probe"] and results["best"] in results["methods"]
    pooled = ("f1", "f1_micro", "auroc", "auprc", "recall_at_1pct_fpr", "subset_accuracy", "hamming_loss")
    for method, outcome in results["methods"].items():
        for split in ("val", "test"):
            metrics = best_or_self(outcome)["metrics"][split]
            assert all(in_unit(metrics[key]) for key in pooled), (method, split)
            assert metrics["n"] == len(splits[split]) and 0.5 < metrics["known_fraction"] < 1.0
            assert list(metrics["per_label"]) == list(FLAGS)
            known = sum(row["bomb"] is not None for row in splits[split])
            assert metrics["per_label"]["bomb"]["known"] == known < len(splits[split])
    tfidf = results["methods"]["tfidf"]
    assert tfidf["C"] in (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0) and len(tfidf["threshold"]) == 3
    assert tfidf["metrics"]["test"]["f1"] >= 0.9  # each label is a word: TF-IDF gets it
    probe = results["methods"]["probe"]
    assert {"task.kind=multilabel", "head.num_classes=3", "loss.class_weights=balanced"} <= set(probe["set"])
    report = json.loads((Path(probe["run"]) / "report.json").read_text())
    assert probe["metrics"]["test"]["f1"] == report["metrics"]["test"]["f1"]
    assert (out / "layers.png").is_file()
    table = (out / "results.md").read_text()
    assert done.stdout == table
    assert (
        "| method | split | macro F1 | micro F1 | macro AUROC | macro AUPRC | macro R@1%FPR | "
        "subset acc | Hamming loss | known |" in table
    )
    assert "| TF-IDF + logistic regression per label | test |" in table
    assert "| safety8k probe (task.kind=multilabel) | val |" in table
    assert (
        "| label | known | + | tfidf F1 | tfidf AUPRC | sweep F1 | sweep AUPRC | probe F1 | probe AUPRC |"
        in table
    )
    for flag in FLAGS:
        known = sum(row[flag] is not None for row in splits["test"])
        positive = sum(row[flag] == 1 for row in splits["test"])
        assert re.search(rf"^\| {flag} \| {known} \| {positive} \|( \d\.\d{{3}} \|){{6}}$", table, re.M), flag
    assert "Sweep, every candidate:" in table


def test_results_report_reads_label_lists(tmp_path: Path) -> None:
    """Labels as lists of names: --task auto makes it multi-label, the names sorted (TF-IDF only)."""
    rows = make_rows(192, seed=4)
    for row in rows:
        row["label"] = sorted(word for word in row["text"].split() if word in BAD)
    for name, part in (("train", rows[:96]), ("val", rows[96:144]), ("test", rows[144:])):
        write_jsonl(tmp_path / "data" / f"{name}.jsonl", part)
    out = tmp_path / "out"
    run_results("--data", str(tmp_path / "data"), "--out", str(out), "--methods", "tfidf")
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "multilabel" and results["label_names"] == ["bomb", "poison"]
    test = results["methods"]["tfidf"]["metrics"]["test"]
    assert test["known_fraction"] == 1.0 and test["f1"] >= 0.9


def write_scores(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """96 / 48 / 48 rows whose number grows by 5 with each ``bomb`` in the text, plus noise in [0, 1)."""
    rng = random.Random(8)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    while len(rows) < 192:
        words = rng.choices(NEUTRAL, k=rng.randint(2, 5))
        count = rng.randint(0, 3)
        for _ in range(count):
            words.insert(rng.randint(0, len(words)), "bomb")
        text = " ".join(words)
        if text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": 10 + 5 * count + rng.random()})
    splits = {"train": rows[:96], "val": rows[96:144], "test": rows[144:]}
    for name, split_rows in splits.items():
        write_jsonl(folder / f"{name}.jsonl", split_rows)
    return splits


def test_results_report_on_regression_data(bert_dir: Path, tmp_path: Path) -> None:
    """Numbers: --task auto makes a regression; TF-IDF + ridge, the sweep and a safety8k
    regression run, judged by regression_metrics; the table and the plot of the best method."""
    splits = write_scores(tmp_path / "data")
    out = tmp_path / "out"
    done = run_results(
        *("--data", str(tmp_path / "data"), "--out", str(out), "--model", str(bert_dir), "--epochs", "1")
    )
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "regression" and "label_names" not in results
    assert list(results["methods"]) == ["tfidf", "sweep", "probe"] and results["best"] in results["methods"]
    for method, outcome in results["methods"].items():
        for split in ("val", "test"):
            metrics = best_or_self(outcome)["metrics"][split]
            assert 0.0 <= metrics["mae"] <= metrics["rmse"], (method, split)
            assert metrics["r2"] is None or metrics["r2"] <= 1.0
            for key in ("pearson", "spearman"):
                assert metrics[key] is None or -1.0 <= metrics[key] <= 1.0, (method, split, key)
            assert metrics["n"] == len(splits[split])
    tfidf = results["methods"]["tfidf"]
    assert tfidf["alpha"] in (0.01, 0.1, 1.0, 10.0, 100.0)
    assert tfidf["metrics"]["test"]["pearson"] >= 0.8  # the number follows a word: TF-IDF gets it
    probe = results["methods"]["probe"]
    assert {"task.kind=regression", "head.num_classes=1", "train.monitor=mae"} <= set(probe["set"])
    report = json.loads((Path(probe["run"]) / "report.json").read_text())
    assert probe["metrics"]["test"]["mae"] == report["metrics"]["test"]["mae"]
    plotted = results["plotted"]
    assert plotted in ("tfidf", "probe")
    assert (out / f"regression_{plotted}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    assert done.stdout == table
    assert "| method | split | MAE | RMSE | R² | Pearson | Spearman |" in table
    assert "| TF-IDF + ridge regression | test |" in table
    assert "| safety8k probe (task.kind=regression) | val |" in table
    assert f"regression_{plotted}.png" in table and "Sweep, every candidate:" in table
    # the probe's plot comes from its saved run's predictions
    alone: dict[str, Any] = {"methods": {"probe": probe}}
    texts = [row["text"] for row in splits["test"]]
    targets = np.asarray([row["label"] for row in splits["test"]])
    load_results_module().plot_best_regression(alone, texts, targets, {}, tmp_path)
    assert alone["plotted"] == "probe"
    assert (tmp_path / "regression_probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inference_benchmark_runs_every_path(bert_dir: Path, toy_data: ToyData, tmp_path: Path) -> None:
    from .engine_fixtures import tiny_binary_run

    run = tiny_binary_run(bert_dir, toy_data, tmp_path)
    out = tmp_path / "bench"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "inference.py"),
            *("--run", str(run), "--data", str(toy_data.path("test")), "--out", str(out)),
            *("--latency-calls", "5", "--batch1-texts", "4", "--no-cli"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|")[1].strip() for line in done.stdout.splitlines() if line.startswith("| ")]
    assert {"torch", "onnx", "onnx-int8", "hf-pipeline"} <= set(rows)
    (report,) = json.loads((out / "inference.json").read_text())
    paths = report["paths"]
    assert paths["onnx"]["max_abs_diff"] <= 1e-4 and "max_abs_diff" not in paths["hf-pipeline"]
    assert paths["onnx"]["metrics"]["accuracy"] == paths["torch"]["metrics"]["accuracy"]
    assert all(v > 0 for entry in paths.values() for v in entry["texts_per_s"].values())
    assert (out / "inference.png").read_bytes()[:4] == b"\x89PNG"
