"""The benchmark script runs end to end (tiny settings: a smoke test, never a timed assertion)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .engine_fixtures import ToyData, bert_dir, make_rows, toy_data, write_jsonl

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
    assert lines[0] == "scenario partial: 64 train / 24 val rows, 1 epochs"
    assert any(line.startswith("probekit activation cache: hidden states [4] per token") for line in lines)
    assert any(line.startswith("GFLOP/s, trainable blocks") for line in lines)
    for side in ("baseline", "probekit"):
        figures = result["results"][side]  # type: ignore[index]
        assert len(figures["epoch_s"]) == 1
        assert 0.0 <= figures["val_accuracy"] <= 1.0
        assert figures["peak_rss_mb"] > 0


def test_gpu_scenario_code_path_on_a_tiny_llama(tmp_path: Path) -> None:
    """The gpu scenario's code (random Llama built from its config, synthetic texts) at toy size."""
    lines, result = bench("--scenario", "gpu", "--tiny", "--rows", "64", "--epochs", "1", tmp_path=tmp_path)
    assert LAST_LINE.match(lines[-1]), lines[-1]
    assert any("projected 10 epochs" in line for line in lines)
    assert result["sizes"] == {"train": 64, "val": 16}


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
