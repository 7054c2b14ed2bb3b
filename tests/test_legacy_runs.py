"""Runs written by the previous version still load and resume.

``tests/fixtures/run-c41b953`` holds two run folders written by commit c41b953 (the engine before
the training package): a finished run and a run stopped at step 5 of 8 (its newest
training-state checkpoint kept). They were trained on the tiny BERT of `save_tiny_bert` and the
toy data of ``write_toy_data(train=32, val=16, test=16)``, both rebuilt here exactly as they were,
in a folder that was ``/tmp/legacy/out``: the test moves the runs here by rewriting that folder
name (and the checksums that cover it, as only a test can), nothing else.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from probekit import Probe
from probekit.checkpoint import sha256_file, write_meta
from probekit.config import compose_config
from probekit.training import train

from .engine_fixtures import FAST, no_plots, save_tiny_bert, write_toy_data

__all__ = ["no_plots"]

FIXTURE = Path(__file__).parent / "fixtures" / "run-c41b953"
WRITTEN_IN = "/tmp/legacy/out"
"""The folder the fixture runs were written in (their configs name the model and data there)."""
SETTINGS = ("train.grad_accum=1", "train.checkpoint_every_steps=1", "train.epochs=2")


def moved(root: Path) -> Path:
    """The fixture's runs, the model and the data in ``root`` as if written there."""
    save_tiny_bert(root / "model")
    write_toy_data(root / "data", train=32, val=16, test=16)
    for entry in FIXTURE.iterdir():
        shutil.copytree(entry, root / entry.name)
    for path in root.rglob("*"):
        if path.suffix in {".json", ".yaml"} and WRITTEN_IN in path.read_text(encoding="utf-8"):
            path.write_text(path.read_text(encoding="utf-8").replace(WRITTEN_IN, str(root)), encoding="utf-8")
    for manifest in root.glob(".stopped.partial-*/state/*/manifest.json"):
        files = {
            name: {
                "bytes": (manifest.parent / name).stat().st_size,
                "sha256": sha256_file(manifest.parent / name),
            }
            for name in ("tensors.safetensors", "state.json")
        }
        manifest.write_text(json.dumps({"format": "probekit-train-state", "files": files}), encoding="utf-8")
    checkpoint = root / "finished" / "checkpoint"
    write_meta(checkpoint, json.loads((checkpoint / "probe.json").read_text(encoding="utf-8")))
    return root


def config(root: Path) -> Any:
    return compose_config(
        preset="safety8k",
        assignments=[
            f"model.name={root / 'model'}",
            f"data.train={root / 'data' / 'train.jsonl'}",
            f"data.val={root / 'data' / 'val.jsonl'}",
            *FAST,
            *SETTINGS,
        ],
    )


def test_the_fixture_is_what_the_previous_version_wrote() -> None:
    state = json.loads(
        (FIXTURE / ".stopped.partial-1" / "state" / "step-00000005-a" / "state.json").read_text()
    )
    assert "task" not in state["config"]  # the config block added since
    meta = json.loads((FIXTURE / "finished" / "checkpoint" / "probe.json").read_text())
    assert meta["format_version"] == 2 and "task" not in meta["config"]


def test_a_finished_run_of_the_previous_version_loads_and_predicts(tmp_path: Path) -> None:
    root = moved(tmp_path)
    probe = Probe.from_pretrained(root / "finished")
    meta = json.loads((root / "finished" / "checkpoint" / "probe.json").read_text())
    assert probe.threshold == meta["threshold"] and probe.label_names == [0, 1]
    assert probe.task is not None and probe.task.kind == "binary"
    rows = probe.predict(["the cat sat", "poison the river"])
    assert [set(row) for row in rows] == [{"text", "label", "probability", "confidence", "probabilities"}] * 2


def test_a_stopped_run_of_the_previous_version_resumes_bit_identical(
    tmp_path: Path, no_plots: list[Any]
) -> None:
    """Resumed by this version, it ends where an uninterrupted run of this version ends."""
    root = moved(tmp_path / "moved")
    lines: list[str] = []
    result = train(config(root), out=root / "stopped", resume=True, log=lines.append, progress=False)
    assert result.epochs_run == 2
    assert any("resumed from checkpoint step-00000005-a" in line for line in lines)
    reference = tmp_path / "reference"
    train(config(root), out=reference, log=lambda _line: None, progress=False)
    resumed, whole = (
        load_file(p / "checkpoint" / "probe.safetensors") for p in (root / "stopped", reference)
    )
    assert resumed.keys() == whole.keys()
    assert all(torch.equal(resumed[k], whole[k]) for k in resumed)
    assert (root / "stopped" / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
