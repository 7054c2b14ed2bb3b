"""How a backbone's weights are held: the load dtype (``model.dtype``), fp32 master weights for
every part that trains, and quantised frozen blocks (``model.quantization``).

The rule is the one mixed precision already follows: frozen blocks and frozen embeddings may be
held in half precision (or quantised), everything else of the backbone (trainable blocks, a final
norm, a pooler layer) is fp32, and probekit's own pooler and head are always built in fp32.
Loading in half precision goes straight from the checkpoint to half (transformers never builds
fp32 weights first); the parts that train are then read again from the checkpoint's safetensors
files in full precision, so their master weights are exactly the checkpoint's, not a rounded copy.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from probekit.backbone import half_dtypes
from probekit.cache import DTYPES
from probekit.errors import UserError

if TYPE_CHECKING:
    from probekit.config import ProbeConfig
    from probekit.hub import LoadedBackbone, ModelSpec
    from probekit.probe import Probe
    from probekit.training.context import Precision

HALF = {name: DTYPES[name] for name in ("bf16", "fp16")}
NAMES = {dtype: name for name, dtype in DTYPES.items()}


def load_dtype(spec: ModelSpec, precision: Precision) -> torch.dtype:
    """The dtype the backbone loads in: ``auto`` is the dtype its frozen blocks compute in (the
    autocast dtype under mixed precision, else fp32); ``bf16``/``fp16`` must be that dtype.

    Raises:
        UserError: ``model.dtype`` half precision in a run that computes in another dtype (a
            frozen bf16 block would feed fp32 blocks without autocast in between).
    """
    if spec.dtype == "auto":
        return precision.dtype or torch.float32
    if spec.dtype == "fp32":
        return torch.float32
    wanted = HALF[spec.dtype]
    if precision.dtype != wanted:
        raise UserError(
            f"model.dtype={spec.dtype}: frozen weights held in {spec.dtype} need train.precision="
            f"{spec.dtype} (autocast between them and the fp32 parts); this run computes in "
            f"{precision}; set train.precision={spec.dtype} or model.dtype=auto"
        )
    return wanted


def given_dtype_check(model: nn.Module, precision: Precision) -> None:
    """A model passed in half precision trains only under autocast of that dtype."""
    halves = sorted(NAMES[dtype] for dtype in half_dtypes(model))
    if halves and (len(halves) > 1 or precision.dtype != HALF[halves[0]]):
        raise UserError(
            f"model=: its weights are {', '.join(halves)} but this run computes in {precision}; set "
            f"train.precision={halves[0]} (autocast), or pass a float32 model"
        )


def _module_names(root: nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in root.named_modules()}


def held_modules(probe: Probe) -> list[str]:
    """Qualified names (in the backbone) of the modules that may be held in half precision or
    quantised: frozen blocks and frozen embeddings."""
    names = _module_names(probe.backbone)
    return [names[id(module)] for module in probe.frozen_modules()]


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(f"{p}.") or p == "" for p in prefixes)


def master_names(probe: Probe) -> list[str]:
    """Backbone parameters and floating buffers outside the held modules: they stay fp32."""
    held = held_modules(probe)
    found = [n for n, _ in probe.backbone.named_parameters() if not _under(n, held)]
    found += [n for n, b in probe.backbone.named_buffers() if b.is_floating_point() and not _under(n, held)]
    return found


def keep_fp32(
    probe: Probe, backbone: LoadedBackbone, dtype: torch.dtype, *, from_checkpoint: bool = True
) -> str | None:
    """Make every backbone parameter outside the held modules an fp32 master weight: exactly the
    checkpoint's values where its safetensors hold them (``from_checkpoint``; never for a model
    passed in, whose weights may not be the checkpoint's), else the loaded values cast up (a note
    says how many). Returns a line for the plan, or None when the backbone loaded in fp32."""
    names = master_names(probe)
    half = [n for n in names if _tensor(probe.backbone, n).dtype in HALF.values()]
    if dtype == torch.float32 and not half:
        return None
    exact = _checkpoint_tensors(backbone, half, probe.backbone) if from_checkpoint and half else {}
    for name in half:
        tensor = _tensor(probe.backbone, name)
        value = exact.get(name)
        full = value.to(tensor.device, torch.float32) if value is not None else tensor.detach().float()
        _set_tensor(probe.backbone, name, full)
    upcast = len(half) - len(exact)
    held = NAMES.get(dtype, str(dtype))
    if not from_checkpoint:
        where = f"cast up from {held} in place: the model passed in"
    else:
        where = f"{len(exact)} read again from the checkpoint in full precision" + (
            f", {upcast} cast up from {held}" if upcast else ""
        )
    return (
        f"weights: frozen blocks held in {held}; {len(names)} tensors of the trainable parts in fp32 "
        f"({where if half else 'already fp32'})"
    )


def _tensor(root: nn.Module, name: str) -> torch.Tensor:
    module_name, _, leaf = name.rpartition(".")
    module = root.get_submodule(module_name)
    value = getattr(module, leaf)
    assert isinstance(value, torch.Tensor)
    return value


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = root.get_submodule(module_name)
    if leaf in module._parameters:
        old = module._parameters[leaf]
        assert old is not None
        module._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[leaf] = value


def _checkpoint_files(backbone: LoadedBackbone) -> list[Path]:
    folder = Path(backbone.location)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(
                snapshot_download(
                    backbone.location,
                    revision=backbone.revision,
                    local_files_only=True,
                    allow_patterns=["*.safetensors"],
                )
            )
        except Exception:  # not in the local cache: the loaded values are cast up instead
            return []
    return sorted(folder.glob("*.safetensors"))


def _checkpoint_tensors(
    backbone: LoadedBackbone, names: list[str], model: nn.Module
) -> dict[str, torch.Tensor]:
    """The checkpoint's own values of ``names`` (checkpoint keys may carry the base model's
    prefix, ``bert.`` or ``model.``); only tensors of the right shape are taken."""
    from safetensors import safe_open

    wanted = set(names)
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    found: dict[str, torch.Tensor] = {}
    for file in _checkpoint_files(backbone):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118  (safe_open is not a mapping)
                    name = key.removeprefix(f"{prefix}.") if prefix and key.startswith(f"{prefix}.") else key
                    if name in wanted and name not in found:
                        value = handle.get_tensor(key)
                        if tuple(value.shape) == tuple(_tensor(model, name).shape):
                            found[name] = value
        except Exception:  # a file safetensors cannot read: those tensors are cast up instead
            continue
    return found


def backbone_for(
    config: ProbeConfig, precision: Precision, model: Any, tokenizer: Any
) -> tuple[LoadedBackbone, torch.dtype]:
    """The backbone ``config.model`` names, loaded in its dtype (frozen blocks quantised with
    ``model.quantization``), or the ``model`` given, checked against the run's precision."""
    from probekit.hub import given_backbone, hub_options, load_backbone, resolve_location

    if model is not None:
        given = given_backbone(model, tokenizer, config.model)
        one_device(given.model, "model=")
        given_dtype_check(given.model, precision)
        halves = half_dtypes(given.model)
        return given, halves[0] if halves else torch.float32
    dtype = load_dtype(config.model, precision)
    quantization = None
    if config.model.quantization is not None:
        from transformers import AutoConfig

        location, _ = resolve_location(config.model)
        model_config = AutoConfig.from_pretrained(
            location,
            revision=config.model.revision,
            trust_remote_code=config.model.trust_remote_code,
            **hub_options(config.model, location),
        )
        quantization = quantization_config(config.model, not_quantised(skeleton(config, model_config)))
    loaded = load_backbone(config.model, dtype, quantization)
    one_device(loaded.model, "model.device_map")
    return loaded, dtype


