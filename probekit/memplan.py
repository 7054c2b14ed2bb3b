"""The memory plan ``--dry-run`` prints: what a run holds, in bytes, per device.

Counted exactly from the built probe and the tokenised data (no estimate of the backbone's own
activations, which depend on the attention kernel):

- frozen weights: backbone parameters and buffers that do not train, in the dtype they are held in
  (half precision with ``model.dtype``/mixed precision, 1 or 0.5 bytes with quantisation);
- trainable weights: the trainable backbone tensors, the pooler and the head (fp32);
- gradients: one fp32 value per trainable weight;
- optimizer state: AdamW's two fp32 moments per trainable weight;
- activation cache: the train and val splits' cached hidden states (per token) or pooled features
  (per row), in host memory or a memory-mapped file on disk beyond ``train.cache.max_memory_gb``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import torch

from probekit.cache import storage_dtype

if TYPE_CHECKING:
    from probekit.training.plan import TrainPlan

ADAMW_MOMENTS = 2


def size(n: float) -> str:
    """Bytes in binary units (``1.5 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def memory_plan(plan: TrainPlan) -> dict[str, dict[str, int]]:
    """Bytes by device and by part (``frozen weights``, ``trainable weights``, ``gradients``,
    ``optimizer state``, ``activation cache``). Weights are counted on the device they train on:
    the run's device, or each tensor's own with a multi-device ``model.device_map``."""
    probe, device = plan.probe, str(plan.device)
    mapped = len(set((getattr(probe.backbone, "hf_device_map", None) or {}).values())) > 1
    table: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for _name, tensor in [*probe.named_parameters(), *probe.named_buffers()]:
        where = str(tensor.device) if mapped else device
        trains = isinstance(tensor, torch.nn.Parameter) and tensor.requires_grad
        table[where]["trainable weights" if trains else "frozen weights"] += _bytes(tensor)
        if trains:
            fp32 = tensor.numel() * 4
            table[where]["gradients"] += fp32
            table[where]["optimizer state"] += ADAMW_MOMENTS * fp32
    cache = cache_bytes(plan)
    if cache:
        spec = plan.config.train.cache
        on_disk = spec.dir is not None or cache > spec.max_memory_gb * 1024**3
        table["disk (memory-mapped file)" if on_disk else "cpu"]["activation cache"] += cache
    return {where: dict(parts) for where, parts in table.items()}


def checkpoint_bytes(plan: TrainPlan) -> int:
    """A training-state checkpoint's size: the trainable weights and AdamW's moments (its JSON,
    the generators and the callbacks' state are small beside them)."""
    parts = [p for device in memory_plan(plan).values() for p in device.items()]
    return sum(n for part, n in parts if part in ("trainable weights", "optimizer state"))


def cache_bytes(plan: TrainPlan) -> int:
    """The activation cache of train and val (the test split is never cached)."""
    cache = plan.cache_plan
    if cache is None:
        return 0
    width = storage_dtype(plan.config.train.cache, plan.precision.name).itemsize
    probe = plan.probe
    total = 0
    for split in ("train", "val"):
        encoded = plan.encoded.get(split)
        if encoded is None:
            continue
        if cache.mode == "pooled":
            features = probe.pooler.output_dim(probe.layout.hidden_size)
            total += len(encoded.lengths) * features * width
        else:
            total += sum(encoded.lengths) * probe.layout.hidden_size * len(cache.layers) * width
    return total


def describe(plan: TrainPlan) -> list[str]:
    """The plan's lines: one per device, its parts and their total."""
    lines = ["memory plan (bytes held; the backbone's own activations come on top):"]
    for where, parts in sorted(memory_plan(plan).items()):
        shown = ", ".join(f"{part} {size(n)}" for part, n in parts.items() if n)
        lines.append(f"  {where}: {shown}; total {size(sum(parts.values()))}")
    return lines
