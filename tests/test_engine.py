"""The training package end to end on tiny offline backbones.

What the safety8k recipe turns into (optimiser groups, step counts, the learning rate of every
step), how micro-batch losses are normalised over each accumulation window, label smoothing,
early stopping with restore of the best weights, the run folder and its checkpoint, seeds,
precision, a decoder backbone and string labels.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import probekit
import probekit.plots
from probekit import Probe, load_config
from probekit.batching import BucketBatchSampler, Collator, Encoded
from probekit.checkpoint import FORMAT as CHECKPOINT_FORMAT
from probekit.checkpoint import trainable_state, write_meta
from probekit.config import ProbeConfig, compose_config
from probekit.data import DataError
from probekit.distributed import shard_windows
from probekit.errors import DivergedError, UserError
from probekit.evaluate import evaluate_file
from probekit.metrics import compute_metrics
from probekit.optim import build_optimizer
from probekit.plots import REPORT_PLOTS
from probekit.training import Callback, Precision, RunResult, prepare, train
from tests import engine_fixtures
from tests.engine_fixtures import (
    FAST,
    Recorder,
    ToyData,
    leftovers,
    make_config,
    names,
    quiet_train,
    read_jsonl,
    write_toy_data,
)

# Shared fixtures (tiny saved backbones, toy data, one torch thread, no plots).
bert_dir = engine_fixtures.bert_dir
llama_dir = engine_fixtures.llama_dir
toy_data = engine_fixtures.toy_data
no_plots = engine_fixtures.no_plots
single_thread = engine_fixtures.single_thread

ROW_KEYS = {
    "epoch",
    "step",
    "lr_head",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "val_precision",
    "val_recall",
    "val_f1",
    "val_auroc",
    "val_auprc",
    "val_recall_at_1pct_fpr",
    "val_recall_at_5pct_fpr",
    "val_ece",
    "skipped_steps",
    "best",
}
REPORT_KEYS = {
    "activation_cache",
    "batching",
    "distributed",
    "numerics",
    "best_epoch",
    "epochs_run",
    "stopped_early",
    "threshold",
    "threshold_rule",
    "task",
    "loss",
    "metrics",
    "data",
    "plan",
    "finished",
}


def run(config: ProbeConfig, out: Path, **kwargs: Any) -> RunResult:
    """``train`` quietly, without progress bars."""
    return quiet_train(config, out, **kwargs)  # type: ignore[no-any-return]


# -- the recipe reaches the optimiser -----------------------------------------------------------
@pytest.mark.parametrize("n_train", [96, 100, 129])
def test_safety8k_recipe_reaches_the_optimiser(bert_dir: Path, tmp_path: Path, n_train: int) -> None:
    data = write_toy_data(tmp_path / "data", train=n_train, val=16, test=0)
    config = compose_config(
        preset="safety8k",
        assignments=[f"model.name={bert_dir}", *data.assignments(test=False), "train.cpu=true"],
    )
    prepared = prepare(config)

    groups = {g.name: (g.lr, g.weight_decay) for g in prepared.groups}
    assert groups == {
        "head/decay": (2e-4, 0.1),
        "head/no_decay": (2e-4, 0.0),
        "body/decay": (2e-5, 0.1),
        "body/no_decay": (2e-5, 0.0),
    }
    plan = prepared.probe.plan
    assert (plan.frozen_blocks, plan.trainable_blocks) == ((0, 1, 2), (3,))  # 0.625 x 4 = 2.5 -> 3
    body = [n for g in prepared.groups if g.name.startswith("body/") for n in g.names]
    head = [n for g in prepared.groups if g.name.startswith("head/") for n in g.names]
    assert all(n.startswith("backbone.encoder.layer.3.") for n in body)
    assert {n.removeprefix("backbone.") for n in body} == plan.trainable
    assert head and all(n.startswith(("pooler.", "head.")) for n in head)

    # The torch optimiser training builds holds exactly these groups and every trainable tensor.
    optimizer = build_optimizer(prepared.probe, config.optimizer)
    got = sorted((g["name"], g["lr"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups)
    assert got == sorted((g.name, g.lr, g.weight_decay, len(g.params)) for g in prepared.groups)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in prepared.probe.parameters() if p.requires_grad}

    spe = math.ceil(math.ceil(n_train / 8) / 4)
    assert prepared.effective_batch == 32
    assert prepared.steps_per_epoch == spe
    assert prepared.total_steps == 10 * spe
    assert prepared.warmup_steps == spe  # warmup_epochs = 1
    assert prepared.precision == Precision("fp32")
    text = "\n".join(prepared.describe())
    assert "= 32 effective" in text
    assert f"{spe} optimiser steps per epoch, up to {10 * spe} in 10 epochs; warmup {spe} steps" in text


# -- learning rates over steps ------------------------------------------------------------------
def _cosine(step: int) -> float:  # safety8k on 96 rows x 3 epochs: 3 steps an epoch, 9 in all
    return (step + 1) / 3 if step < 3 else 0.5 * (1 + math.cos(math.pi * (step - 2) / 6))


def _linear_floor(step: int) -> float:  # warmup 2 steps, then a line down to 0.1
    return (step + 1) / 2 if step < 2 else 0.1 + 0.9 * (1 - (step - 1) / 7)


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        pytest.param((), _cosine, id="safety8k-cosine"),
        pytest.param(
            ("scheduler.kind=linear", "scheduler.warmup_steps=2", "scheduler.min_lr_ratio=0.1"),
            _linear_floor,
            id="linear-with-floor",
        ),
    ],
)
def test_learning_rate_of_every_step_follows_the_schedule(
    bert_dir: Path,
    toy_data: ToyData,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_plots: list[Any],
    schedule: tuple[str, ...],
    expected: Any,
) -> None:
    recorder = Recorder()
    config = make_config(bert_dir, toy_data, "train.epochs=3", *schedule)
    run(config, tmp_path / "run", callbacks=[recorder])
    group_names, lrs = recorder.group_names, recorder.lrs

    spe, total = 3, 9
    lam = config.scheduler.lr_lambda(total, spe)
    assert len(lrs) == total, "one optimiser step per accumulation window"
    for step, row in enumerate(lrs):
        for name, lr in zip(group_names, row, strict=True):
            base = 2e-4 if name.startswith("head") else 2e-5
            assert lr == pytest.approx(base * lam(step), rel=1e-9, abs=1e-15), (step, name)
            assert lr == pytest.approx(base * expected(step), rel=1e-9, abs=1e-15), (step, name)
    head = [row[group_names.index("head/decay")] for row in lrs]
    warmup = config.scheduler.warmup_length(total, spe)
    assert all(a < b for a, b in pairwise(head[:warmup]))
    assert head[warmup - 1] == pytest.approx(2e-4)
    assert all(a >= b for a, b in pairwise(head[warmup - 1 :]))
    assert head[-1] == pytest.approx(2e-4 * config.scheduler.decay(1.0), abs=1e-15)  # cosine: 0

    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [3, 6, 9]
    assert [r["lr_head"] for r in rows] == pytest.approx([2e-4 * lam(e * spe) for e in (1, 2, 3)], abs=1e-15)


# -- accumulation normalisation (the windows themselves: tests/test_distributed.py) ------------
@pytest.mark.parametrize("cached", [True, False], ids=["cached", "uncached"])
def test_accumulated_gradient_equals_the_mean_gradient_of_each_window(
    bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_plots: list[Any], cached: bool
) -> None:
    """44 rows, micro-batches of 8, 4 per step: windows of 32 and 12 examples (a short last one).

    Cached, the steps read pooled features from the activation cache; the reference recomputes
    them through the backbone."""
    data = write_toy_data(tmp_path / "data", train=44, val=16, test=0)
    config = make_config(
        bert_dir,
        data,
        "train.epochs=1",
        "freezer.kind=all",  # no dropout anywhere: the reference forward pass is the same function
        "head.kind=linear",
        "train.max_grad_norm=null",
        "train.label_smoothing=0.1",
        f"train.cache.enabled={str(cached).lower()}",
        test=False,
    )
    checks: list[tuple[int, list[torch.Tensor], tuple[torch.Tensor, ...]]] = []

    class Check(Callback):
        """Before each optimiser step: the accumulated gradients, and the gradient of the mean
        loss over the window's rows computed in one go through the backbone."""

        def on_fit_start(self, fit: Any) -> None:
            plan, probe = fit.plan, fit.probe
            assert (plan.cache_plan is not None) == cached
            spec = plan.config.train
            order = BucketBatchSampler(
                plan.encoded["train"].lengths,
                plan.per_device_batch,
                seed=spec.seed,
                bucket_batches=spec.bucket_batches,
            ).batches(0)
            rows: dict[int, list[int]] = {}
            for micro in shard_windows(order, plan.accumulation, 1, 0):
                rows.setdefault(micro.window, []).extend(micro.rows)
            windows = [rows[w] for w in sorted(rows)]
            collate = Collator(plan.encoded["train"], plan.pad_id)
            raw = getattr(fit.optimizer, "optimizer", fit.optimizer)
            params = [p for g in raw.param_groups for p in g["params"]]

            def check(opt: Any, args: Any, kwargs: Any) -> None:
                batch = collate(windows[len(checks)])
                with torch.enable_grad():
                    logits = probe(batch.input_ids, batch.attention_mask).float()
                    mean_loss = F.cross_entropy(logits, batch.labels, label_smoothing=0.1)
                    reference = torch.autograd.grad(mean_loss, params)
                checks.append((len(batch), [p.grad.detach().clone() for p in params], reference))

            raw.register_step_pre_hook(check)

    run(config, tmp_path / "run", callbacks=[Check()])

    assert [size for size, _, _ in checks] == [32, 12]
    for _, got, reference in checks:
        assert len(got) == len(reference) > 0
        for g, r in zip(got, reference, strict=True):
            assert float(r.abs().max()) > 1e-4  # a real gradient, not zeros on both sides
            torch.testing.assert_close(g, r, rtol=0.0, atol=1e-6)