def one_device(model: nn.Module, where: str) -> None:
    """A backbone dispatched over several devices (``hf_device_map``) is refused in one line:
    training places the whole probe on one device (FSDP shards over several)."""
    mapped = getattr(model, "hf_device_map", None) or {}
    devices = sorted({str(device) for device in mapped.values()})
    if len(devices) > 1:
        raise UserError(
            f"{where}: the backbone is spread over {', '.join(devices)}; a run trains on one device "
            "(a device_map that puts the whole model on one device works; to spread a model too large "
            "for one GPU, shard it over processes: docs/distributed.md)"
        )


# -- quantisation ----------------------------------------------------------------------------------
def skeleton(config: ProbeConfig, model_config: Any) -> Probe:
    """The probe ``config`` builds, on a backbone with no weights (the meta device): its freezing
    plan and module names, for what to quantise and for the memory plan, without loading."""
    from transformers import AutoModel

    from probekit.probe import Probe

    with torch.device("meta"):
        model = AutoModel.from_config(model_config)  # type: ignore[no-untyped-call]
    return Probe.from_config(config, model)


def not_quantised(probe: Probe) -> list[str]:
    """Module names (regular expressions, as transformers matches ``llm_int8_skip_modules``) of
    every linear layer outside the held modules: the trainable blocks and anything else of the
    backbone that is not a frozen block stay unquantised."""
    held = held_modules(probe)
    return [
        re.escape(name)
        for name, module in probe.backbone.named_modules()
        if name and _is_linear(module) and not _under(name, held)
    ]


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def quantization_config(spec: ModelSpec, skip: list[str]) -> Any:
    """The ``BitsAndBytesConfig`` of ``model.quantization``, with ``skip`` left unquantised.

    Raises:
        UserError: bitsandbytes is not installed, or there is no CUDA device.
    """
    from transformers import BitsAndBytesConfig

    quant = spec.quantization
    assert quant is not None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(
            f"model.quantization: {quant.bits}-bit loading needs bitsandbytes, which is not installed "
            "(pip install bitsandbytes; it runs on CUDA GPUs)"
        )
    if not torch.cuda.is_available():
        raise UserError(
            f"model.quantization: {quant.bits}-bit bitsandbytes weights need a CUDA GPU; none is "
            "available here (remove model.quantization to train on the CPU)"
        )
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[quant.compute_dtype]
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)  # type: ignore[no-untyped-call]
    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        llm_int8_skip_modules=skip,
    )
