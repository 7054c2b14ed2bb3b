"""The plan of a run: everything resolved before the first step, frozen afterwards.

`prepare` loads the data (checked, split) and the backbone, builds the probe and its parameter
groups, tokenises every split, counts the steps, resolves the precision and the activation
cache, and returns a `TrainPlan`; ``probekit train --dry-run`` prints `TrainPlan.describe`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from probekit import memplan
from probekit.batching import BucketBatchSampler, Encoded, encode, padding_fraction
from probekit.cache import CachePlan, plan_cache, storage_dtype
from probekit.checkpoint import class_keys, label_names
from probekit.config import ProbeConfig, task_of
from probekit.data import Dataset, load_data
from probekit.distributed import resolve_batch, steps_per_epoch
from probekit.errors import ConfigError, UserError
from probekit.hub import LoadedBackbone
from probekit.loading import backbone_for, keep_fp32
from probekit.optim import ParamGroup, param_groups
from probekit.probe import Probe
from probekit.reading import describe_reading
from probekit.state import KEEP
from probekit.tasks.base import Task
from probekit.training.context import Precision, default_device
from probekit.training.trackers import check_trackers

LR_RANGES = {
    "head": (1e-4, 1e-1, "a pooler and head"),
    "body": (5e-6, 1e-4, "fine-tuned transformer blocks"),
}
"""AdamW learning rates known to work, per part: a small head on frozen features trains at
1e-4..1e-1 (linear probes and MLP heads); fine-tuned transformer blocks at 5e-6..1e-4 (BERT's
paper searched 2e-5..5e-5; decoder fine-tuning uses 1e-5..1e-4). Ten times outside is a warning."""


@dataclass(frozen=True)
class TrainPlan:
    """Everything resolved before the first step: data, backbone, probe, task, groups, step
    counts, precision and the activation cache. Nothing writes to it afterwards."""

    config: ProbeConfig
    task: Task
    dataset: Dataset
    backbone: LoadedBackbone
    probe: Probe
    groups: list[ParamGroup]
    encoded: dict[str, Encoded]
    device: torch.device
    precision: Precision
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    effective_batch: int
    num_processes: int
    per_device_batch: int
    """The micro-batch of one process (the spec's batch_size unless the process count forced less)."""
    accumulation: int
    """Micro-batches per optimiser step in each process."""
    cache_plan: CachePlan | None
    cache_reason: str
    padding: tuple[float, float]
    """Padding share of train tokens in epoch 1: length-bucketed batches, and random batches."""
    data_fingerprint: dict[str, dict[str, Any]]
    """Per split, its row count and a sha256 of its texts and labels (`fingerprint`); a resumed
    run must train on the same data."""
    class_weights: tuple[float, ...] | None = None
    """The loss weight of each class by index (``loss.class_weights`` resolved on train), or None."""
    weights_note: str | None = None
    """How the backbone's weights are held, when not all in fp32 (`probekit.loading.keep_fp32`)."""

    def weights_by_name(self) -> dict[str, float] | None:
        """The resolved class weights by label name, as the plan prints and the report stores them."""
        if self.class_weights is None:
            return None
        return dict(zip(class_keys(self.dataset.label_map), self.class_weights, strict=True))

    @property
    def pad_id(self) -> int:
        return int(self.backbone.tokenizer.pad_token_id)

    @property
    def label_names(self) -> list[Any]:
        return label_names(self.dataset.label_map)

    def data_origin(self) -> str:
        """Where the rows came from, naming the shipped demo dataset when it is used."""
        spec = self.config.data
        if spec.in_memory is not None:
            return f"Python objects ({spec.in_memory})"
        if spec.path is None and spec.train is None:
            return f"probekit's shipped demo dataset ({self.dataset.train.source})"
        return ", ".join(dict.fromkeys(s.source for s in self.dataset.splits()))

    def checkpoint_line(self) -> str:
        """When training-state checkpoints are written, and their size."""
        spec = self.config.train
        if not spec.resumable:
            return "checkpoints: none (train.resumable is false): a stopped run cannot be resumed"
        every = (
            f"every {spec.checkpoint_every_steps} optimiser steps and after each epoch"
            if spec.checkpoint_every_steps is not None
            else "after each epoch"
        )
        return (
            f"checkpoints: {every}, {memplan.size(memplan.checkpoint_bytes(self))} each (trainable weights "
            f"and optimizer state), the newest {KEEP} kept; train.resumable=false writes none"
        )

    def warmup_warnings(self) -> list[str]:
        """A warning when the learning-rate warmup takes the whole run, or most of it."""
        warmup, total = self.warmup_steps, self.total_steps
        if warmup >= total:
            return [
                f"warning: warmup covers the whole run ({warmup} of {total} optimiser steps): the learning "
                "rate never reaches its peak; train more epochs or shorten scheduler.warmup_*"
            ]
        if 2 * warmup > total:
            return [f"warning: warmup takes {warmup} of {total} optimiser steps, more than half the run"]
        return []

    def learning_rate_warnings(self) -> list[str]:
        """A warning for each trained part whose AdamW learning rate is ten times or more outside
        the range known to work for it (`LR_RANGES`)."""
        if self.config.optimizer.kind != "adamw":
            return []
        warnings = []
        for part, (low, high, what) in LR_RANGES.items():
            rates = {g.lr for g in self.groups if g.name.startswith(f"{part}/")}
            for lr in sorted(rates):
                if low / 10 * (1 - 1e-9) <= lr <= high * 10 * (1 + 1e-9):  # ten times is not yet far
                    continue
                side = "below" if lr < low else "above"
                warnings.append(
                    f"warning: optimizer.lr_{part}={lr:g} is far {side} the range known to work for {what} "
                    f"({low:g} to {high:g} with AdamW): "
                    + ("training may barely move" if side == "below" else "training may diverge")
                )
        return warnings

    def describe(self) -> list[str]:
        """The resolved plan, one line per fact, as ``--dry-run`` prints it."""
        cfg, layout, data = self.config, self.probe.layout, self.dataset
        total_params = sum(p.numel() for p in self.probe.parameters())
        trainable = sum(sum(p.numel() for p in g.params) for g in self.groups)
        spec_batch = f" (spec: {cfg.train.batch_size} x {cfg.train.grad_accum} in one process)"
        lines = [
            f"model: {self.backbone.name} ({self.backbone.provenance}); {layout.model_type}, "
            f"{layout.num_blocks} blocks, width {layout.hidden_size}",
            f"data: {self.data_origin()}",
            f"  train {len(data.train)} / val {len(data.val)}"
            + (f" / test {len(data.test)}" if data.test else "")
            + f" rows; labels {data.label_map}",
            *[f"  {line}" for line in data.report.lines()],
            f"freezing: {self.probe.plan.describe()}",
            f"pooling: {cfg.pooler.kind} over hidden states {list(self.probe.layers)} "
            f"-> {self.probe.pooler.output_dim(layout.hidden_size)} features",
            *describe_reading(self.probe.reader(), data.train.texts[0]),
            f"task: {cfg.task.kind}; head: {cfg.head.kind} -> {cfg.head.num_classes} outputs",
            f"loss: {self.task.describe_loss(cfg.train.label_smoothing)}"
            + ("; token-level (each row: the mean over its read tokens)" if cfg.loss.token_level else "")
            + "; "
            + ("positive weights " if self.task.target == "multilabel" else "class weights ")
            + (
                "none"
                if (weights := self.weights_by_name()) is None
                else f"{cfg.loss.class_weights if isinstance(cfg.loss.class_weights, str) else 'given'}: "
                + ", ".join(f"{name} {w:.3g}" for name, w in weights.items())
            ),
            "parameter groups:",
            *[
                f"  {g.name:<14} lr {g.lr:g}  weight decay {g.weight_decay:g}  "
                f"{sum(p.numel() for p in g.params):,} parameters in {len(g.params)} tensors"
                for g in self.groups
            ],
            f"  trainable {trainable:,} of {total_params:,}",
            f"batch: {self.per_device_batch} per micro-step x {self.accumulation} accumulation x "
            f"{self.num_processes} process(es) = {self.effective_batch} effective"
            + (spec_batch if self.num_processes > 1 else ""),
            f"steps: {self.steps_per_epoch} optimiser steps per epoch, up to {self.total_steps} "
            f"in {cfg.train.epochs} epochs; warmup {self.warmup_steps} steps ({cfg.scheduler.kind} schedule)",
            f"precision: {cfg.train.precision} -> {self.precision} on {self.device}"
            + ("; deterministic kernels only" if cfg.train.deterministic else ""),
            f"stopping: best val {cfg.train.monitor}, patience {cfg.train.patience} epochs; "
            f"threshold: {self.task.threshold_rule()}",
            f"per-step scalars: steps.jsonl; trackers: {', '.join(cfg.train.report_to) or 'none'}",
        ]
        lines += self.warmup_warnings() + self.learning_rate_warnings()
        if self.weights_note:
            lines.append(f"  {self.weights_note}")
        if self.precision.mixed:
            lines.append(
                f"  frozen modules held in {self.precision}; trainable parameters in fp32 with autocast"
            )
        lines.append(
            f"batching: length buckets of {cfg.train.bucket_batches} batches, dynamic padding; "
            f"padding {self.padding[0]:.1%} of train tokens (random batches: {self.padding[1]:.1%})"
        )
        if self.cache_plan is None:
            lines.append(f"activation cache: none, {self.cache_reason}")
        else:
            dtype = str(storage_dtype(cfg.train.cache, self.precision.name)).removeprefix("torch.")
            where = f"kept in {cfg.train.cache.dir}" if cfg.train.cache.dir else "for this run"
            lines.append(f"activation cache: {self.cache_plan.describe()} ({dtype}, {where})")
        lines.append(self.checkpoint_line())
        truncated = {name: enc.truncated for name, enc in self.encoded.items() if enc.truncated}
        if truncated:
            lines.append(f"truncated to {cfg.model.max_length} tokens: {truncated} rows")
        return lines + memplan.describe(self)


def prepare(
    config: ProbeConfig,
    *,
    device: torch.device | None = None,
    num_processes: int = 1,
    model: Any = None,
    tokenizer: Any = None,
    data: Any = None,
) -> TrainPlan:
    """Load data (or read the Python objects ``data``, `probekit.memory`) and backbone (or use
    the ``model`` and ``tokenizer`` given, as they are), build the probe and its groups, count
    steps; no training."""
    torch.manual_seed(config.train.seed)
    config = absolute_paths(config)
    inner = getattr(config.pooler, "token_pooler", config.pooler)
    if inner.kind == "cls" and config.data.positions != "all":
        raise ConfigError(
            "pooler cls reads the first token whatever data.positions selects; use another pooler"
        )
    if config.data.chat is not None:  # the run keeps the template's text, not a path to it
        chat = config.data.chat.resolved()
        config = config.model_copy(update={"data": config.data.model_copy(update={"chat": chat})})
    check_trackers(config.train.report_to)
    task = task_of(config)
    if config.train.monitor not in task.monitors:
        raise ConfigError(
            f"train.monitor={config.train.monitor}: task.kind={config.task.kind} reports "
            f"{', '.join(task.monitors)}"
        )
    dataset = load_data(config.data, target=task.target, data=data)  # type: ignore[arg-type]
    task = task.bind(class_keys(dataset.label_map))
    task.check(dataset, config.head.num_classes)
    task = task.fit(dataset)
    class_weights = config.loss.resolve(dataset.label_map, dataset.train.labels, target=task.target)
    spec = config.train
    device = device if device is not None else default_device(spec.cpu)
    precision = Precision.resolve(spec.precision, device)
    backbone, dtype = backbone_for(config, precision, model, tokenizer)
    probe = Probe.from_config(config, backbone.model)
    weights_note = keep_fp32(probe, backbone, dtype, from_checkpoint=model is None)
    probe.attach(
        tokenizer=backbone.tokenizer,
        max_length=config.model.max_length,
        label_names=label_names(dataset.label_map),
        task=task,
    )
    groups = param_groups(probe, config.optimizer)
    if not groups:
        raise UserError("nothing to train: the freezing plan leaves no trainable parameter")
    reader = probe.reader()
    encoded = {split.name: encode(reader, split) for split in dataset.splits()}
    per_device, accumulation = resolve_batch(spec.batch_size, spec.grad_accum, num_processes)
    per_epoch = steps_per_epoch(math.ceil(len(dataset.train) / per_device), accumulation, num_processes)
    hold_frozen_in(probe, precision)
    cache_plan, cache_reason = (
        plan_cache(probe, pooled=not config.loss.token_level)
        if spec.cache.enabled
        else (None, "switched off (train.cache.enabled)")
    )
    lengths = encoded["train"].lengths
    padding = [
        padding_fraction(
            lengths, BucketBatchSampler(lengths, per_device, seed=spec.seed, bucket_batches=n).batches(0)
        )
        for n in (spec.bucket_batches, 1)
    ]
    total = per_epoch * spec.epochs
    return TrainPlan(
        config=config,
        task=task,
        dataset=dataset,
        backbone=backbone,
        probe=probe,
        groups=groups,
        encoded=encoded,
        device=device,
        precision=precision,
        steps_per_epoch=per_epoch,
        total_steps=total,
        warmup_steps=config.scheduler.warmup_length(total, per_epoch),
        effective_batch=per_device * accumulation * num_processes,
        num_processes=num_processes,
        per_device_batch=per_device,
        accumulation=accumulation,
        cache_plan=cache_plan,
        cache_reason=cache_reason,
        padding=(padding[0], padding[1]),
        data_fingerprint=fingerprint(dataset),
        class_weights=class_weights,
        weights_note=weights_note,
    )


def hold_frozen_in(probe: Probe, precision: Precision) -> None:
    """Under mixed precision, cast frozen blocks and embeddings to the compute dtype (half the
    memory, no casts in their matmuls); trainable parameters stay fp32 master weights."""
    if precision.dtype is None:
        return
    for module in probe.frozen_modules():
        if not any(p.requires_grad for p in module.parameters()):
            module.to(precision.dtype)


def fingerprint(dataset: Dataset) -> dict[str, dict[str, Any]]:
    """Per split: rows, and a sha256 of the texts and class indices in order."""
    found: dict[str, dict[str, Any]] = {}
    for split in dataset.splits():
        digest = hashlib.sha256()
        for text, label in zip(split.texts, split.labels, strict=True):
            digest.update(json.dumps([text, label]).encode("utf-8"))
            digest.update(b"\n")
        found[split.name] = {"rows": len(split), "sha256": digest.hexdigest()}
    return found


def absolute_paths(config: ProbeConfig) -> ProbeConfig:
    """The config with local model and data paths made absolute, so the saved spec re-runs anywhere."""
    model = Path(config.model.name).expanduser()
    if model.is_dir() and not Path(config.model.name).is_absolute():  # relative, or ~/...
        config = config.model_copy(
            update={"model": config.model.model_copy(update={"name": str(model.resolve())})}
        )
    data = {
        key: str(Path(value).expanduser().resolve())
        for key in ("path", "train", "val", "test")
        if isinstance(value := getattr(config.data, key), str) and Path(value).expanduser().exists()
    }
    return config.model_copy(update={"data": config.data.model_copy(update=data)}) if data else config


def input_paths(config: ProbeConfig, extra: dict[str, str | Path] | None = None) -> dict[str, Path]:
    """What a run reads from the file system, by description: no ``--out`` may be, hold or lie
    inside any of them (`probekit.rundir.check_out`)."""
    found: dict[str, Path] = {}
    for key in ("path", "train", "val", "test"):
        value = getattr(config.data, key)
        if isinstance(value, str):
            path = Path(value).expanduser()
            found[f"data {'folder' if path.is_dir() else 'file'} (data.{key})"] = path
    model = Path(config.model.name).expanduser()
    if model.is_dir():
        found["model folder (model.name)"] = model
    if config.train.cache.dir is not None:
        found["activation cache folder (train.cache.dir)"] = Path(config.train.cache.dir).expanduser()
    for description, given in (extra or {}).items():
        found[description] = Path(given).expanduser()
    return found


def check_cache_dir(config: ProbeConfig) -> None:
    """``train.cache.dir`` must be a folder probekit can write (or one it can create)."""
    value = config.train.cache.dir
    if value is None or not config.train.cache.enabled:
        return
    path = Path(value).expanduser()
    existing = path
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == path else f"cannot be created: {existing} is a file"
        raise UserError(f"train.cache.dir: {value}: {what}; give a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"train.cache.dir: {value}: {existing} is not writable")
