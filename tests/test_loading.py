# ruff: noqa: F811  (pytest fixtures imported by name)
"""How backbone weights are held (`probekit.loading`): ``model.dtype``, fp32 master weights for
every part that trains, ``device_map`` / ``low_cpu_mem_usage`` passed through, and quantised frozen
blocks (bitsandbytes is a CUDA library: its config path and the "trainable parts are never
quantised" rule are tested here with stand-ins; loading for real belongs to the GPU check)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import probekit
from probekit.errors import ConfigError, UserError
from probekit.training import prepare, train
from tests.engine_fixtures import (  # noqa: F401  (fixtures)
    ToyData,
    bert_dir,
    llama_dir,
    make_config,
    quiet,
    run_cli,
    toy_data,
)

HALF_RUN = ("model.dtype=bf16", "train.precision=bf16")


def checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_auto_on_the_cpu_loads_fp32_as_before(bert_dir: Path, toy_data: ToyData) -> None:
    plan = prepare(make_config(bert_dir, toy_data))
    assert {p.dtype for p in plan.probe.parameters()} == {torch.float32}
    assert plan.weights_note is None


def test_half_precision_frozen_blocks_with_exact_fp32_master_weights(
    bert_dir: Path, toy_data: ToyData
) -> None:
    plan = prepare(make_config(bert_dir, toy_data, *HALF_RUN))
    probe, saved = plan.probe, checkpoint(bert_dir)
    frozen, trainable = plan.probe.plan.frozen_blocks, plan.probe.plan.trainable_blocks
    assert frozen and trainable
    for name, param in probe.backbone.named_parameters():
        block = probe.layout.block_of(name)
        if block in frozen or (block is None and probe.layout.is_embedding(name)):
            assert param.dtype == torch.bfloat16, name
        else:
            # fp32, and exactly the checkpoint's values, not a bf16 round trip
            assert param.dtype == torch.float32, name
            assert torch.equal(param.detach(), saved[name]), name
    assert {p.dtype for p in [*probe.head.parameters(), *probe.pooler.parameters()]} <= {torch.float32}
    assert any(
        re.fullmatch(
            r"  weights: frozen blocks held in bf16; \d+ tensors of the trainable parts in fp32 "
            r"\(\d+ read again from the checkpoint in full precision\)",
            line,
        )
        for line in plan.describe()
    )


def test_a_half_precision_run_trains_and_its_probe_predicts(
    bert_dir: Path, toy_data: ToyData, tmp_path: Path
) -> None:
    config = make_config(bert_dir, toy_data, *HALF_RUN)
    result = train(config, out=tmp_path / "run", log=quiet, progress=False)
    assert result.probe is not None
    texts = toy_data.texts("test")[:4]
    held = result.probe.predict_proba(texts)  # bf16 frozen blocks: predict autocasts
    reloaded = probekit.Probe.from_pretrained(tmp_path / "run")  # loads in fp32 for inference
    assert reloaded.predict_proba(texts) == pytest.approx(held, abs=0.02)


def test_half_precision_weights_need_autocast_of_that_dtype(
    bert_dir: Path, toy_data: ToyData, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(UserError) as caught:
        prepare(make_config(bert_dir, toy_data, "model.dtype=bf16"))
    assert str(caught.value) == (
        "model.dtype=bf16: frozen weights held in bf16 need train.precision=bf16 (autocast between "
        "them and the fp32 parts); this run computes in fp32; set train.precision=bf16 or model.dtype=auto"
    )
    code, _out, err = run_cli(
        capsys,
        "train",
        "--model",
        str(bert_dir),
        "--data",
        str(toy_data.path("train").parent),
        "--set",
        "model.dtype=bf16",
        "--set",
        "train.cpu=true",
        "--out",
        str(tmp_path / "r"),
        "--dry-run",
    )
    assert code == 2 and err.count("\n") == 1 and "model.dtype=bf16" in err


def test_a_half_precision_model_you_loaded_trains_under_autocast(
    bert_dir: Path, toy_data: ToyData, tmp_path: Path
) -> None:
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(bert_dir, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(bert_dir)
    with pytest.raises(UserError, match=r"^model=: its weights are bf16 but this run computes in fp32; set "):
        prepare(make_config(bert_dir, toy_data), model=model, tokenizer=tokenizer)
    result = train(
        make_config(bert_dir, toy_data, "train.precision=bf16"),
        out=tmp_path / "run",
        model=model,
        tokenizer=tokenizer,
        log=quiet,
        progress=False,
    )
    assert result.probe is not None and result.probe.backbone is model  # not copied
    blocks = result.probe.layout.blocks(model)
    assert next(blocks[0].parameters()).dtype == torch.bfloat16  # frozen: as given
    assert next(blocks[-1].parameters()).dtype == torch.float32  # trains: fp32 master weights


def test_a_model_passed_in_keeps_its_own_weights(bert_dir: Path, toy_data: ToyData) -> None:
    """Its trainable blocks are cast up in place, never replaced by the checkpoint's values."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(bert_dir, dtype=torch.bfloat16)
    top = model.encoder.layer[-1].output.dense.weight
    with torch.no_grad():
        top.add_(1.0)  # the user's own change, not in the checkpoint
    mine = top.detach().float().clone()
    plan = prepare(
        make_config(bert_dir, toy_data, "train.precision=bf16"),
        model=model,
        tokenizer=AutoTokenizer.from_pretrained(bert_dir),
    )
    now = plan.probe.backbone.encoder.layer[-1].output.dense.weight
    assert now.dtype == torch.float32 and torch.equal(now.detach(), mine)
    assert any(line.endswith("(cast up from bf16 in place: the model passed in)") for line in plan.describe())


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("model.dtype=fp64", "model.dtype: Input should be 'auto', 'fp32', 'bf16' or 'fp16'"),
        ("model.device_map=gpu", "model.device_map"),
        ('model.device_map={"layers.0": "cuda:x"}', "model.device_map"),
        ('model.device_map={"../x": 0}', "model.device_map"),
        ('model.quantization={"bits": 3}', "model.quantization.bits: Input should be 4 or 8"),
        ('model.quantization={"bits": 4, "quant_type": "int4"}', "model.quantization.quant_type"),
    ],
)
def test_loading_settings_are_checked_in_the_spec(assignment: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        probekit.compose_config(preset="safety8k", assignments=[assignment])
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_device_map_and_low_cpu_mem_usage_pass_through(
    bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModel

    from probekit.hub import ModelSpec, load_backbone

    seen: dict[str, Any] = {}
    original = AutoModel.from_pretrained

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModel, "from_pretrained", spy)
    loaded = load_backbone(ModelSpec(name=str(bert_dir), device_map="cpu", low_cpu_mem_usage=False))
    assert seen["device_map"] == "cpu" and seen["low_cpu_mem_usage"] is False
    assert seen["dtype"] == torch.float32 and "quantization_config" not in seen
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}


