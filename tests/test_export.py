"""``probekit export`` to ONNX: every task, built-in pooler and head and the attention plugin give
PyTorch's scores within 1e-4 through ONNX Runtime on both padding sides; blocks above the highest
pooled layer are not in the graph; the export runs where torch cannot be imported; bad exports,
tampered folders and unfit backends are one-line errors that leave nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import probekit
from probekit.config import compose_config
from probekit.errors import UserError
from probekit.export import TOLERANCE, export_onnx
from probekit.exported import ExportedProbe, max_difference
from probekit.probe import Probe

from .engine_fixtures import (
    WORDS,
    ToyData,
    bert_dir,
    leftovers,
    llama_dir,
    run_cli,
    tiny_binary_run,
    toy_data,
)

__all__ = ["bert_dir", "llama_dir", "toy_data"]

onnx = pytest.importorskip("onnx", reason="export needs the onnx extra (onnx, onnxruntime)")
pytest.importorskip("onnxruntime", reason="export needs the onnx extra (onnx, onnxruntime)")


BLOCK_TORCH = textwrap.dedent(
    """
    import sys

    class Blocked:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers"):
                raise ImportError(f"{name} is blocked in this test")

    sys.meta_path.insert(0, Blocked())
    """
)
"""Put first in a script: from there on, importing torch or transformers fails."""


def without_torch(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a fresh interpreter where torch and transformers cannot be imported."""
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        timeout=300,
    )


