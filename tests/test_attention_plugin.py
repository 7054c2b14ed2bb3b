"""The installed first-party plugin (probekit-attention-pool) is usable everywhere a built-in is."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest
import yaml

import probekit
from probekit import Probe
from tests import engine_fixtures
from tests.engine_fixtures import ToyData, run_cli

try:
    importlib.metadata.distribution("probekit-attention-pool")
except importlib.metadata.PackageNotFoundError:  # the README's setup command installs it
    pytest.skip("probekit-attention-pool is not installed", allow_module_level=True)

bert_dir = engine_fixtures.bert_dir
toy_data = engine_fixtures.toy_data
single_thread = engine_fixtures.single_thread

DIST = "probekit-attention-pool"


def test_the_core_never_imports_the_plugin() -> None:
    import subprocess
    import sys

    code = "import sys, probekit; assert 'probekit_attention_pool' not in sys.modules; print('ok')"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def test_kind_validates_round_trips_and_appears_in_listing_and_schema(
    capsys: pytest.CaptureFixture[str],
) -> None:
    probekit.discover()
    assert probekit.POOLERS.entry("attention").distribution == DIST
    block = {"kind": "attention", "heads": 2, "temperature": 0.5, "layer": -2}
    config = probekit.load_config({"pooler": block})
    dumped = config.pooler.model_dump()
    assert dumped == {"kind": "attention", "layer": -2, "heads": 2, "temperature": 0.5}
    for fmt in ("json", "yaml"):
        assert probekit.load_config(yaml.safe_load(probekit.dump_config(config, fmt))) == config
    assert "AttentionPoolSpec" in json.dumps(probekit.json_schema())
    code, out, _ = run_cli(capsys, "components", "list", "--json")
    poolers = {e["kind"]: e for e in json.loads(out)["families"]["poolers"]}
    assert code == 0 and poolers["attention"]["distribution"] == DIST


def test_train_with_set_pooler_kind_then_reload_and_predict(
    capsys: pytest.CaptureFixture[str], bert_dir: Path, toy_data: ToyData, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    code, _, err = run_cli(
        capsys,
        "train",
        "--preset",
        "safety8k",
        "--out",
        out,
        "--set",
        f"model.name={bert_dir}",
        *[arg for a in toy_data.assignments() for arg in ("--set", a)],
        *[arg for a in engine_fixtures.FAST for arg in ("--set", a)],
        "--set",
        "pooler.kind=attention",
        "--set",
        "pooler.heads=2",
    )
    assert code == 0, err
    meta = json.loads((out / "checkpoint" / "probe.json").read_text(encoding="utf-8"))
    pooler = next(c for c in meta["components"] if c["family"] == "pooler")
    assert pooler["kind"] == "attention" and pooler["distribution"] == DIST
    probe = Probe.from_pretrained(out)
    assert probe.pooler_spec.kind == "attention" and probe.pooler_spec.heads == 2  # type: ignore[attr-defined]
    first = probe.predict_proba(toy_data.texts("test"))
    assert first == Probe.from_pretrained(out).predict_proba(toy_data.texts("test"))
