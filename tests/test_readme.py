"""The README's commands and code work verbatim, and .ci/run runs exactly them."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def _section_block(title: str) -> str:
    section = README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)[0]


def test_ci_runs_exactly_the_readme_setup_checks_and_test_commands() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    for title in ("Set up", "Test", "Checks"):
        for line in _section_block(title).strip().splitlines():
            assert line in ci, f"README '{title}' command missing from .ci/run: {line}"


def test_setup_command_pins_the_cpu_torch_and_pyproject_does_not() -> None:
    assert "torch==2.13.0" in _section_block("Set up")
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert '"torch>=2.2"' in pyproject and "torch==" not in pyproject


@pytest.mark.slow
def test_readme_python_example_runs_as_written() -> None:
    (code,) = [block for block in _blocks("python") if "probekit.build" in block]
    assert len([line for line in code.splitlines() if line.strip()]) <= 6  # imports + the 3 lines
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "torch.Size([1, 2])"


@pytest.mark.slow
def test_readme_notebook_example_runs_as_written(tmp_path: Path) -> None:
    """DataFrame -> train -> predict one string -> save -> load, verbatim, in a fresh folder."""
    (code,) = [block for block in _blocks("python") if "DataFrame" in block]
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    row_line, array_line = run.stdout.strip().splitlines()[-2:]
    row = ast.literal_eval(row_line)
    assert row["text"] == "How do I pick the lock on my neighbour's door?" and row["label"] in (0, 1)
    assert row["confidence"] == row["probabilities"][row["label"]] >= 0.5
    probs = [float(x) for x in re.findall(r"[0-9.]+(?:e-?[0-9]+)?", array_line)]
    assert len(probs) == 2 and abs(sum(probs) - 1) < 1e-5
    config = (tmp_path / "runs" / "notebook" / "config.yaml").read_text(encoding="utf-8")
    assert "in_memory: DataFrame, 1200 rows" in config  # what the data was, not a file
    report = json.loads((tmp_path / "runs" / "notebook" / "report.json").read_text(encoding="utf-8"))
    assert report["metrics"]["test"]["auroc"] > 0.8
    assert (tmp_path / "my-probe" / "probe.json").is_file()


def test_readme_listing_one_liner_lists_every_family() -> None:
    line = next(line for line in README.splitlines() if line.startswith(".venv/bin/python -c"))
    code = line.split('-c "', 1)[1].rstrip('"')
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    listing = ast.literal_eval(run.stdout)
    assert set(listing) == {"poolers", "heads", "freezers", "schedulers", "tasks", "presets"}
    assert {"masked_mean", "cls", "last_token", "max", "multilayer"} <= set(listing["poolers"])


@pytest.mark.slow
def test_readme_quick_start_trains_and_predicts_verbatim(tmp_path: Path) -> None:
    """The first Quick start block, run as written (offline, CPU) in a fresh folder."""
    section = README.split("## Quick start\n", 1)[1]
    commands = re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)[0]
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parents[1], target_is_directory=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", commands],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (line,) = run.stdout.strip().splitlines()
    row = json.loads(line)
    assert (
        set(row) == {"text", "label", "probability", "confidence", "probabilities"}
        and 0.0 <= row["probability"] <= 1.0
    )
    assert row["label"] in (0, 1)
    report = json.loads((tmp_path / "runs" / "demo" / "report.json").read_text(encoding="utf-8"))
    assert report["metrics"]["val"]["auroc"] > 0.8  # the shipped recipe learns the demo data
    assert "blocks frozen 0-3, trainable 4-5 of 6" in run.stderr


@pytest.mark.slow
def test_readme_multiclass_block_trains_and_predicts_verbatim(tmp_path: Path) -> None:
    """The Quick start's hazards13 block on the demo data's 7 categories, as written."""
    section = README.split("## Quick start\n", 1)[1]
    commands = next(
        block for block in re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL) if "hazards13" in block
    )
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parents[1], target_is_directory=True)
    run = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", commands],
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (line,) = run.stdout.strip().splitlines()
    row = json.loads(line)
    assert set(row) == {"text", "label", "confidence", "probabilities", "score", "flagged"}
    assert len(row["probabilities"]) == 7 and row["label"] in row["probabilities"]
    report = json.loads((tmp_path / "runs" / "categories" / "report.json").read_text(encoding="utf-8"))
    assert report["threshold_rule"] == "max_f1" and len(report["metrics"]["test"]["per_class"]) == 7
    assert report["metrics"]["val"]["binary_auroc"] > 0.8  # the guard view learns the demo data
