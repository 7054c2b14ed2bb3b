"""The run context: device, process group and precision, resolved once per run.

`RunContext.start` makes the Accelerator (device, process group, autocast, the fp16 grad
scaler), wraps its process group (`probekit.distributed.Group`), seeds every generator, and
decides who speaks: only the main process logs and shows progress bars. Everything after reads
the context; nothing re-resolves the device or the precision.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch

from probekit.distributed import Group, make_accelerator
from probekit.errors import UserError

Log = Callable[[str], None]
"""Where progress lines go (one line per call)."""

PrecisionName = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class Precision:
    """How a run computes: ``fp32``, or mixed precision with bf16/fp16 autocast (trainable
    parameters stay fp32; frozen modules are held in the compute dtype)."""

    name: PrecisionName

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, None for fp32."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    @property
    def mixed(self) -> bool:
        return self.name != "fp32"

    @property
    def engine_flag(self) -> str:
        """Accelerate's ``mixed_precision`` value (``no`` for fp32), for `make_accelerator` only."""
        return "no" if self.name == "fp32" else self.name

    @classmethod
    def resolve(cls, setting: str, device: torch.device) -> Precision:
        """The precision a spec value (``auto``, ``fp32``, ``bf16``, ``fp16``) means on ``device``.

        ``auto`` picks bf16 autocast only on CUDA devices that support bf16 (fast tensor cores);
        everywhere else fp32 (a bf16 matmul on CPUs without bf16 units is ~100x slower).
        """
        if setting == "auto":
            fast_bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            return cls("bf16" if fast_bf16 else "fp32")
        if setting == "fp16" and device.type != "cuda":
            raise UserError("train.precision: fp16 needs a CUDA device; use fp32 (or auto) on the CPU")
        if setting == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("train.precision: this GPU does not support bf16; use fp16 or auto")
        if setting not in ("fp32", "bf16", "fp16"):
            raise UserError(f"train.precision: unknown precision {setting!r}")
        return cls(setting)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return self.name


def default_device(cpu: bool) -> torch.device:
    """CUDA when there is a GPU and ``train.cpu`` is false, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")


CUBLAS_WORKSPACE = ":4096:8"
"""The cuBLAS workspace setting its documentation gives for reproducible results (CUDA >= 10.2)."""


@contextmanager
def deterministic_algorithms(on: bool) -> Iterator[None]:
    """``train.deterministic``: within the block torch runs deterministic kernels only, cuDNN does
    not autotune, and cuBLAS gets a fixed workspace (``CUBLAS_WORKSPACE_CONFIG``, unless the user
    set one); the process's previous settings come back afterwards (a notebook's later code is
    not slowed). Off: nothing changes."""
    if not on:
        yield
        return
    cudnn = torch.backends.cudnn
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        cudnn.benchmark,
        cudnn.deterministic,
    )
    ours = "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    if ours:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    torch.use_deterministic_algorithms(True)
    cudnn.benchmark, cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        cudnn.benchmark, cudnn.deterministic = before[2], before[3]
        if ours:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def silent(_line: str) -> None:
    """The log of a process other than the main one."""


@dataclass(frozen=True)
class RunContext:
    """What every part of a run shares: the Accelerator, the process group, the precision, and
    where this process writes its log (the main process only)."""

    accelerator: Any
    group: Group
    precision: Precision
    log: Log
    progress: bool

    @property
    def device(self) -> torch.device:
        return self.accelerator.device  # type: ignore[no-any-return]

    @property
    def is_main(self) -> bool:
        return self.group.is_main

    def autocast(self) -> Any:
        """The context manager of this run's mixed precision (a no-op under fp32)."""
        return self.accelerator.autocast()

    @property
    def scaler(self) -> Any:
        """The fp16 grad scaler, or None: it skips steps with non-finite gradients itself."""
        return getattr(self.accelerator, "scaler", None)

    @classmethod
    def start(cls, spec: Any, *, log: Log = print, progress: bool | None = None) -> RunContext:
        """Resolve the precision for the device, make the Accelerator and the process group, seed
        every generator (`accelerate.utils.set_seed`). ``spec``: the config's ``train`` block."""
        from accelerate.utils import set_seed  # type: ignore[import-untyped]

        precision = Precision.resolve(spec.precision, default_device(spec.cpu))
        _forget_other_precision(precision)
        accelerator = make_accelerator(precision.engine_flag, spec)
        group = Group(accelerator, spec.distributed.strategy)
        if not group.is_main:  # one process speaks and writes
            log, progress = silent, False
        if progress is None:  # a terminal, or a Jupyter notebook (tqdm's auto front end draws there)
            from probekit.batching import in_notebook

            progress = sys.stderr.isatty() or in_notebook()
        show = progress
        set_seed(spec.seed)
        return cls(accelerator, group, precision, log, show)


def _forget_other_precision(precision: Precision) -> None:
    """Let a second run in one process use another precision: Accelerate keeps its state in a
    process-wide singleton and refuses a new ``Accelerator`` whose mixed precision differs from
    the first one's (the distributed part, ``PartialState``, is kept)."""
    from accelerate.state import AcceleratorState  # type: ignore[import-untyped]

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != precision.engine_flag:
        AcceleratorState._reset_state(reset_partial_state=False)
