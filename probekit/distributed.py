"""Data-parallel training over several processes, on Accelerate and ``torch.distributed``.

The same spec runs under ``torchrun`` or ``accelerate launch`` as in one process:

- `resolve_batch` keeps the effective batch the spec names (``batch_size x grad_accum``) by
  dividing the accumulation (or, when it cannot, the per-device batch) by the process count.
- `shard_windows` hands each process its share of every accumulation window of the global,
  seeded batch order. Every example is used once per epoch, every process runs the same number of
  micro-batches per window (a process short of a batch runs a zero-weight stand-in, so gradient
  synchronisation never waits for a process that has nothing to send), and each micro-batch's
  loss is divided by the examples of its whole window: the optimiser sees the same mean as a
  single process would.
- `Group` wraps the collectives training needs (flags agreed by every process, sums, gathered
  objects, byte-exact merging of cache shards) and is a no-op in a single process.

Two strategies share the model (``train.distributed.strategy``):

- ``ddp``: every process holds the whole model; gradients are all-reduced (DDP through
  Accelerate).
- ``fsdp``: parameters, gradients and optimiser state are sharded over the processes (torch's
  FSDP2 ``fully_shard``, ZeRO stage 3): each embedding module and each block is one unit, all-gathered
  just before it runs and freed after; the probe is the root unit. Every process must then run the
  same number of forward passes (each one all-gathers), so evaluation and cache building pad a
  process's share with throw-away passes (`forward_counts`). Checkpoints and outputs hold full
  tensors (`full`), gathered from the shards, in the same format as ``ddp`` runs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from probekit.blocks import DistributedSpec as DistributedSpec
from probekit.blocks import launched_processes as launched_processes
from probekit.errors import PeerLostError, ProbekitError, UserError


def resolve_batch(batch_size: int, grad_accum: int, processes: int) -> tuple[int, int]:
    """``(per-device batch, accumulation)`` whose product with ``processes`` is the spec's
    effective batch ``batch_size x grad_accum``: the accumulation is divided first; the per-device
    batch shrinks only when the accumulation cannot absorb the process count."""
    effective = batch_size * grad_accum
    for per_device in range(batch_size, 0, -1):
        if effective % (per_device * processes) == 0:
            return per_device, effective // (per_device * processes)
    raise UserError(
        f"train.batch_size x train.grad_accum = {batch_size} x {grad_accum} = {effective} examples per "
        f"optimiser step cannot be split evenly over {processes} processes; make it a multiple of "
        f"{processes} (for example train.grad_accum={math.lcm(grad_accum, processes)})"
    )


@dataclass(frozen=True)
class Micro:
    """One micro-batch of one process."""

    rows: tuple[int, ...]
    window: int
    """Index of its accumulation window in the epoch (one optimiser step per window)."""
    window_examples: int
    """Examples in the whole window, over every process: the loss is divided by this."""
    weight: float
    """1, or 0 for a stand-in run only to keep the processes in step (it adds no gradient)."""
    last: bool
    """The last micro-batch of its window: gradients are synchronised and the optimiser steps."""


def shard_windows(
    batches: Sequence[Sequence[int]], accumulation: int, processes: int, rank: int
) -> list[Micro]:
    """Process ``rank``'s micro-batches of an epoch whose global batch order is ``batches``.

    Windows are ``accumulation x processes`` consecutive batches; inside one, the batches are dealt
    round robin. The last window may be short: every process still runs ``ceil(k / processes)``
    micro-batches in it, a process without a batch of its own re-running the window's first batch
    with weight 0.
    """
    out: list[Micro] = []
    span = accumulation * processes
    for window, start in enumerate(range(0, len(batches), span)):
        group = batches[start : start + span]
        examples = sum(len(b) for b in group)
        mine = group[rank::processes]
        count = math.ceil(len(group) / processes)
        for j in range(count):
            real = j < len(mine)
            rows = mine[j] if real else group[0]
            out.append(Micro(tuple(rows), window, examples, 1.0 if real else 0.0, j == count - 1))
    return out


def steps_per_epoch(num_batches: int, accumulation: int, processes: int) -> int:
    return math.ceil(num_batches / (accumulation * processes))


class Group:
    """The collectives of a run; in a single process each is the identity."""

    def __init__(self, accelerator: Any, strategy: str = "ddp") -> None:
        self.size = int(accelerator.num_processes)
        self.rank = int(accelerator.process_index)
        self.device = accelerator.device
        self.is_main = bool(accelerator.is_main_process)
        self.accelerator = accelerator
        self.strategy = strategy if self.size > 1 else "single"

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def sharded(self) -> bool:
        """Parameters are sharded over the processes (``fsdp``)."""
        return self.strategy == "fsdp"

    def forward_counts(self, mine: int) -> int:
        """The number of forward passes every process must run when this one has ``mine`` of its
        own: under ``fsdp`` the largest share (each forward all-gathers, so all run together);
        otherwise ``mine``."""
        return self.max_flags(mine)[0] if self.sharded else mine

    def max_flags(self, *flags: int) -> list[int]:
        """Each flag's maximum over every process (one small all-reduce)."""
        reduced = self._all_reduce(flags, torch.int64, dist.ReduceOp.MAX, "agreeing on whether to stop")
        return [int(v) for v in reduced]

    def sum(self, *values: float) -> list[float]:
        """Each value summed over every process."""
        return [
            float(v) for v in self._all_reduce(values, torch.float64, dist.ReduceOp.SUM, "summing metrics")
        ]

    def _all_reduce(self, values: Sequence[float], dtype: torch.dtype, op: Any, doing: str) -> list[Any]:
        if not self.active:
            return list(values)
        tensor = torch.tensor(values, dtype=dtype, device=self.device)
        with _peers(doing):
            dist.all_reduce(tensor, op=op)
        return list(tensor.tolist())

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, by rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.size
        with _peers("gathering results"):
            dist.all_gather_object(out, obj)
        return out

    def merge(self, data: torch.Tensor, chunk_bytes: int = 64 * 2**20) -> None:
        """Combine buffers that each process filled in disjoint places (zeros elsewhere): after
        the call every process holds every value, bit for bit (their bytes are summed)."""
        if not self.active:
            return
        flat = data.view(-1).view(torch.uint8)
        with _peers("exchanging activation-cache shards"):
            for start in range(0, flat.numel(), chunk_bytes):
                chunk = flat[start : start + chunk_bytes]
                moved = chunk.to(self.device)
                dist.all_reduce(moved, op=dist.ReduceOp.SUM)
                if moved.data_ptr() != chunk.data_ptr():
                    chunk.copy_(moved.cpu())

    def barrier(self) -> None:
        if self.active:
            with _peers("waiting for the other processes"):
                self.accelerator.wait_for_everyone()


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective failing because another process died, hung or timed out."""
    if isinstance(exc, dist.DistError):
        return True
    if not isinstance(exc, RuntimeError) or isinstance(exc, ProbekitError):
        return False
    text = str(exc).lower()
    return any(
        word in text
        for word in ("gloo", "nccl", "connection closed", "connection reset", "broken pipe", "timed out")
    )


def peer_lost(exc: BaseException, doing: str) -> PeerLostError:
    """The one-line error for a failed collective."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    first = re.sub(r"^\[[^\]]*\]\s*", "", first)  # gloo prefixes its source file
    first = first.split(". ")[0][:160]  # the first sentence is the cause
    return PeerLostError(
        f"lost contact with another training process while {doing} ({type(exc).__name__}: {first}); "
        "the job stops; continue with --resume once every process can run"
    )