def test_a_backbone_spread_over_devices_is_refused_in_one_line(bert_dir: Path, toy_data: ToyData) -> None:
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(bert_dir)
    model.hf_device_map = {"embeddings": 0, "encoder": 1, "pooler": "cpu"}
    with pytest.raises(UserError) as caught:
        prepare(
            make_config(bert_dir, toy_data), model=model, tokenizer=AutoTokenizer.from_pretrained(bert_dir)
        )
    assert str(caught.value).startswith(
        "model=: the backbone is spread over 0, 1, cpu; a run trains on one device"
    )
    model.hf_device_map = {"": "cpu"}  # one device: fine
    prepare(make_config(bert_dir, toy_data), model=model, tokenizer=AutoTokenizer.from_pretrained(bert_dir))


# -- quantisation -----------------------------------------------------------------------------------
def test_only_frozen_blocks_are_quantised(llama_dir: Path, toy_data: ToyData) -> None:
    """The skip list transformers gets names every linear layer outside the frozen blocks, found on
    a weightless (meta) copy of the backbone before anything loads."""
    from transformers import AutoConfig

    from probekit.loading import not_quantised, skeleton

    config = make_config(llama_dir, toy_data)
    probe = skeleton(config, AutoConfig.from_pretrained(llama_dir))
    assert {p.device.type for p in probe.backbone.parameters()} == {"meta"}
    skip = not_quantised(probe)
    last = probe.layout.num_blocks - 1
    linears = [n for n, m in probe.backbone.named_modules() if isinstance(m, nn.Linear)]
    in_trainable = [n for n in linears if probe.layout.block_of(f"{n}.weight") == last]
    in_frozen = [n for n in linears if n not in in_trainable]
    assert in_trainable and sorted(re.escape(n) for n in in_trainable) == sorted(skip)
    from transformers.quantizers.quantizers_utils import should_convert_module

    assert not any(should_convert_module(n, skip) for n in in_trainable)
    assert all(should_convert_module(n, skip) for n in in_frozen)