@pytest.fixture(scope="module")
def trained(bert_dir: Path, toy_data: ToyData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained binary run (1 epoch, linear head)."""
    return tiny_binary_run(bert_dir, toy_data, tmp_path_factory.mktemp("trained"))


def quiet(_line: str) -> None:
    """A ``log`` that drops the lines."""


def texts(count: int = 12, seed: int = 0) -> list[str]:
    """Texts of 1 to 40 toy words (the longest past a max_length of 32 tokens)."""
    rng = np.random.default_rng(seed)
    lengths = [1, 40, *rng.integers(1, 20, count - 2).tolist()]
    return [" ".join(rng.choice(WORDS, n).tolist()) for n in lengths]


def saved(
    model: Path, folder: Path, *assignments: str, labels: list[Any] | None = None, seed: int = 0
) -> Path:
    """A probe built in code from safety8k with ``assignments`` (random head, no training),
    saved where `Probe.from_pretrained` and `export_onnx` read it."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    probekit.discover()  # the attention plugin
    config = compose_config(
        preset="safety8k", assignments=[f"model.name={model}", "model.max_length=32", *assignments]
    )
    torch.manual_seed(seed)
    probe = probekit.build(config, AutoModel.from_pretrained(model))
    probe.attach(tokenizer=AutoTokenizer.from_pretrained(model), label_names=labels or [0, 1], threshold=0.4)
    probe.eval()
    return probe.save_pretrained(folder)


def agree(run: Path, export: Path, rows: list[str]) -> float:
    """The largest difference between PyTorch and ONNX Runtime on ``rows``, both padding sides,
    in one batch and one row at a time."""
    reference = np.asarray(Probe.from_pretrained(run).predict_proba(rows), dtype=np.float64)
    exported = ExportedProbe(export)
    ids = exported.encode(rows)
    worst = 0.0
    for side in ("left", "right"):
        for batch in (len(rows), 1, 5):
            worst = max(worst, max_difference(reference, exported.scores(ids, batch, padding_side=side)))  # type: ignore[arg-type]
    return worst


POOLERS_AND_HEADS = {
    "safety8k (multilayer mean of masked means, mlp)": (),
    "masked_mean, linear": ('pooler={"kind": "masked_mean", "layer": -1}', "head.kind=linear"),
    "cls": ('pooler={"kind": "cls", "layer": 3}',),
    "max": ('pooler={"kind": "max", "layer": 2}',),
    "last_token": ('pooler={"kind": "last_token", "layer": -1}',),
    "multilayer concat at pooled": (
        'pooler={"kind": "multilayer", "layers": [1, 3], "combine": "concat", "combine_at": "pooled"}',
    ),
    "multilayer scalar_mix at tokens": (
        'pooler={"kind": "multilayer", "layers": [0, 2, 4], "combine": "scalar_mix", "combine_at": "tokens"}',
    ),
    "ema": ('pooler={"kind": "ema", "layer": -1, "alpha": 0.3}',),
    "rolling_max": ('pooler={"kind": "rolling_max", "layer": 3, "window": 3}',),
    "attention plugin": ('pooler={"kind": "attention", "layer": -2}',),
}


@pytest.mark.parametrize("case", list(POOLERS_AND_HEADS))
def test_every_pooler_and_head_exports_on_an_encoder(case: str, bert_dir: Path, tmp_path: Path) -> None:
    run = saved(bert_dir, tmp_path / "run", *POOLERS_AND_HEADS[case])
    result = export_onnx(run, tmp_path / "onnx", log=quiet)
    assert result.max_abs_diff <= TOLERANCE
    assert agree(run, tmp_path / "onnx", texts()) <= TOLERANCE


@pytest.mark.parametrize("pooler", ["last_token", "masked_mean"])
def test_a_left_padded_decoder_exports(pooler: str, llama_dir: Path, tmp_path: Path) -> None:
    run = saved(
        llama_dir, tmp_path / "run", f'pooler={{"kind": "{pooler}", "layer": -2}}', "model.padding_side=left"
    )
    export_onnx(run, tmp_path / "onnx", log=quiet)
    manifest = json.loads((tmp_path / "onnx" / "probe.json").read_text())
    assert manifest["padding_side"] == "left"
    assert agree(run, tmp_path / "onnx", texts(seed=1)) <= TOLERANCE


TASKS = {
    "multiclass with a negative class": (
        ("task.kind=multiclass", "task.negative_class=none", "head.num_classes=3"),
        ["none", "poison", "bomb"],
    ),
    "multilabel": (
        ("task.kind=multilabel", "head.num_classes=2", 'data.label_fields=["poison", "bomb"]'),
        ["poison", "bomb"],
    ),
    "regression": (("task.kind=regression", "head.num_classes=1", "train.monitor=mae"), None),
}


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_exports_and_predicts_as_pytorch(task: str, bert_dir: Path, tmp_path: Path) -> None:
    assignments, labels = TASKS[task]
    run = saved(bert_dir, tmp_path / "run", *assignments, labels=labels)
    export_onnx(run, tmp_path / "onnx", log=quiet)
    rows = texts(seed=2)
    assert agree(run, tmp_path / "onnx", rows) <= TOLERANCE
    torch_rows = Probe.from_pretrained(run).predict(rows)
    onnx_rows = ExportedProbe(tmp_path / "onnx").predict(rows)
    for a, b in zip(torch_rows, onnx_rows, strict=True):
        assert a.keys() == b.keys() and a["text"] == b["text"]
        if "label" in a:
            assert a["label"] == b["label"] or task == "regression"
    as_array = ExportedProbe(tmp_path / "onnx").predict_proba(rows, as_array=True)
    np.testing.assert_allclose(
        as_array,
        Probe.from_pretrained(run).predict_proba(rows, as_array=True),
        atol=TOLERANCE,
        rtol=TOLERANCE,
    )


def test_blocks_above_the_highest_pooled_layer_are_left_out(bert_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModel

    run = saved(bert_dir, tmp_path / "run", 'pooler={"kind": "masked_mean", "layer": 2}', "head.kind=linear")
    export_onnx(run, tmp_path / "onnx", log=quiet)
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"))
    stored = sum(int(np.prod(t.dims)) for t in graph.graph.initializer)
    model = AutoModel.from_pretrained(bert_dir)
    used = sum(
        p.numel()
        for n, p in model.named_parameters()
        if n.startswith(("embeddings.", "encoder.layer.0.", "encoder.layer.1."))
    )
    above = sum(
        p.numel()
        for n, p in model.named_parameters()
        if n.startswith(("encoder.layer.2.", "encoder.layer.3."))
    )
    head = 32 * 2 + 2
    # blocks 3 and 4 (layer.2, layer.3) are absent: what is stored is what blocks 1 and 2, the
    # embeddings and the head hold (constant folding may drop or merge a few of their values)
    assert 0.9 * (used + head) <= stored < used + head + above // 4
    assert not [t.name for t in graph.graph.initializer if ".layer.2." in t.name or ".layer.3." in t.name]


def test_the_export_runs_without_torch(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "onnx"
    export_onnx(trained, out, log=quiet)
    rows = texts(seed=3)
    expected = Probe.from_pretrained(trained).predict_proba(rows)
    script = """
        import json, sys
        folder, rows = sys.argv[1], json.loads(sys.argv[2])

        # 1. probekit's runtime for exports
        from probekit.exported import ExportedProbe
        probe = ExportedProbe(folder)
        through_probekit = probe.predict_proba(rows)
        labels = [row["label"] for row in probe.predict(rows)]

        # 2. onnxruntime and tokenizers alone, as docs/deploy.md shows
        import numpy as np
        import onnxruntime as ort
        from tokenizers import Tokenizer

        meta = json.load(open(f"{folder}/probe.json"))
        tokenizer = Tokenizer.from_file(f"{folder}/tokenizer.json")
        tokenizer.no_padding()
        tokenizer.enable_truncation(meta["max_length"])
        encoded = [e.ids for e in tokenizer.encode_batch(rows)]
        width = max(map(len, encoded))
        ids = np.full((len(rows), width), meta["pad_id"], dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, row in enumerate(encoded):
            ids[i, : len(row)], mask[i, : len(row)] = row, 1
        session = ort.InferenceSession(f"{folder}/model.onnx", providers=["CPUExecutionProvider"])
        (scores,) = session.run(["scores"], {"input_ids": ids, "attention_mask": mask})
        assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules)
        print(json.dumps({"probekit": through_probekit, "alone": scores.tolist(), "labels": labels}))
        """
    done = without_torch(script, str(out), json.dumps(rows))
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert max_difference(np.asarray(expected), np.asarray(answer["probekit"])) <= TOLERANCE
    assert max_difference(np.asarray(expected), np.asarray(answer["alone"])) <= TOLERANCE
    threshold = Probe.from_pretrained(trained).threshold
    assert answer["labels"] == [int(p >= threshold) for p in expected]


def test_probe_from_pretrained_loads_an_export(trained: Path, tmp_path: Path) -> None:
    export_onnx(trained, tmp_path / "onnx", log=quiet)
    loaded = Probe.from_pretrained(tmp_path / "onnx")
    assert isinstance(loaded, ExportedProbe)
    rows = texts(seed=4)
    assert loaded.predict_proba(rows) == pytest.approx(
        Probe.from_pretrained(trained).predict_proba(rows), abs=TOLERANCE
    )
    assert loaded.predict(rows[0])["text"] == rows[0]  # one string, one dict


# -- the command line ---------------------------------------------------------------------------
def test_cli_export_predict_and_int8(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "onnx"
    code, stdout, err = run_cli(capsys, "export", trained, "--out", out, "--quantize", "int8")
    assert code == 0, err
    assert stdout.startswith(f"exported to {out}: model.int8.onnx, model.onnx, tokenizer")
    assert "matches PyTorch within" in err
    manifest = json.loads((out / "probe.json").read_text())
    assert (
        manifest["check"]["max_abs_diff"] <= TOLERANCE and manifest["check"]["int8_max_abs_diff"] is not None
    )
    assert manifest["versions"]["onnxruntime"] and manifest["target"] == "binary"
    assert not leftovers(tmp_path)

    rows = texts(seed=5)[:4]
    _, from_run, _ = run_cli(capsys, "predict", trained, *rows)
    code, from_onnx, err = run_cli(capsys, "predict", out, *rows)
    assert code == 0, err
    for a, b in zip(from_run.splitlines(), from_onnx.splitlines(), strict=True):
        x, y = json.loads(a), json.loads(b)
        assert x["label"] == y["label"] and abs(x["probability"] - y["probability"]) <= TOLERANCE
    code, int8, err = run_cli(capsys, "predict", out, "--backend", "onnx-int8", *rows)
    assert code == 0 and len(int8.splitlines()) == 4, err
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"id": f"r{i}", "text": t}) + "\n" for i, t in enumerate(rows)))
    code, csv_out, err = run_cli(capsys, "predict", out, "--input", inputs, "--format", "csv")
    assert code == 0, err
    assert csv_out.splitlines()[0].startswith("id,text,label,probability") and "r3," in csv_out

    code, _, err = run_cli(capsys, "export", trained, "--out", out)
    assert code == 2 and "--overwrite" in err, err
    code, _, err = run_cli(capsys, "export", trained, "--out", out, "--overwrite")
    assert code == 0 and not (out / "model.int8.onnx").exists(), err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("export", "{run}", "--out", "{tmp}/x", "--format", "tflite"), "--format 'tflite': expected onnx"),
        (("export", "{run}", "--out", "{tmp}/x", "--quantize", "int4"), "--quantize 'int4': expected int8"),
        (("export", "{tmp}/nowhere", "--out", "{tmp}/x"), "nowhere: no such run folder"),
        (("predict", "{run}", "--backend", "onnx", "hi"), "is a run folder; export it first"),
        (
            ("predict", "{run}", "--backend", "tpu", "hi"),
            "--backend 'tpu': expected auto, torch, onnx or onnx-int8",
        ),
        (("predict", "{onnx}", "--backend", "torch", "hi"), "is an ONNX export; it runs with --backend onnx"),
        (
            ("predict", "{onnx}", "--per-token", "hi"),
            "--per-token, --show-positions and --plot need the run folder",
        ),
        (("predict", "{onnx}", "--backend", "onnx-int8", "hi"), "has no model.int8.onnx"),
    ],
)
def test_bad_export_and_backend_options_are_one_line(
    args: tuple[str, ...],
    message: str,
    trained: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    exported = tmp_path / "onnx"
    export_onnx(trained, exported, log=quiet)
    argv = [a.format(run=trained, tmp=tmp_path, onnx=exported) for a in args]
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 2 and stdout == "", err
    assert err.startswith("probekit: error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "x").exists()


# -- untrusted export folders and failed checks ---------------------------------------------------
def test_a_tampered_or_damaged_export_is_refused(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "onnx"
    export_onnx(trained, out, log=quiet)
    original = (out / "probe.json").read_text()
    data = (out / "model.onnx").read_bytes()
    (out / "model.onnx").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(UserError, match=r"model.onnx: its SHA-256 does not match probe.json"):
        ExportedProbe(out)
    (out / "model.onnx").write_bytes(data)
    manifest = json.loads(original)
    manifest["files"]["../outside"] = "0" * 64
    (out / "probe.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"'../outside' is not a file of the export folder"):
        ExportedProbe(out)
    manifest = json.loads(original)
    manifest["max_length"] = -3
    (out / "probe.json").write_text(json.dumps(manifest))
    with pytest.raises(
        UserError, match=r"probe.json: max_length: Input should be greater than or equal to 1"
    ):
        ExportedProbe(out)
    (out / "probe.json").write_text("{not json")
    with pytest.raises(UserError, match="not readable JSON"):
        ExportedProbe(out)


def test_an_export_that_differs_from_pytorch_fails_and_leaves_nothing(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = ExportedProbe.scores

    def off(self: ExportedProbe, *args: Any, **kwargs: Any) -> np.ndarray:
        return real(self, *args, **kwargs) + 3e-4

    monkeypatch.setattr(ExportedProbe, "scores", off)
    with pytest.raises(
        UserError, match=r"differ from PyTorch's by 0.0003 on the check texts \(allowed 0.0001\)"
    ):
        export_onnx(trained, tmp_path / "onnx", log=quiet)
    assert not (tmp_path / "onnx").exists() and not leftovers(tmp_path)


def test_a_component_without_an_export_path_is_named(
    bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from probekit.registry import POOLERS

    run = saved(bert_dir, tmp_path / "run", 'pooler={"kind": "attention", "layer": -2}')
    spec = POOLERS.get("attention")
    monkeypatch.setattr(spec, "exportable", False, raising=False)
    with pytest.raises(
        probekit.errors.PluginError,
        match=r"pooler 'attention' from probekit-attention-pool .*has no ONNX export path",
    ):
        export_onnx(run, tmp_path / "onnx", log=quiet)
    assert not (tmp_path / "onnx").exists()


def test_a_chat_probe_is_refused_in_one_line(tmp_path: Path, bert_dir: Path) -> None:
    run = saved(bert_dir, tmp_path / "run", 'data.positions={"last_n": 2}')
    with pytest.raises(UserError, match=r"data.positions: this probe reads some token positions only"):
        export_onnx(run, tmp_path / "onnx", log=quiet)
    assert not (tmp_path / "onnx").exists()


def test_cli_predict_on_an_export_imports_no_torch(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "onnx"
    export_onnx(trained, out, log=quiet)
    script = """
        import sys
        from probekit.cli import main

        sys.exit(main(["predict", sys.argv[1], sys.argv[2]]))
        """
    text = texts(seed=6)[0]
    done = without_torch(script, str(out), text)
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout)
    expected = Probe.from_pretrained(trained).predict(text)
    assert (
        row["label"] == expected["label"] and abs(row["probability"] - expected["probability"]) <= TOLERANCE
    )


def test_a_graph_that_fails_in_onnx_runtime_is_one_line(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: ExportedProbe, *args: Any, **kwargs: Any) -> np.ndarray:
        raise RuntimeError("Non-zero status code returned while running Gather node\nsecond line")

    monkeypatch.setattr(ExportedProbe, "scores", broken)
    with pytest.raises(
        UserError, match=r"the ONNX graph fails on the check texts \(right padding, batch 9\): Non-zero"
    ):
        export_onnx(trained, tmp_path / "onnx", log=quiet)
    assert not (tmp_path / "onnx").exists() and not leftovers(tmp_path)
