"""The CUDA checks (``pytest -m gpu``; `benchmarks/gpu_check.sh` runs them on a GPU machine).

What probekit does only on a GPU: bf16 autocast with the frozen modules held in bf16, fp16 with
a grad scaler that skips non-finite steps, the activation cache built on the device, a run
killed and resumed bit for bit with deterministic kernels (the CUDA generators restored), and
the memory plan of ``--dry-run`` against what the device really allocated.

Each test takes a ``device``. ``cuda`` runs where torch sees a GPU and is skipped elsewhere;
``cpu`` runs the same test body on the CPU wherever the check means something there, so the
tests themselves keep working between GPU runs (CI runs them).
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import probekit.training
from probekit import memplan
from probekit.config import ProbeConfig
from probekit.training import Callback, RunResult, prepare, train

from .engine_fixtures import ToyData, bert_dir, make_config, no_plots, read_jsonl, toy_data
from .test_resume import MICRO_PER_EPOCH, assert_identical, config_for, stop_at_micro_batch

__all__ = ["bert_dir", "no_plots", "toy_data"]

pytestmark = pytest.mark.gpu

CUDA = pytest.param(
    "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
)
DEVICES = ["cpu", CUDA]


def on(device: str) -> tuple[str, ...]:
    """The assignments that put a run on ``device``."""
    return ("train.cpu=true",) if device == "cpu" else ("train.cpu=false",)


class Where(Callback):
    """Records the trainable weights as the fit starts; at the first window's end, where they are
    and whether deterministic kernels are on; and every window's loss."""

    def __init__(self) -> None:
        self.device: str | None = None
        self.deterministic: bool | None = None
        self.losses: list[float] = []

    def on_fit_start(self, fit: Any) -> None:
        self.start = {n: p.detach().clone() for n, p in fit.probe.named_parameters() if p.requires_grad}

    def moved(self, fit_probe: Any) -> bool:
        """Whether every trainable tensor of ``fit_probe`` changed since the fit started."""
        now = dict(fit_probe.named_parameters())
        return all(not torch.equal(now[n].detach(), before) for n, before in self.start.items())

    def on_window_end(self, fit: Any) -> None:
        if self.device is None:
            self.device = next(fit.probe.head.parameters()).device.type
            self.deterministic = torch.are_deterministic_algorithms_enabled()
        self.losses.append(float(fit.window_loss))


def trained(config: ProbeConfig, out: Path, *callbacks: Callback, **kwargs: Any) -> RunResult:
    return train(config, out=out, log=lambda _l: None, progress=False, callbacks=callbacks, **kwargs)


def numerics(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "report.json").read_text())["numerics"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("device", DEVICES)
def test_a_bf16_run_holds_frozen_modules_in_bf16_and_trains_fp32_on_the_device(
    device: str, bert_dir: Path, toy_data: ToyData, tmp_path: Path, no_plots: list[Any]
) -> None:
    config = make_config(bert_dir, toy_data, *on(device), "train.precision=bf16", "train.epochs=2")
    plan = prepare(config, device=torch.device(device))
    for name, param in plan.probe.named_parameters():
        assert param.dtype == (torch.float32 if param.requires_grad else torch.bfloat16), name
    where = Where()
    result = trained(config, tmp_path / "run", where)
    assert where.device == device
    assert numerics(result.run_dir) == {"precision": "bf16", "skipped_steps": 0, "loss_scale": None}
    assert all(torch.isfinite(torch.tensor(where.losses)))
    saved = load_file(result.run_dir / "checkpoint" / "probe.safetensors")
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in saved.values())
    assert where.moved(result.probe)  # every trainable tensor stepped (bf16 autocast, fp32 masters)