# -- label smoothing ----------------------------------------------------------------------------
@pytest.mark.parametrize("smoothing", [None, 0.25], ids=["safety8k-0.1", "set-0.25"])
def test_training_loss_is_label_smoothed_cross_entropy(
    bert_dir: Path,
    toy_data: ToyData,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_plots: list[Any],
    smoothing: float | None,
) -> None:
    calls: list[dict[str, Any]] = []
    real = F.cross_entropy

    def recording(logits: torch.Tensor, target: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = real(logits, target, *args, **kwargs)
        calls.append(
            {
                "training": torch.is_grad_enabled() and not torch.is_inference_mode_enabled(),
                "smoothing": kwargs.get("label_smoothing", 0.0),
                "reduction": kwargs.get("reduction", "mean"),
                "logits": logits.detach().clone(),
                "target": target.clone(),
                "loss": float(loss.detach()),
            }
        )
        return loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", recording)
    extra = () if smoothing is None else (f"train.label_smoothing={smoothing}",)
    config = make_config(bert_dir, toy_data, "train.epochs=1", *extra)
    eps = 0.1 if smoothing is None else smoothing
    assert config.train.label_smoothing == eps
    run(config, tmp_path / "run")

    training = [c for c in calls if c["training"]]
    evaluation = [c for c in calls if not c["training"]]
    assert len(training) == 12  # 96 rows in micro-batches of 8
    assert {(c["smoothing"], c["reduction"]) for c in training} == {(eps, "sum")}
    assert evaluation and {c["smoothing"] for c in evaluation} == {0.0}  # val loss is not smoothed
    for c in training:  # the smoothed loss written out: (1 - eps) NLL + eps x mean over classes
        logp = torch.log_softmax(c["logits"].double(), dim=-1)
        nll = -logp.gather(1, c["target"].unsqueeze(1)).squeeze(1)
        expected = ((1 - eps) * nll - eps * logp.mean(dim=-1)).sum()
        assert c["loss"] == pytest.approx(float(expected), rel=1e-5)
    row = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    assert row["train_loss"] == pytest.approx(sum(c["loss"] for c in training) / 96, rel=1e-6)


# -- early stopping and restore of the best weights ---------------------------------------------
@pytest.mark.parametrize(
    ("monitor", "values"),
    [("auroc", [0.6, 0.9, 0.8, 0.7]), ("loss", [0.7, 0.4, 0.5, 0.6])],
)
def test_early_stop_restores_the_best_epoch(
    bert_dir: Path,
    toy_data: ToyData,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_plots: list[Any],
    monitor: str,
    values: list[float],
) -> None:
    """The monitored value peaks at epoch 2; patience 2 stops after epoch 4 of 5. The values come
    from a task plugin (registered for the test) that scripts what validation measures."""
    from probekit.config import ThresholdSpec
    from probekit.tasks import BinaryTask, BinaryTaskSpec
    from probekit.tasks.base import Scores

    scripted = iter(values)

    class ScriptedTask(BinaryTask):
        def epoch_metrics(self, scores: Scores) -> dict[str, float]:
            metrics = super().epoch_metrics(scores)
            self.value = next(scripted)
            if monitor == "auroc":
                metrics["auroc"] = self.value
            return metrics

        def monitor(self, metric: str, scores: Scores, metrics: Any) -> float:
            return self.value

    class ScriptedSpec(BinaryTaskSpec):
        kind: Literal["scripted_binary"] = "scripted_binary"  # type: ignore[assignment]

        def build(self, threshold: ThresholdSpec) -> BinaryTask:
            return ScriptedTask(threshold)

    recorder = Recorder()
    config_args = (
        "train.epochs=5",
        "train.patience=2",
        f"train.monitor={monitor}",
        "optimizer.lr_head=0.01",
        "optimizer.lr_body=0.001",
        "train.grad_accum=1",
    )
    out = tmp_path / "run"
    with probekit.isolated_registries() as registries:
        registries["tasks"].register(ScriptedSpec)
        config = make_config(bert_dir, toy_data, "task.kind=scripted_binary", *config_args, test=False)
        result = run(config, out, callbacks=[recorder])
        probs = Probe.from_pretrained(out).predict_proba(toy_data.texts("val"))

    assert (result.stopped_early, result.epochs_run, result.best_epoch) == (True, 4, 2)
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["best"] for r in rows] == [True, True, False, False]
    if monitor == "auroc":
        assert [r["val_auroc"] for r in rows] == values
    report = json.loads((out / "report.json").read_text())
    assert (report["stopped_early"], report["epochs_run"], report["best_epoch"]) == (True, 4, 2)

    saved = load_file(str(out / "checkpoint" / "probe.safetensors"))
    best, last = recorder.weights[1], recorder.weights[3]
    assert set(saved) == set(best)
    assert all(torch.equal(saved[k], best[k]) for k in saved), "checkpoint is not the epoch-2 weights"
    assert any(not torch.equal(best[k], last[k]) for k in best), "weights did not move after epoch 2"
    np.testing.assert_allclose(probs, recorder.val[1].scores, rtol=0, atol=1e-5)
    assert not np.allclose(probs, recorder.val[3].scores, rtol=0, atol=1e-5)


