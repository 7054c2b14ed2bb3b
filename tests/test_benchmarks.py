"""The benchmark script runs end to end (tiny settings: a smoke test, never a timed assertion)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .engine_fixtures import make_rows, write_jsonl

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
