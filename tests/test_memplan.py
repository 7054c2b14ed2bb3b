# ruff: noqa: F811  (pytest fixtures imported by name)
"""The memory plan of ``--dry-run``: every byte the run holds, counted independently here."""

from __future__ import annotations

from pathlib import Path

import pytest

from probekit import memplan
from probekit.training import prepare
from tests.engine_fixtures import ToyData, bert_dir, make_config, run_cli, toy_data  # noqa: F401


def test_the_plan_counts_weights_gradients_optimizer_state_and_cache(
    bert_dir: Path, toy_data: ToyData
) -> None:
    plan = prepare(make_config(bert_dir, toy_data))
    probe = plan.probe
    trainable = sum(p.numel() for p in probe.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in probe.parameters() if not p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in probe.buffers())
    assert plan.cache_plan is not None and plan.cache_plan.mode == "prefix"
    tokens = sum(len(ids) for split in ("train", "val") for ids in plan.encoded[split].ids)
    cache = tokens * probe.layout.hidden_size * len(plan.cache_plan.layers) * 4
    parts = memplan.memory_plan(plan)
    assert parts == {
        "cpu": {
            "frozen weights": 4 * frozen + buffers,
            "trainable weights": 4 * trainable,
            "gradients": 4 * trainable,
            "optimizer state": 8 * trainable,
            "activation cache": cache,
        }
    }
    lines = plan.describe()
    start = lines.index("memory plan (bytes held; the backbone's own activations come on top):")
    total = memplan.size(sum(parts["cpu"].values()))
    assert lines[start + 1].startswith("  cpu: frozen weights ") and lines[start + 1].endswith(
        f"; total {total}"
    )


def test_half_precision_frozen_blocks_halve_their_bytes(bert_dir: Path, toy_data: ToyData) -> None:
    full = memplan.memory_plan(prepare(make_config(bert_dir, toy_data)))["cpu"]
    half_plan = prepare(make_config(bert_dir, toy_data, "model.dtype=bf16", "train.precision=bf16"))
    half = memplan.memory_plan(half_plan)["cpu"]
    assert half["trainable weights"] == full["trainable weights"]
    assert half["optimizer state"] == full["optimizer state"]
    held = sum(p.numel() for m in half_plan.probe.frozen_modules() for p in m.parameters())
    assert full["frozen weights"] - half["frozen weights"] == 2 * held  # 4 -> 2 bytes each
    assert half["activation cache"] == full["activation cache"] // 2  # stored in bf16


def test_a_cache_beyond_its_memory_limit_is_on_disk(bert_dir: Path, toy_data: ToyData) -> None:
    plan = prepare(make_config(bert_dir, toy_data, "train.cache.max_memory_gb=0"))
    parts = memplan.memory_plan(plan)
    assert "activation cache" not in parts["cpu"]
    assert parts["disk (memory-mapped file)"]["activation cache"] > 0


@pytest.mark.parametrize(("n", "text"), [(512, "512 B"), (1536, "1.5 KiB"), (3 * 1024**3, "3.0 GiB")])
def test_sizes_read_in_binary_units(n: int, text: str) -> None:
    assert memplan.size(n) == text


def test_the_dry_run_prints_the_memory_plan(
    bert_dir: Path, toy_data: ToyData, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, err = run_cli(
        capsys,
        "train",
        "--model",
        str(bert_dir),
        "--data",
        str(toy_data.path("train").parent),
        "--set",
        "train.cpu=true",
        "--out",
        str(tmp_path / "r"),
        "--dry-run",
    )
    assert code == 0, err
    assert "memory plan (bytes held" in out and "optimizer state" in out and "activation cache" in out
