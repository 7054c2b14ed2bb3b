"""A hub id when the hub cannot be reached: a quick one-line error, or the cached copy with one
warning; never huggingface_hub's retries (about 30 s) or a warning printed twice.

Each case runs the real command in a fresh interpreter, where ``HF_ENDPOINT`` points at a closed
local port and ``HF_HOME`` at a cache the test builds (huggingface_hub reads both at import)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .engine_fixtures import ToyData, bert_dir, toy_data

__all__ = ["bert_dir", "toy_data"]


REPO_ID = "probekit-test/tiny-bert"
CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused


def _cache(home: Path, model_dir: Path) -> None:
    """``REPO_ID`` in huggingface_hub's cache layout under ``home`` (as a download leaves it)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = home / "hub" / ("models--" + REPO_ID.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit, encoding="utf-8")
    shutil.copytree(model_dir, repo / "snapshots" / commit)


def _train(
    home: Path, data: ToyData, out: Path, **env: str
) -> tuple[subprocess.CompletedProcess[str], float]:
    command = [
        sys.executable,
        "-m",
        "probekit",
        "train",
        "--dry-run",
        "--model",
        REPO_ID,
        *(part for assignment in data.assignments() for part in ("--set", assignment)),
        "--out",
        str(out),
    ]
    environ = {
        **os.environ,
        "HF_HOME": str(home),
        "HF_ENDPOINT": CLOSED,
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        **env,
    }
    begun = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=environ, check=False, timeout=300)
    return done, time.perf_counter() - begun


def test_an_unreachable_hub_and_an_uncached_id_fail_at_once_in_one_line(
    tmp_path: Path, toy_data: ToyData
) -> None:
    done, seconds = _train(tmp_path / "hf", toy_data, tmp_path / "run")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("probekit: error: model.name: cannot reach http://127.0.0.1:9"), lines
    assert REPO_ID in lines[0] and "not in the local cache" in lines[0] and "HF_HUB_OFFLINE=1" in lines[0]
    assert "Retry" not in done.stderr
    # No retries: the same start-up as any other command (huggingface_hub's backoff takes ~30 s).
    assert seconds < 25, seconds
    assert not (tmp_path / "run").exists()


def test_hub_offline_set_and_an_uncached_id_say_so(tmp_path: Path, toy_data: ToyData) -> None:
    done, _ = _train(tmp_path / "hf", toy_data, tmp_path / "run", HF_HUB_OFFLINE="1")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("probekit: error: model.name: HF_HUB_OFFLINE is set and"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_an_unreachable_hub_loads_the_cached_copy_with_one_warning(
    tmp_path: Path, toy_data: ToyData, bert_dir: Path
) -> None:
    _cache(tmp_path / "hf", bert_dir)
    done, _ = _train(tmp_path / "hf", toy_data, tmp_path / "run")
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1, done.stderr
    assert warnings[0].startswith(f"probekit: warning: cannot reach {CLOSED} ("), warnings
    assert warnings[0].endswith(
        f"loading the cached copy of {REPO_ID} (set HF_HUB_OFFLINE=1 to skip this check)"
    ), warnings
    assert "blocks" in done.stdout  # the dry run's plan: the cached backbone was loaded


def test_hub_offline_loads_the_cached_copy_without_a_warning(
    tmp_path: Path, toy_data: ToyData, bert_dir: Path
) -> None:
    _cache(tmp_path / "hf", bert_dir)
    done, _ = _train(tmp_path / "hf", toy_data, tmp_path / "run", HF_HUB_OFFLINE="1")
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr.lower(), done.stderr