# -- a shared run: reload, checkpoint, run folder ------------------------------------------------
@pytest.fixture(scope="module")
def bert_run(bert_dir: Path, toy_data: ToyData, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A 3-epoch safety8k run (lr 1e-2 head / 3e-3 body, no accumulation) with the real plots."""
    out = tmp_path_factory.mktemp("bert-run") / "run"
    config = make_config(
        bert_dir,
        toy_data,
        "train.epochs=3",
        "train.grad_accum=1",
        "optimizer.lr_head=0.01",
        "optimizer.lr_body=0.003",
    )
    lines: list[str] = []
    recorder = Recorder()
    result = train(config, out=out, log=lines.append, progress=False, callbacks=[recorder])
    return SimpleNamespace(
        dir=out, config=config, result=result, val_probs=recorder.best_val.scores, log=lines
    )


def test_run_folder_layout(bert_run: SimpleNamespace) -> None:
    out, result = bert_run.dir, bert_run.result
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint",
        "config.yaml",
        "metrics.jsonl",
        "plots",
        "report.json",
        "steps.jsonl",
        "summary.txt",
    ]
    assert leftovers(out.parent) == []
    assert load_config(out / "config.yaml") == bert_run.config

    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3] and result.epochs_run == 3
    assert all(set(r) == ROW_KEYS for r in rows)
    assert rows == json.loads(json.dumps(result.history))

    report = json.loads((out / "report.json").read_text())
    assert set(report) == REPORT_KEYS
    assert report["metrics"] == json.loads(json.dumps(result.metrics))
    assert set(report["metrics"]) == {"val", "test"}
    assert report["threshold"] == result.threshold and report["threshold_rule"] == "max_f1"
    assert report["best_epoch"] == result.best_epoch == max(rows, key=lambda r: r["val_auroc"])["epoch"]
    assert report["data"]["label_map"] == {"0": 0, "1": 1}
    assert report["data"]["truncated"] == {"train": 0, "val": 0, "test": 0}
    assert any(line.startswith("parameter groups:") for line in report["plan"])

    plots = out / "plots"
    assert sorted(p.name for p in plots.iterdir()) == sorted(REPORT_PLOTS)
    assert all((plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in REPORT_PLOTS)
    assert (out / "summary.txt").read_text() == "\n".join(result.summary()[1:]) + "\n"
    assert any(line.startswith("best epoch") for line in bert_run.log)


def test_the_probe_learns_the_toy_signal(bert_run: SimpleNamespace) -> None:
    metrics = bert_run.result.metrics
    assert metrics["val"]["auroc"] > 0.8, metrics
    assert metrics["test"]["auroc"] > 0.8, metrics


def test_reloaded_probe_reproduces_the_training_probabilities(
    bert_run: SimpleNamespace, toy_data: ToyData
) -> None:
    texts = toy_data.texts("val")
    first = Probe.from_pretrained(bert_run.dir)
    second = Probe.from_pretrained(bert_run.dir / "checkpoint")
    probs = first.predict_proba(texts)
    assert probs == second.predict_proba(texts)  # exact, float for float
    assert probs == first.predict_proba(texts)
    np.testing.assert_allclose(probs, bert_run.val_probs, rtol=0, atol=1e-6)
    np.testing.assert_allclose(first.predict_proba(texts, batch_size=5), probs, rtol=0, atol=1e-6)
    assert first.threshold == bert_run.result.threshold
    assert first.label_names == [0, 1]
    assert not first.training
    for row, p in zip(first.predict(texts), probs, strict=True):
        assert row["probability"] == p
        assert row["label"] == (1 if p >= first.threshold else 0)


@pytest.mark.parametrize("split", ["val", "test"])
def test_evaluate_file_matches_the_reloaded_probe_and_the_report(
    bert_run: SimpleNamespace, toy_data: ToyData, tmp_path: Path, split: str
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(bert_run.dir, run_dir)
    metrics, written, _ = evaluate_file(run_dir, toy_data.path(split))
    assert written == run_dir / "eval" / f"{split}.json"
    assert json.loads(written.read_text()) == metrics
    probe = Probe.from_pretrained(run_dir)
    probs = np.asarray(probe.predict_proba(toy_data.texts(split)), dtype=np.float64)
    expected = compute_metrics(np.asarray(toy_data.labels(split)), probs, bert_run.result.threshold)
    extra = {"data", "confusion", "intervals", "bootstrap"}  # what eval adds (tests/test_eval_cli.py)
    assert {k: v for k, v in metrics.items() if k not in extra} == expected
    assert metrics["data"] == str(toy_data.path(split))
    reported = bert_run.result.metrics[split]
    for key in ("auroc", "auprc", "ece", "accuracy", "f1", "threshold", "n", "positives"):
        assert metrics[key] == pytest.approx(reported[key], abs=1e-6), key


def test_checkpoint_holds_only_trained_tensors(bert_run: SimpleNamespace) -> None:
    from probekit.hub import load_backbone

    saved = load_file(str(bert_run.dir / "checkpoint" / "probe.safetensors"))
    fresh = Probe.from_config(bert_run.config, load_backbone(bert_run.config.model).model)
    assert set(saved) == set(trainable_state(fresh))
    frozen = {f"backbone.{name}" for name in fresh.plan.frozen}
    assert frozen and not frozen & set(saved)
    assert all(k.startswith(("pooler.", "head.", "backbone.")) for k in saved)
    body = [k for k in saved if k.startswith("backbone.")]
    assert body and all(k.startswith("backbone.encoder.layer.3.") for k in body)
    assert any(k.startswith("head.") for k in saved)
    assert len(saved) < len(dict(fresh.named_parameters()))


def test_probe_json_describes_the_checkpoint(bert_run: SimpleNamespace, bert_dir: Path) -> None:
    folder = bert_run.dir / "checkpoint"
    meta = json.loads((folder / "probe.json").read_text())
    assert {"config", "label_map", "label_names", "threshold", "backbone", "weights", "versions"} <= set(meta)
    assert meta["format"] == "probekit-checkpoint"
    assert meta["config"] == bert_run.config.model_dump(mode="json")
    assert meta["label_map"] == {"0": 0, "1": 1} and meta["label_names"] == [0, 1]
    assert meta["threshold"] == bert_run.result.threshold
    backbone = meta["backbone"]
    assert backbone["name"] == str(bert_dir)
    assert (backbone["model_type"], backbone["num_blocks"], backbone["hidden_size"]) == ("bert", 4, 32)
    assert "local folder" in backbone["provenance"]
    versions = meta["versions"]
    assert versions["probekit"] == probekit.__version__ and versions["torch"] == torch.__version__
    assert {"python", "transformers", "accelerate", "safetensors"} <= set(versions)
    weights = folder / meta["weights"]["file"]
    assert meta["weights"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert meta["weights"]["tensors"] == len(load_file(str(weights)))


def test_damaged_or_missing_weights_are_refused(bert_run: SimpleNamespace, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(bert_run.dir, run_dir)
    weights = run_dir / "checkpoint" / "probe.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"probe\.safetensors: checksum does not match probe\.json"):
        Probe.from_pretrained(run_dir)
    weights.unlink()
    with pytest.raises(UserError, match="missing checkpoint weights"):
        Probe.from_pretrained(run_dir)
    with pytest.raises(UserError, match="no such run folder"):
        Probe.from_pretrained(tmp_path / "nowhere")


def test_a_checkpoint_with_a_0_dim_scalar_mix_scale_still_loads(
    bert_dir: Path, toy_data: ToyData, tmp_path: Path, no_plots: list[Any]
) -> None:
    """scalar_mix's scale is shape (1,) now (FSDP cannot shard 0-dim parameters); a checkpoint
    that holds it 0-dim, as earlier versions wrote it, loads to the same probe."""
    config = make_config(bert_dir, toy_data, "pooler.combine=scalar_mix", "train.epochs=1")
    run(config, tmp_path / "run")
    texts = toy_data.texts("val")[:8]
    expected = Probe.from_pretrained(tmp_path / "run").predict_proba(texts)
    folder = tmp_path / "run" / "checkpoint"
    state = load_file(str(folder / "probe.safetensors"))
    assert state["pooler.mix_scale"].shape == (1,)
    state["pooler.mix_scale"] = state["pooler.mix_scale"].reshape(())
    save_file(state, str(folder / "probe.safetensors"), metadata={"format": CHECKPOINT_FORMAT})
    meta = json.loads((folder / "probe.json").read_text())
    meta["weights"]["sha256"] = hashlib.sha256((folder / "probe.safetensors").read_bytes()).hexdigest()
    write_meta(folder, meta)  # format version 2: the checksums cover the edited weights.sha256 too
    assert Probe.from_pretrained(tmp_path / "run").predict_proba(texts) == expected


# -- the run folder appears whole or not at all -------------------------------------------------
@pytest.mark.parametrize("existing", [False, True], ids=["new-out", "overwrite-existing"])
@pytest.mark.parametrize("where", ["epoch-2", "plots"])
def test_a_failed_run_leaves_no_folder_behind(
    bert_dir: Path,
    toy_data: ToyData,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
    existing: bool,
) -> None:
    out = tmp_path / "runs" / "run"
    if existing:  # an earlier run (--overwrite replaces nothing else)
        out.mkdir(parents=True)
        (out / "old.txt").write_text("the previous run")
        (out / "report.json").write_text("{}")

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    class FailsAtEpoch2(Callback):
        def on_epoch_end(self, fit: Any) -> None:
            if fit.row["epoch"] == 2:  # after epoch 1's checkpoint and metrics.jsonl row
                boom()

    callbacks: list[Callback] = []
    if where == "epoch-2":
        callbacks.append(FailsAtEpoch2())
    else:  # fail while writing the last outputs
        monkeypatch.setattr(probekit.plots, "write_report_plots", boom)

    with pytest.raises(RuntimeError, match="boom"):
        run(make_config(bert_dir, toy_data, test=False), out, overwrite=existing, callbacks=callbacks)
    visible = [n for n in names(out.parent) if not n.startswith(".")]
    assert visible == (["run"] if existing else [])
    if existing:
        assert names(out) == ["old.txt", "report.json"]
    # The unfinished run stays hidden, kept only for its checkpoints (nothing learned is lost);
    # --resume finishes it.
    (partial,) = leftovers(out.parent)
    assert (partial / "state").is_dir()
    monkeypatch.undo()
    result = run(make_config(bert_dir, toy_data, test=False), out, resume=True)
    assert result.epochs_run == 2 and leftovers(out.parent) == []
    assert "state" not in names(out)


def test_a_non_empty_out_is_refused_before_training(
    bert_dir: Path, toy_data: ToyData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class NeverStarts(Callback):
        def on_fit_start(self, fit: Any) -> None:
            raise AssertionError("training started")

    config = make_config(bert_dir, toy_data, test=False)
    out = tmp_path / "run"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty; pass --overwrite"):
        run(config, out, callbacks=[NeverStarts()])
    assert names(out) == ["mine.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="exists and is a file"):
        run(config, tmp_path / "file", callbacks=[NeverStarts()])
    assert names(tmp_path) == ["file", "run"]


def test_overwrite_replaces_an_earlier_run_and_leaves_nothing_behind(
    bert_dir: Path, toy_data: ToyData, tmp_path: Path, no_plots: list[Any]
) -> None:
    out = tmp_path / "run"
    config = make_config(bert_dir, toy_data, "train.epochs=1", test=False)
    run(config, out)
    (out / "notes.txt").write_text("the previous run")
    run(config, out, overwrite=True)
    assert (out / "report.json").is_file() and (out / "checkpoint" / "probe.safetensors").is_file()
    assert not (out / "notes.txt").exists()
    assert names(tmp_path) == ["run"], "the replaced folder was left behind as .run.old-PID"


@pytest.mark.parametrize("existing", ["folder", "file"])
def test_overwrite_never_replaces_what_probekit_did_not_write(
    bert_dir: Path, toy_data: ToyData, tmp_path: Path, existing: str
) -> None:
    """``--overwrite`` replaced any folder (or file) there: a typo in --out could delete a user's
    documents. It replaces an earlier probekit run folder only."""
    out = tmp_path / "run"
    if existing == "folder":
        out.mkdir()
        (out / "old.txt").write_text("mine")
    else:
        out.write_text("not a run folder")
    with pytest.raises(UserError, match="--out"):
        run(make_config(bert_dir, toy_data, "train.epochs=1", test=False), out, overwrite=True)
    assert (out / "old.txt").read_text() == "mine" if existing == "folder" else out.read_text()
    assert names(tmp_path) == ["run"]


def test_a_non_finite_loss_stops_the_run_with_exit_code_3(
    bert_dir: Path, toy_data: ToyData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = F.cross_entropy

    def nan_when_training(*args: Any, **kwargs: Any) -> torch.Tensor:
        loss = real(*args, **kwargs)
        training = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        return loss * float("nan") if training else loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", nan_when_training)
    with pytest.raises(DivergedError, match="non-finite loss at epoch 1, step 1") as caught:
        run(make_config(bert_dir, toy_data, test=False), tmp_path / "run")
    assert caught.value.exit_code == 3
    assert names(tmp_path) == []


def test_target_fpr_threshold_is_the_lowest_within_the_budget(
    bert_dir: Path, toy_data: ToyData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_plots: list[Any]
) -> None:
    recorder = Recorder()
    config = make_config(
        bert_dir,
        toy_data,
        "threshold.target_fpr=0.1",
        "optimizer.lr_head=0.01",
        "train.grad_accum=1",
        test=False,
    )
    out = tmp_path / "run"
    result = run(config, out, callbacks=[recorder])
    report = json.loads((out / "report.json").read_text())
    assert report["threshold_rule"] == "target_fpr=0.1"
    assert json.loads((out / "checkpoint" / "probe.json").read_text())["threshold"] == result.threshold
    probs, labels = recorder.best_val.scores, recorder.best_val.labels
    negatives = probs[labels == 0]
    assert (negatives >= result.threshold).mean() <= 0.1
    below = probs[probs < result.threshold]
    if below.size:  # one step lower would flag too many negatives
        assert (negatives >= below.max()).mean() > 0.1
    assert report["metrics"]["val"]["threshold"] == result.threshold


# -- seeds ---------------------------------------------------------------------------------------
def test_the_seed_decides_the_run(
    bert_dir: Path, toy_data: ToyData, tmp_path: Path, no_plots: list[Any]
) -> None:
    """Dropout (head 0.2, trainable block 0.1), head init and data order all follow train.seed."""

    def once(seed: int, name: str) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor], RunResult]:
        config = make_config(bert_dir, toy_data, f"train.seed={seed}", "optimizer.lr_head=0.01")
        result = run(config, tmp_path / name)
        rows = read_jsonl(tmp_path / name / "metrics.jsonl")
        return rows, load_file(str(tmp_path / name / "checkpoint" / "probe.safetensors")), result

    rows_a, weights_a, result_a = once(0, "a")
    torch.manual_seed(1234)  # the global RNG state before a run must not matter
    rows_b, weights_b, result_b = once(0, "b")
    rows_c, weights_c, _ = once(1, "c")

    assert not any("time" in key or "second" in key for key in rows_a[0])
    assert rows_a == rows_b
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert (result_a.threshold, result_a.metrics) == (result_b.threshold, result_b.metrics)
    assert rows_a != rows_c
    assert any(not torch.equal(weights_a[k], weights_c[k]) for k in weights_a)


# -- precision -----------------------------------------------------------------------------------
def test_resolve_precision_on_the_cpu() -> None:
    cpu = torch.device("cpu")
    assert Precision.resolve("auto", cpu) == Precision("fp32")
    assert Precision.resolve("fp32", cpu).dtype is None
    bf16 = Precision.resolve("bf16", cpu)
    assert (bf16.name, bf16.dtype, bf16.mixed, str(bf16)) == ("bf16", torch.bfloat16, True, "bf16")
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        Precision.resolve("fp16", cpu)


@pytest.mark.parametrize("bf16_units", [True, False])
def test_resolve_precision_on_a_gpu(bf16_units: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """What each setting means on a CUDA device with and without bf16 support (the device is
    stood in for: only its support flags are read)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *_a, **_k: bf16_units)
    cuda = torch.device("cuda")
    assert Precision.resolve("auto", cuda) == Precision("bf16" if bf16_units else "fp32")
    assert Precision.resolve("fp16", cuda).dtype is torch.float16
    if bf16_units:
        assert Precision.resolve("bf16", cuda).dtype is torch.bfloat16
    else:
        with pytest.raises(
            UserError, match=r"^train.precision: this GPU does not support bf16; use fp16 or auto$"
        ):
            Precision.resolve("bf16", cuda)