def test_without_bitsandbytes_quantisation_is_one_line(
    bert_dir: Path, toy_data: ToyData, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(UserError) as caught:
        prepare(make_config(bert_dir, toy_data, 'model.quantization={"bits": 4}'))
    assert str(caught.value) == (
        "model.quantization: 4-bit loading needs bitsandbytes, which is not installed "
        "(pip install bitsandbytes; it runs on CUDA GPUs)"
    )


def test_the_quantisation_config_keeps_trainable_layers_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from probekit.hub import ModelSpec
    from probekit.loading import quantization_config

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes" else real(name, *a)
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    spec = ModelSpec(quantization={"bits": 4, "compute_dtype": "bf16"})  # type: ignore[arg-type]
    made = quantization_config(spec, ["layers\\.3\\.mlp\\.up_proj"])
    assert made.load_in_4bit and made.bnb_4bit_quant_type == "nf4" and made.bnb_4bit_use_double_quant
    assert made.bnb_4bit_compute_dtype == torch.bfloat16
    assert made.llm_int8_skip_modules == ["layers\\.3\\.mlp\\.up_proj"]
    eight = quantization_config(ModelSpec(quantization={"bits": 8}), [])  # type: ignore[arg-type]
    assert eight.load_in_8bit and not eight.load_in_4bit


class Int8Linear(nn.Module):
    """A stand-in for a bitsandbytes 8-bit layer: int8 weights and a float scale."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        scale = linear.weight.detach().abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
        self.weight = nn.Parameter(
            (linear.weight.detach() / scale).round().to(torch.int8), requires_grad=False
        )
        self.register_buffer("scale", scale)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ (self.weight.float() * self.scale).to(x.dtype).t()
        return out if self.bias is None else out + self.bias


def quantise_blocks(model: nn.Module, blocks: list[nn.Module]) -> None:
    for block in blocks:
        for name, module in list(block.named_modules()):
            if isinstance(module, nn.Linear):
                parent_name, _, leaf = name.rpartition(".")
                setattr(block.get_submodule(parent_name) if parent_name else block, leaf, Int8Linear(module))


def test_a_quantised_backbone_trains_its_head_in_fp32(
    bert_dir: Path, toy_data: ToyData, tmp_path: Path
) -> None:
    """Frozen blocks quantised (the stand-in): the run trains, pooler and head are fp32, and the
    trainable block is untouched."""
    from transformers import AutoModel, AutoTokenizer

    from probekit.backbone import locate

    model = AutoModel.from_pretrained(bert_dir)
    layout = locate(model)
    blocks = layout.blocks(model)
    quantise_blocks(model, list(blocks)[:-1])
    config = make_config(bert_dir, toy_data)
    result = train(
        config,
        out=tmp_path / "run",
        model=model,
        tokenizer=AutoTokenizer.from_pretrained(bert_dir),
        log=quiet,
        progress=False,
    )
    assert result.probe is not None
    assert {p.dtype for p in [*result.probe.head.parameters(), *result.probe.pooler.parameters()]} == {
        torch.float32
    }
    assert all(p.dtype == torch.float32 and p.requires_grad for p in blocks[-1].parameters())


def test_a_quantised_block_that_would_train_is_refused(bert_dir: Path, toy_data: ToyData) -> None:
    from transformers import AutoModel, AutoTokenizer

    from probekit.backbone import locate

    model = AutoModel.from_pretrained(bert_dir)
    quantise_blocks(model, list(locate(model).blocks(model)))  # every block, the top one too
    config = make_config(bert_dir, toy_data)
    with pytest.raises(UserError) as caught:
        prepare(config, model=model, tokenizer=AutoTokenizer.from_pretrained(bert_dir))
    message = str(caught.value)
    assert re.fullmatch(
        r"freezer: backbone parameter encoder\.layer\.3\.\S+\.weight is quantised \(int8\) but the freezing "
        r"plan trains it; only frozen blocks may be quantised: freeze its block or load the backbone "
        r"unquantised",
        message,
    ), message