@pytest.mark.parametrize("device", [CUDA])
def test_an_fp16_run_skips_a_non_finite_step_and_goes_on(
    device: str, bert_dir: Path, toy_data: ToyData, tmp_path: Path, no_plots: list[Any]
) -> None:
    """fp16 has a real grad scaler on CUDA: a window whose gradients are poisoned (NaN) is
    skipped and counted, the scale backs off, and the run ends with finite weights."""

    class PoisonFirstWindow(Callback):
        def on_fit_start(self, fit: Any) -> None:
            self.calls = 0
            weight = next(fit.probe.head.parameters())

            def poison(grad: torch.Tensor) -> torch.Tensor:
                self.calls += 1
                return grad * float("nan") if self.calls == 1 else grad

            weight.register_hook(poison)

    config = make_config(bert_dir, toy_data, *on(device), "train.precision=fp16", "train.epochs=2")
    optimiser = Optimiser()
    result = trained(config, tmp_path / "run", PoisonFirstWindow(), optimiser)
    assert optimiser.fused is False  # the scaler must see the skipped step (optim.fused_update)
    facts = numerics(result.run_dir)
    rows = read_jsonl(result.run_dir / "metrics.jsonl")
    # The poisoned window, and perhaps a few early ones that overflow at the initial scale (2^16).
    assert facts["precision"] == "fp16" and facts["skipped_steps"] >= 1
    assert rows[0]["skipped_steps"] >= 1 and sum(r["skipped_steps"] for r in rows) == facts["skipped_steps"]
    assert facts["loss_scale"] is not None and facts["loss_scale"] <= 2.0**15  # backed off
    windows = 2 * len(toy_data.texts("train")) // (8 * 4)
    assert rows[-1]["step"] == windows - facts["skipped_steps"]  # skipped steps are not steps
    saved = load_file(result.run_dir / "checkpoint" / "probe.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())


CACHE_TOLERANCE = {"fp32": (2e-5, 1e-4, 1e-4), "bf16": (2e-3, 1e-2, 2e-2)}
"""(weights atol, rtol, val score atol) of cached against uncached training. bf16: the cache is
built in eval batches, other shapes than the training batches, so bf16 roundings differ."""


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_the_activation_cache_built_on_the_device_trains_as_the_uncached_run(
    device: str, precision: str, bert_dir: Path, toy_data: ToyData, tmp_path: Path, no_plots: list[Any]
) -> None:
    """safety8k's frozen prefix cached on the device (replayed through the trainable block each
    step) gives the weights and validation scores of running the whole backbone every step."""
    runs: dict[bool, tuple[dict[str, torch.Tensor], list[str], Where]] = {}
    for cached in (True, False):
        config = make_config(
            bert_dir,
            toy_data,
            *on(device),
            f"train.precision={precision}",
            "train.deterministic=true",
            f"train.cache.enabled={str(cached).lower()}",
        )
        lines: list[str] = []
        where = Where()
        result = train(
            config, out=tmp_path / f"run-{cached}", log=lines.append, progress=False, callbacks=[where]
        )
        assert where.device == device and where.deterministic is True
        runs[cached] = (load_file(result.run_dir / "checkpoint" / "probe.safetensors"), lines, where)
    (cached_weights, cached_log, _), (weights, log, _) = runs[True], runs[False]
    assert any(line.startswith("activation cache train:") for line in cached_log)
    assert not any(line.startswith("activation cache train:") for line in log)
    atol, rtol, score_atol = CACHE_TOLERANCE[precision]
    assert cached_weights.keys() == weights.keys() and weights
    for name, tensor in weights.items():
        torch.testing.assert_close(cached_weights[name], tensor, atol=atol, rtol=rtol, msg=name)
    val = [
        [row["val_loss"] for row in read_jsonl(tmp_path / f"run-{c}" / "metrics.jsonl")]
        for c in (True, False)
    ]
    assert val[0] == pytest.approx(val[1], abs=score_atol)


class Optimiser(Callback):
    """Records whether every parameter group of the run's AdamW is fused."""

    fused: bool | None = None

    def on_fit_start(self, fit: Any) -> None:
        raw = getattr(fit.optimizer, "optimizer", fit.optimizer)  # inside Accelerate's wrapper
        self.fused = all(group["fused"] for group in raw.param_groups)


@pytest.mark.parametrize("device", DEVICES)
def test_killed_and_resumed_with_deterministic_kernels_is_bit_identical(
    device: str,
    bert_dir: Path,
    toy_data: ToyData,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_plots: list[Any],
) -> None:
    """bf16 autocast, dropout in the trainable block (the device's generator draws it), AdamW
    fused (its ``step`` a tensor on the device), killed mid-accumulation in the second epoch: the
    resumed run ends bit for bit where one that was never stopped does, and deterministic
    kernels were on only while it ran. The cpu case forces torch's CPU fused AdamW through the
    same code (CUDA runs take it by themselves)."""
    if device == "cpu":
        monkeypatch.setattr(probekit.training, "fused_update", lambda *_a, **_k: True)
    config = config_for(bert_dir, toy_data, *on(device), "train.precision=bf16", "train.deterministic=true")
    assert not torch.are_deterministic_algorithms_enabled()
    reference, out = tmp_path / "reference", tmp_path / "run"
    where, optimiser = Where(), Optimiser()
    trained(config, reference, where, optimiser)
    assert where.device == device and where.deterministic is True and optimiser.fused is True
    stop_at_micro_batch(config, out, monkeypatch, MICRO_PER_EPOCH + 5, len(toy_data.texts("train")))
    trained(config, out, resume=True)
    assert_identical(out, reference)
    assert numerics(reference)["precision"] == "bf16"
    assert not torch.are_deterministic_algorithms_enabled()


def wider_bert(bert_dir: Path, hidden: int = 1024) -> tuple[Any, Any]:
    """The tiny BERT's tokenizer with a random 4-block BERT of ``hidden`` width (on the CPU):
    tensors large enough that the CUDA allocator's rounding is negligible against their sizes."""
    import transformers as tf

    config = tf.BertConfig.from_pretrained(bert_dir)
    config.hidden_size, config.intermediate_size, config.num_attention_heads = hidden, 4 * hidden, 8
    torch.manual_seed(0)
    model = tf.BertModel(config)
    model.config.name_or_path = str(bert_dir)
    return model, tf.AutoTokenizer.from_pretrained(bert_dir)


def planned_bytes(config: ProbeConfig, device: str, bert_dir: Path) -> dict[str, int]:
    """The memory plan's parts on the device (the plan's probe is freed on return)."""
    model, tokenizer = wider_bert(bert_dir)
    plan = prepare(config, device=torch.device(device), model=model, tokenizer=tokenizer)
    return memplan.memory_plan(plan)[device]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("device", [CUDA])
def test_the_memory_plan_matches_what_the_device_allocated(
    device: str, precision: str, bert_dir: Path, toy_data: ToyData, tmp_path: Path, no_plots: list[Any]
) -> None:
    """The plan's bytes on the device (weights, gradients, AdamW's moments) are all held at once
    at an optimiser step: the device's peak is at least their sum, and at most that plus what
    the plan says comes on top (activations; autocast's bf16 copies and AdamW's temporaries,
    bounded here by 10 bytes per trainable value; cuBLAS workspaces)."""
    config = make_config(bert_dir, toy_data, *on(device), f"train.precision={precision}", "train.epochs=1")
    planned = planned_bytes(config, device, bert_dir)
    total = sum(planned.values())
    trainable = planned["trainable weights"] // 4  # fp32 values

    class Allocated(Callback):
        after_step = 0

        def on_window_end(self, fit: Any) -> None:
            if not self.after_step:
                torch.cuda.synchronize()
                self.after_step = torch.cuda.memory_allocated()

    gc.collect()
    torch.cuda.empty_cache()
    model, tokenizer = wider_bert(bert_dir)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    allocated = Allocated()
    trained(config, tmp_path / "run", allocated, model=model, tokenizer=tokenizer)
    peak = torch.cuda.max_memory_allocated() - before
    held = planned["frozen weights"] + planned["trainable weights"] + planned["optimizer state"]
    # After a step the gradients may be freed (zero_grad sets them to None); weights and moments stay.
    assert allocated.after_step - before >= 0.98 * held, (allocated.after_step - before, planned)
    assert peak >= 0.98 * total, (peak, planned)
    assert peak <= total + 10 * trainable + 128 * 2**20, (peak, planned)