@contextmanager
def _peers(doing: str) -> Iterator[None]:
    """Turn a failed collective (a peer died, or timed out) into `PeerLostError`."""
    try:
        yield
    except BaseException as exc:
        if is_peer_failure(exc):
            raise peer_lost(exc, doing) from exc
        raise


# -- fsdp: sharded parameters ---------------------------------------------------------------------
def shard_model(probe: Any, device: torch.device) -> tuple[int, int]:
    """Shard ``probe`` over every process with FSDP2: each embedding module and each block is
    one unit, the probe (head, pooler and what is left of the backbone) the root. Returns the
    parameters this process holds and the model's total."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    total = sum(p.numel() for p in probe.parameters())
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    units = [m for m in probe.embedding_modules() if any(True for _ in m.parameters())]
    units += list(probe.layout.blocks(probe.backbone))
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(probe, mesh=mesh)
    held = sum(local(p).numel() for p in probe.parameters())
    return held, total


def reshard(model: Any) -> None:
    """Free every gathered FSDP unit of ``model`` so its parameters are the shards again (the
    root unit stays gathered after a forward pass); a no-op for a model that is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is sharded over the processes (a DTensor)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded tensor (a DTensor), else the tensor."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every process when sharded (a collective: every process
    must call it, in the same order), else the tensor itself."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        with _peers("gathering sharded weights"):
            return tensor.full_tensor()
    return tensor