def test_fp16_on_the_cpu_is_refused_before_anything_is_written(
    bert_dir: Path, toy_data: ToyData, tmp_path: Path
) -> None:
    config = make_config(bert_dir, toy_data, "train.precision=fp16", test=False)
    with pytest.raises(UserError, match="fp16"):
        run(config, tmp_path / "run")
    assert names(tmp_path) == []


# -- a decoder backbone --------------------------------------------------------------------------
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_llama_shaped_backbone_trains(
    llama_dir: Path,
    toy_data: ToyData,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_plots: list[Any],
    padding_side: str,
) -> None:
    config = make_config(llama_dir, toy_data, f"model.padding_side={padding_side}", test=False)
    prepared = prepare(config)
    tokenizer = prepared.backbone.tokenizer
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert prepared.probe.layout.model_type == "llama"
    assert prepared.probe.plan.trainable_blocks == (3,)

    pad_ids: list[int] = []
    masks: list[torch.Tensor] = []
    real_init, real_call = Collator.__init__, Collator.__call__

    def init(self: Collator, encoded: Encoded, pad_id: int, *args: Any, **kwargs: Any) -> None:
        real_init(self, encoded, pad_id, *args, **kwargs)
        pad_ids.append(pad_id)

    def call(self: Collator, indices: Any) -> Any:
        out = real_call(self, indices)
        # The activation cache is computed right-padded (it stores real tokens only); every
        # batch the probe trains or evaluates on is padded on the configured side.
        if self.left == (padding_side == "left"):
            masks.append(out.attention_mask)
        return out

    monkeypatch.setattr(Collator, "__init__", init)
    monkeypatch.setattr(Collator, "__call__", call)
    recorder = Recorder()
    out = tmp_path / "run"
    result = run(config, out, callbacks=[recorder])
    monkeypatch.undo()

    assert set(pad_ids) == {tokenizer.eos_token_id}
    padded = [m for m in masks if not m.all()]
    assert padded, "no batch needed padding"
    edge = 0 if padding_side == "left" else -1  # the padded end of every padded batch
    assert all(not m[:, edge].all() for m in padded)
    assert all(m[:, -1 - edge].all() for m in masks)  # every row's text touches the other end
    assert result.epochs_run == 2
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in result.history)
    meta = json.loads((out / "checkpoint" / "probe.json").read_text())
    assert meta["backbone"]["model_type"] == "llama"
    probe = Probe.from_pretrained(out)
    assert probe.tokenizer.pad_token == "</s>" and probe.tokenizer.padding_side == padding_side
    np.testing.assert_allclose(
        probe.predict_proba(toy_data.texts("val")), recorder.best_val.scores, rtol=0, atol=1e-5
    )