def gathered(tensors: dict[str, torch.Tensor], *, keep: bool = True) -> dict[str, torch.Tensor]:
    """Whole, contiguous CPU copies of ``tensors``, gathered one at a time where sharded (every
    process must call it, in the same order). ``keep=False``: take part in the gathering only, and
    drop each tensor at once; returns an empty dict."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        whole = full(tensor)
        if keep:
            out[name] = whole.to("cpu", copy=True).contiguous()
    return out


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` laid out like ``param``: a whole tensor becomes this process's shard when
    ``param`` is sharded (an already sharded ``value`` stays as it is); otherwise ``value`` moves
    to ``param``'s device. A 0-dim value (an optimiser's step count) is never sharded.

    Raises:
        ValueError: a whole ``value`` whose shape is not the sharded ``param``'s.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(value, DTensor) or not isinstance(param, DTensor) or value.dim() == 0:
        return value if isinstance(value, DTensor) else value.to(param.device)
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(
            f"a tensor of shape {tuple(value.shape)} cannot take the place of {tuple(param.shape)}"
        )
    # Every process holds the same whole value: each takes its own shard, nothing is sent.
    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


@contextmanager
def gradient_sync(model: Any, accelerator: Any, enabled: bool) -> Iterator[None]:
    """Synchronise gradients in the backward passes inside (``enabled``) or only accumulate
    them locally (a window's earlier micro-batches): DDP's ``no_sync`` or FSDP's
    ``set_requires_gradient_sync``."""
    if enabled:
        yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    with accelerator.no_sync(model):
        yield


def make_accelerator(precision: str, spec: Any) -> Any:
    """The run's `Accelerator`: its mixed precision and a bounded collective timeout. Under a
    launcher it sets up the process group and wraps the model in DDP.

    Accumulation is probekit's own (`shard_windows` + ``no_sync``), so Accelerate's is 1.
    """
    import datetime

    from accelerate import Accelerator  # type: ignore[import-untyped]
    from accelerate.utils import InitProcessGroupKwargs  # type: ignore[import-untyped]

    timeout = datetime.timedelta(seconds=spec.distributed.timeout_s)
    handlers = [InitProcessGroupKwargs(timeout=timeout)]
    accelerator = Accelerator(mixed_precision=precision, cpu=spec.cpu, kwargs_handlers=handlers)
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    if kind in {"FSDP", "DEEPSPEED", "MEGATRON_LM"}:
        raise UserError(
            f"accelerate launch is set up for {kind}; probekit shards the model itself: launch with "
            "--multi_gpu (no --use_fsdp/--use_deepspeed, no FSDP or DeepSpeed in `accelerate config`) "
            "and set train.distributed.strategy=fsdp"
        )
    return accelerator