def test_a_relative_model_folder_is_saved_as_an_absolute_path(
    bert_dir: Path, toy_data: ToyData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_plots: list[Any]
) -> None:
    monkeypatch.chdir(bert_dir.parent)
    config = make_config(Path(bert_dir.name), toy_data, "train.epochs=1", test=False)
    assert config.model.name == bert_dir.name
    out = tmp_path / "run"
    run(config, out)
    assert load_config(out / "config.yaml").model.name == str(bert_dir.resolve())
    meta = json.loads((out / "checkpoint" / "probe.json").read_text())
    assert meta["config"]["model"]["name"] == str(bert_dir.resolve())
    monkeypatch.chdir(tmp_path)
    assert len(Probe.from_pretrained(out).predict_proba(["the cat sat"])) == 1


# -- string labels -------------------------------------------------------------------------------
def test_string_labels_through_the_label_map(bert_dir: Path, tmp_path: Path, no_plots: list[Any]) -> None:
    data = write_toy_data(tmp_path / "data", train=64, val=32, test=32, names=("safe", "unsafe"))
    with pytest.raises(DataError, match=r"data\.label_map"):
        prepare(make_config(bert_dir, data))
    config = make_config(bert_dir, data, 'data.label_map={"safe": 0, "unsafe": 1}', "train.epochs=1")
    out = tmp_path / "run"
    run(config, out)

    meta = json.loads((out / "checkpoint" / "probe.json").read_text())
    assert meta["label_map"] == {"safe": 0, "unsafe": 1}
    assert meta["label_names"] == ["safe", "unsafe"]
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["label_map"] == {"safe": 0, "unsafe": 1}
    assert report["metrics"]["test"]["positives"] == 16  # "unsafe" is class 1

    probe = Probe.from_pretrained(out)
    rows = probe.predict(data.texts("test"))
    assert {row["label"] for row in rows} <= {"safe", "unsafe"}
    for row in rows:
        assert row["label"] == ("unsafe" if row["probability"] >= probe.threshold else "safe")
    metrics = evaluate_file(out, data.path("test")).metrics
    assert (metrics["n"], metrics["positives"]) == (32, 16)


def test_fast_assignments_are_valid() -> None:
    """The shared speed-ups stay valid config paths (a typo would silently be a --set error)."""
    config = compose_config(preset="safety8k", assignments=list(FAST))
    assert (config.train.epochs, config.train.cpu, config.model.max_length) == (2, True, 16)


def test_relative_data_paths_are_saved_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from probekit.training.plan import absolute_paths

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "all.jsonl").write_text('{"text": "a", "label": 0}\n', encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    fixed = absolute_paths(probekit.compose_config(preset="safety8k", data="d/all.jsonl"))
    assert fixed.data.path == str(tmp_path / "d" / "all.jsonl")
    missing = absolute_paths(probekit.compose_config(preset="safety8k", data="nope.jsonl"))
    assert missing.data.path == "nope.jsonl"  # only existing paths are resolved; the error stays the user's
