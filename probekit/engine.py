"""The training engine: ``train(config) -> RunResult``, built on Hugging Face Accelerate.

Accelerate provides the device, mixed precision (bf16 autocast, fp16 with a grad scaler), the
process group and the model wrapper for several processes (DDP) with ``no_sync``; with
``train.distributed.strategy=fsdp`` the model is sharded with torch's FSDP2 instead.
`probekit.distributed` deals each process its share of every accumulation window. probekit adds
the recipe: parameter groups from the freezing plan, loss normalised over the effective batch,
label smoothing, clipping, the schedule, per-epoch evaluation, early stopping with restore of the
best weights, the decision threshold, and the run folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from probekit import jsonio
from probekit.batching import (
    BucketBatchSampler,
    LengthSortedBatchSampler,
    length_share,
    padding_fraction,
)
from probekit.cache import (
    CachePlan,
    SplitCache,
    build_split_cache,
    cache_facts,
    cache_key,
    plan_cache,
    storage_dtype,
)
from probekit.checkpoint import label_names, save_checkpoint, trainable_parameters, trainable_state
from probekit.config import ProbeConfig, dump_config
from probekit.data import Dataset, Split, load_data
from probekit.distributed import (
    Group,
    gathered,
    gradient_sync,
    is_peer_failure,
    make_accelerator,
    peer_lost,
    reshard,
    resolve_batch,
    shard_like,
    shard_model,
    shard_windows,
    steps_per_epoch,
)
from probekit.errors import InterruptedRunError, ProbekitError, TerminatedError, UserError
from probekit.hub import LoadedBackbone, load_backbone
from probekit.metrics import choose_threshold, compute_metrics
from probekit.optim import ParamGroup, build_optimizer, param_groups
from probekit.probe import Probe
from probekit.rundir import (
    RunFolder,
    check_out,
    default_run_dir,
    explain_failure,
)
from probekit.state import (
    STATE_DIR,
    Saved,
    checkpoint_name,
    has_checkpoint,
    load_latest,
    load_optimizer_state,
    load_scheduler_state,
    optimizer_state,
    rng_state,
    save_state,
    scheduler_state,
    set_rng_state,
)

Log = Callable[[str], None]


class DivergedError(ProbekitError):
    """The loss or gradients became non-finite: training stopped (exit code 3)."""

    exit_code = 3


# -- precision ---------------------------------------------------------------------------------
def resolve_precision(precision: str, device: torch.device) -> str:
    """Accelerate's ``mixed_precision`` for a spec value on ``device``: ``no``, ``bf16`` or ``fp16``.

    ``auto`` picks bf16 autocast only on CUDA devices that support bf16 (fast tensor cores);
    everywhere else fp32 (a bf16 matmul on CPUs without bf16 units is ~100x slower than fp32).
    """
    if precision == "auto":
        fast_bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return "bf16" if fast_bf16 else "no"
    if precision == "fp16" and device.type != "cuda":
        raise UserError("train.precision: fp16 needs a CUDA device; use fp32 (or auto) on the CPU")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("train.precision: this GPU does not support bf16; use fp16 or auto")
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


# -- tokenisation and batching -----------------------------------------------------------------
@dataclass(frozen=True)
class Encoded:
    """Token ids of one split (unpadded) with labels; ``truncated`` rows exceeded max_length."""

    ids: list[list[int]]
    labels: list[int]
    truncated: int

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.ids]


def encode(tokenizer: Any, split: Split, max_length: int) -> Encoded:
    """Tokenise a split once; rows longer than ``max_length`` are truncated and counted. A long
    text is tokenised through a prefix (`probekit.tokens.encode_texts`), never whole."""
    from probekit.tokens import encode_texts

    ids, truncated = encode_texts(tokenizer, split.texts, max_length)
    return Encoded(ids, list(split.labels), sum(truncated))


class Collator:
    """Dynamic padding: each batch is padded to its own longest row (on ``model.padding_side``).

    With a split's activation cache, batches also carry its values for their rows (``cached``:
    per-token hidden states padded the same way, or ``features``). ``index`` gives each row's
    position in the split, so results of a reordered loader can be put back in order.
    """

    def __init__(
        self, encoded: Encoded, pad_id: int, padding_side: str = "right", cache: SplitCache | None = None
    ) -> None:
        self.encoded = encoded
        self.pad_id = pad_id
        self.left = padding_side == "left"
        self.cache = cache

    def __call__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = [self.encoded.ids[i] for i in indices]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            cols = slice(width - len(row), width) if self.left else slice(0, len(row))
            ids[b, cols] = torch.tensor(row, dtype=torch.long)
            mask[b, cols] = 1
        labels = torch.tensor([self.encoded.labels[i] for i in indices], dtype=torch.long)
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "index": torch.tensor(list(indices), dtype=torch.long),
        }
        if self.cache is not None:
            values = self.cache.batch(indices, width, self.left)
            batch["features" if self.cache.plan.mode == "pooled" else "cached"] = values
        return batch


def probe_inputs(batch: dict[str, torch.Tensor], plan: CachePlan | None) -> dict[str, Any]:
    """The probe's keyword arguments for a collated batch (token ids, or cached activations)."""
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "features" in batch:
        inputs["features"] = batch["features"]
    elif "cached" in batch and plan is not None:
        inputs["cached"] = {layer: batch["cached"][:, :, j] for j, layer in enumerate(plan.layers)}
    return inputs


class _Indices(TorchDataset[int]):
    """Row indices 0..n-1: the collator looks the rows up."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        return index


def eval_loader(
    encoded: Encoded,
    pad_id: int,
    batch_size: int,
    *,
    padding_side: str = "right",
    cache: SplitCache | None = None,
    max_tokens: int | None = None,
    group: Group | None = None,
) -> DataLoader[Any]:
    """Inference batches sorted by length, longest first (least padding), of at most
    ``batch_size`` rows and ``max_tokens`` padded tokens; with several processes, this process's
    share of them (every row is in exactly one process's share)."""
    rows = length_share(encoded.lengths, group.rank, group.size) if group is not None else None
    batches = list(LengthSortedBatchSampler(encoded.lengths, batch_size, max_tokens, rows))
    return DataLoader(
        _Indices(len(encoded)),
        batch_sampler=batches,
        collate_fn=Collator(encoded, pad_id, padding_side, cache),
    )


# -- preparation (shared by --dry-run and training) --------------------------------------------
@dataclass
class Prepared:
    """Everything resolved before the first step: data, backbone, probe, groups, step counts."""

    config: ProbeConfig
    dataset: Dataset
    backbone: LoadedBackbone
    probe: Probe
    groups: list[ParamGroup]
    encoded: dict[str, Encoded]
    device: torch.device
    precision: str
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    effective_batch: int
    num_processes: int = 1
    per_device_batch: int = 0
    """The micro-batch of one process (the spec's batch_size unless the process count forced less)."""
    accumulation: int = 1
    """Micro-batches per optimiser step in each process."""
    cache_plan: CachePlan | None = None
    cache_reason: str = ""
    padding: tuple[float, float] = (0.0, 0.0)
    """Padding share of train tokens in epoch 1: length-bucketed batches, and random batches."""
    cache_rows: dict[str, list[int]] = field(default_factory=dict)
    """Per split, the rows each process ran through the frozen blocks for the cache (by rank)."""
    sharded_parameters: list[int] = field(default_factory=list)
    """Under fsdp: the parameters each process holds, by rank (filled in by training)."""
    data_fingerprint: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per split, its row count and a sha256 of its texts and labels (`fingerprint`); a resumed
    run must train on the same data."""

    def data_origin(self) -> str:
        """Where the rows came from, naming the shipped demo dataset when it is used."""
        spec = self.config.data
        if spec.path is None and spec.train is None:
            return f"probekit's shipped demo dataset ({self.dataset.train.source})"
        sources = dict.fromkeys(
            s.source for s in (self.dataset.train, self.dataset.val, self.dataset.test) if s
        )
        return ", ".join(sources)

    def describe(self) -> list[str]:
        """The resolved plan, one line per fact, as ``--dry-run`` prints it."""
        cfg = self.config
        layout = self.probe.layout
        total_params = sum(p.numel() for p in self.probe.parameters())
        lines = [
            f"model: {self.backbone.name} ({self.backbone.provenance}); {layout.model_type}, "
            f"{layout.num_blocks} blocks, width {layout.hidden_size}",
            f"data: {self.data_origin()}",
            f"  train {len(self.dataset.train.texts)} / val {len(self.dataset.val.texts)}"
            + (f" / test {len(self.dataset.test.texts)}" if self.dataset.test else "")
            + f" rows; labels {self.dataset.label_map}",
            *[f"  {line}" for line in self.dataset.report.lines()],
            f"freezing: {self.probe.plan.describe()}",
            f"pooling: {cfg.pooler.kind} over hidden states {list(self.probe.layers)} "
            f"-> {self.probe.pooler.output_dim(layout.hidden_size)} features",
            f"head: {cfg.head.kind} -> {cfg.head.num_classes} classes",
            "parameter groups:",
            *[
                f"  {g.name:<14} lr {g.lr:g}  weight decay {g.weight_decay:g}  "
                f"{sum(p.numel() for p in g.params):,} parameters in {len(g.params)} tensors"
                for g in self.groups
            ],
            f"  trainable {sum(sum(p.numel() for p in g.params) for g in self.groups):,} of {total_params:,}",
            f"batch: {self.per_device_batch} per micro-step x {self.accumulation} accumulation x "
            f"{self.num_processes} process(es) = {self.effective_batch} effective"
            + (
                f" (spec: {cfg.train.batch_size} x {cfg.train.grad_accum} in one process)"
                if self.num_processes > 1
                else ""
            ),
            f"steps: {self.steps_per_epoch} optimiser steps per epoch, up to {self.total_steps} "
            f"in {cfg.train.epochs} epochs; warmup {self.warmup_steps} steps ({cfg.scheduler.kind} schedule)",
            f"precision: {cfg.train.precision} -> {'fp32' if self.precision == 'no' else self.precision} "
            f"on {self.device}",
            f"stopping: best val {cfg.train.monitor}, patience {cfg.train.patience} epochs; "
            f"threshold: {threshold_rule(cfg)}",
        ]
        if self.precision != "no":
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
            dtype = str(storage_dtype(cfg.train.cache, self.precision)).removeprefix("torch.")
            where = f"kept in {cfg.train.cache.dir}" if cfg.train.cache.dir else "for this run"
            lines.append(f"activation cache: {self.cache_plan.describe()} ({dtype}, {where})")
        truncated = {name: enc.truncated for name, enc in self.encoded.items() if enc.truncated}
        if truncated:
            lines.append(f"truncated to {cfg.model.max_length} tokens: {truncated} rows")
        return lines


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


def prepare(config: ProbeConfig, *, device: torch.device | None = None, num_processes: int = 1) -> Prepared:
    """Load data and backbone, build the probe and its groups, count steps; no training."""
    torch.manual_seed(config.train.seed)
    config = absolute_paths(config)
    dataset = load_data(config.data)
    if dataset.num_classes != 2 or config.head.num_classes != 2:
        raise UserError(
            f"head.num_classes={config.head.num_classes} and the data has {dataset.num_classes} classes; "
            "probekit trains binary probes (2 classes)"
        )
    backbone = load_backbone(config.model)
    probe = Probe.from_config(config, backbone.model)
    probe.tokenizer = backbone.tokenizer
    probe.max_length = config.model.max_length
    probe.label_names = label_names(dataset.label_map)
    groups = param_groups(probe, config.optimizer)
    if not groups:
        raise UserError("nothing to train: the freezing plan leaves no trainable parameter")
    encoded = {
        split.name: encode(backbone.tokenizer, split, config.model.max_length)
        for split in (dataset.train, dataset.val, dataset.test)
        if split is not None
    }
    spec = config.train
    per_device, accumulation = resolve_batch(spec.batch_size, spec.grad_accum, num_processes)
    batches = math.ceil(len(dataset.train.texts) / per_device)
    per_epoch = steps_per_epoch(batches, accumulation, num_processes)
    total = per_epoch * spec.epochs
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() and not spec.cpu else "cpu")
    precision = resolve_precision(spec.precision, device)
    hold_frozen_in(probe, precision)
    cache_plan, cache_reason = (
        plan_cache(probe) if spec.cache.enabled else (None, "switched off (train.cache.enabled)")
    )
    lengths = encoded["train"].lengths
    padding = tuple(
        padding_fraction(
            lengths, BucketBatchSampler(lengths, per_device, seed=spec.seed, bucket_batches=n).batches(0)
        )
        for n in (spec.bucket_batches, 1)
    )
    return Prepared(
        config=config,
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
    )


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


def check_same_data(state: Mapping[str, Any], prepared: Prepared, log: Log) -> None:
    """Refuse to resume on data other than the stopped run's (a changed file, a changed split)."""
    before = state.get("data")
    now = prepared.data_fingerprint
    if not isinstance(before, dict):
        log(
            "warning: this checkpoint has no data fingerprint (written by an earlier probekit); "
            "the data could not be checked against the stopped run's"
        )
        return
    changes = []
    for name in sorted(set(before) | set(now), key=("train", "val", "test").index):
        old, new = before.get(name), now.get(name)
        if old == new:
            continue
        if old is None or new is None or old.get("rows") != new["rows"]:
            rows = [f"{side['rows']} rows" if side else "no split" for side in (old, new)]
            changes.append(f"{name}: {rows[0]} -> {rows[1]}")
        else:
            changes.append(f"{name}: the same {new['rows']} rows, other texts or labels")
    if changes:
        raise UserError(
            "--resume: the data differs from the stopped run's (" + "; ".join(changes) + "); a run cannot "
            "continue on other data: restore the data, or start a new run"
        )


def hold_frozen_in(probe: Probe, precision: str) -> None:
    """Under mixed precision, cast frozen blocks and embeddings to the compute dtype (half the
    memory, no casts in their matmuls); trainable parameters stay fp32 master weights."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return
    for module in probe.frozen_modules():
        if not any(p.requires_grad for p in module.parameters()):
            module.to(dtype)


def threshold_rule(config: ProbeConfig) -> str:
    """The documented threshold rule in words."""
    fpr = config.threshold.target_fpr
    return "max val F1" if fpr is None else f"lowest with val FPR <= {fpr}"


def threshold_rule_id(config: ProbeConfig) -> str:
    """The threshold rule as reports record it: ``max_f1`` or ``target_fpr=<budget>``."""
    fpr = config.threshold.target_fpr
    return "max_f1" if fpr is None else f"target_fpr={fpr}"


def choose_val_threshold(config: ProbeConfig, labels: np.ndarray, probs: np.ndarray) -> float:
    """The decision threshold the config's rule picks on val scores (`threshold_rule`)."""
    fpr = config.threshold.target_fpr
    return choose_threshold(labels, probs, rule="max_f1" if fpr is None else "target_fpr", target_fpr=fpr)


# -- results -----------------------------------------------------------------------------------
@dataclass
class RunResult:
    """What a run produced: where, which epoch won, and the metrics per split."""

    run_dir: Path
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    threshold: float
    metrics: dict[str, dict[str, float]]
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> list[str]:
        """A short human summary: best epoch, threshold, headline metrics per split."""
        lines = [
            f"run: {self.run_dir}",
            f"best epoch {self.best_epoch} of {self.epochs_run}"
            + (" (stopped early)" if self.stopped_early else "")
            + f"; threshold {self.threshold:.4f}; {self.seconds:.1f} s",
        ]
        for split, m in self.metrics.items():
            lines.append(
                f"{split:<5} accuracy {m['accuracy']:.4f}  f1 {m['f1']:.4f}  auroc {m['auroc']:.4f}  "
                f"auprc {m['auprc']:.4f}  recall@1%fpr {m['recall_at_1pct_fpr']:.4f}  ece {m['ece']:.4f}"
            )
        return lines


# -- evaluation --------------------------------------------------------------------------------
def progress_bar(
    iterable: Iterable[Any], enabled: bool, desc: str, total: int | None = None
) -> Iterator[Any]:
    """``iterable``, with a progress bar on stderr when ``enabled``."""
    if not enabled:
        yield from iterable
        return
    from tqdm.auto import tqdm  # type: ignore[import-untyped]

    yield from tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, file=sys.stderr)


def predict_loader(
    probe: Probe,
    loader: DataLoader[Any],
    accelerator: Any,
    *,
    progress: bool = False,
    plan: CachePlan | None = None,
    group: Group | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Positive-class probabilities and labels in the split's row order, and the mean
    (unsmoothed) loss, over a loader (in inference mode, whatever order it batches rows in).

    With several processes each one runs its share (`eval_loader`) and every process gets the
    results of all of them."""
    probe.eval()
    probs: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    order: list[torch.Tensor] = []
    loss_sum, count = 0.0, 0
    batches: Iterable[dict[str, torch.Tensor]] = loader
    if group is not None and group.sharded:  # every process runs as many forwards as the busiest
        batches = _padded(loader, group)
    with no_grad(group), accelerator.autocast():
        for batch in progress_bar(batches, progress, "eval"):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            logits = probe(**probe_inputs(batch, plan)).float()
            if "filler" in batch:
                continue
            target = batch["labels"]
            loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
            count += int(target.numel())
            probs.append(torch.softmax(logits, dim=-1)[:, 1].cpu())
            labels.append(target.cpu())
            order.append(batch["index"].cpu())
    if group is not None and group.active:
        shares = group.gather((probs, labels, order, loss_sum, count))
        probs = [t for share in shares for t in share[0]]
        labels = [t for share in shares for t in share[1]]
        order = [t for share in shares for t in share[2]]
        loss_sum, count = sum(share[3] for share in shares), sum(share[4] for share in shares)
    if not order:
        return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64), 0.0
    rows = torch.cat(order).argsort()
    return torch.cat(probs)[rows].numpy(), torch.cat(labels)[rows].numpy(), loss_sum / max(count, 1)


def no_grad(group: Group | None) -> Any:
    """No autograd for inference: ``inference_mode``, or plain ``no_grad`` for sharded models
    (FSDP's gathered parameters must stay usable by the training steps that follow)."""
    return torch.no_grad() if group is not None and group.sharded else torch.inference_mode()


def _padded(loader: DataLoader[Any], group: Group) -> Iterator[dict[str, torch.Tensor]]:
    """``loader``'s batches, then throw-away one-row batches (marked ``filler``) until this
    process has run as many as the process with the most."""
    total = group.forward_counts(len(loader))
    yield from loader
    for _ in range(total - len(loader)):
        yield {**loader.collate_fn([0]), "filler": torch.ones(1)}


def improves(metric: str, value: float, best: float | None) -> bool:
    """Whether ``value`` of the monitored ``metric`` beats ``best`` (lower for ``loss``, higher
    otherwise); nan never does, anything beats None."""
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value < best if metric == "loss" else value > best


# -- training ----------------------------------------------------------------------------------
def train(
    config: ProbeConfig,
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
    log: Log = print,
    progress: bool | None = None,
    name: str = "run",
    resume: bool = False,
    allow_spec_change: bool = False,
    protect: Mapping[str, str | Path] | None = None,
) -> RunResult:
    """Train the probe ``config`` describes and write its run folder; return the results.

    Args:
        config: a validated config (``probekit.preset(...)``, ``probekit.load_config(...)``).
        out: the run folder (default ``runs/<name>-<timestamp>``); must not exist or be empty
            unless ``overwrite``. The run is written to a temporary sibling and moved into place
            when complete, so a failed run leaves no half-written folder.
        overwrite: replace a non-empty ``out`` once the new run is complete.
        log: where progress lines go (``print`` by default).
        progress: show progress bars; default: when stderr is a terminal.
        name: prefix of the default run folder name; one folder name (letters, digits, ``.``,
            ``_``, ``-``), never a path.
        resume: continue the unfinished run of ``out`` from its newest intact training-state
            checkpoint; the result is bit-identical to a run that was never stopped (on CPU).
        allow_spec_change: with ``resume``, accept a config that differs from the stopped run's.
        protect: more paths ``out`` must not be, hold or lie inside (by description), besides the
            data, model and cache folders of ``config``; the CLI passes its ``--config`` file.

    Raises:
        UserError: bad input, or an ``out`` that could destroy the user's files or is being
            written by another process (`probekit.rundir.check_out`, `probekit.rundir.RunLock`).
    """
    from accelerate.utils import set_seed  # type: ignore[import-untyped]

    started = time.perf_counter()
    spec = config.train
    if resume and out is None:
        raise UserError("--resume needs --out: the run folder whose unfinished run to continue")
    out_dir = Path(out) if out is not None else default_run_dir(name)
    inputs = input_paths(config, protect)
    check_cache_dir(config)
    probe_device = torch.device("cuda" if torch.cuda.is_available() and not spec.cpu else "cpu")
    precision = resolve_precision(spec.precision, probe_device)
    _forget_other_precision(precision)
    accelerator = make_accelerator(precision, spec)
    group = Group(accelerator, spec.distributed.strategy)
    if not group.is_main:  # one process speaks and writes
        log = _silent
        progress = False
    show = sys.stderr.isatty() if progress is None else progress
    set_seed(spec.seed)
    # The main process checks and locks the folder first: a refusal should not wait for the model.
    folder: RunFolder | None = None
    if group.is_main:
        folder = RunFolder.open(out_dir, overwrite=overwrite, inputs=inputs, log=log, resume=resume)
    else:
        check_out(out_dir, overwrite=overwrite, inputs=inputs, resume=resume)
    try:
        saved: Saved | None = None
        if resume:
            partial, saved = find_resumable(out_dir, log)
            check_same_spec(saved.state["config"], absolute_paths(config), allow_spec_change)
            if folder is not None:
                folder.partial = partial
        elif folder is not None:
            partial = folder.create()
        else:
            partial = out_dir  # never written: only the main process writes
        try:
            prepared = prepare(config, device=accelerator.device, num_processes=group.size)
            if saved is not None:
                check_same_data(saved.state, prepared, log)
            for line in prepared.describe():
                log(line)
            result = _fit(prepared, accelerator, group, partial, out_dir, log, show, started, saved)
            group.barrier()
            if folder is not None:
                shutil.rmtree(partial / STATE_DIR, ignore_errors=True)  # finished: nothing to resume
                folder.publish()
        except BaseException as exc:
            if folder is not None:
                folder.abandon(log, keep=has_checkpoint(partial))
            if group.active and is_peer_failure(exc):
                raise peer_lost(exc, f"training (process {group.rank} of {group.size})") from exc
            error = explain_failure(exc, folder.partial if folder is not None else None)
            if error is exc:
                raise
            raise error from exc
    finally:
        if folder is not None:
            folder.release()
    for line in result.summary():
        log(line)
    return result


def input_paths(config: ProbeConfig, extra: Mapping[str, str | Path] | None = None) -> dict[str, Path]:
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


def _silent(_line: str) -> None:
    """The log of a process other than the main one."""


def find_resumable(out_dir: Path, log: Log) -> tuple[Path, Saved]:
    """The unfinished run folder of ``out_dir`` and its newest intact checkpoint."""
    candidates = sorted(
        (
            p
            for p in out_dir.parent.glob(f".{out_dir.name}.partial-*")
            if p.is_dir() and not p.is_symlink() and has_checkpoint(p)
        ),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    problems: list[str] = []
    for folder in candidates:
        saved = load_latest(folder, lambda message: log(f"warning: {message}"), problems)
        if saved is not None:
            return folder, saved
    if candidates:
        raise UserError(
            f"{out_dir}: every checkpoint of the unfinished run is damaged ({'; '.join(problems[:2])}); "
            "nothing to resume"
        )
    finished = out_dir / "checkpoint"
    detail = (
        "it is a finished run"
        if finished.is_dir()
        else "no unfinished run with a checkpoint was found next to it"
    )
    raise UserError(f"{out_dir}: nothing to resume ({detail})")


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def check_same_spec(saved: dict[str, Any], config: ProbeConfig, allow: bool) -> None:
    """Refuse to resume with a config that differs from the stopped run's, naming every change.
    The saved config is read through today's schema first, so a field added since (with its
    default) is not a change."""
    from probekit.config import validate

    with contextlib.suppress(UserError):  # else compared as written: every difference is named
        saved = validate(saved, label="the stopped run's config").model_dump(mode="json")
    before, after = _flatten(saved), _flatten(config.model_dump(mode="json"))
    changes = [
        f"{key}: {json.dumps(before.get(key, '<unset>'))} -> {json.dumps(after.get(key, '<unset>'))}"
        for key in sorted(set(before) | set(after))
        if before.get(key, "<unset>") != after.get(key, "<unset>")
    ]
    if changes and not allow:
        raise UserError(
            "--resume: the config differs from the stopped run's (pass --allow-spec-change to continue "
            "anyway): " + "; ".join(changes)
        )


def _forget_other_precision(precision: str) -> None:
    """Let a second run in one process use another precision.

    Accelerate keeps its state in a process-wide singleton and refuses a new ``Accelerator`` whose
    mixed precision differs from the first one's; the distributed part (``PartialState``) is kept.
    """
    from accelerate.state import AcceleratorState  # type: ignore[import-untyped]

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def _fit(
    prepared: Prepared,
    accelerator: Any,
    group: Group,
    folder: Path,
    out_dir: Path,
    log: Log,
    show: bool,
    started: float,
    resume: Saved | None = None,
) -> RunResult:
    config, probe = prepared.config, prepared.probe
    if group.sharded:
        # Shard first: the optimiser must hold the sharded parameters. Each unit moves to the
        # device as it is sharded, so the whole model is never on one device.
        held, total = shard_model(probe, accelerator.device)
        prepared.sharded_parameters = [int(n) for n in group.gather(held)]
        shares = " + ".join(f"{n:,}" for n in prepared.sharded_parameters)
        log(f"fsdp: {total:,} parameters sharded over {group.size} processes: {shares}")
        optimizer = accelerator.prepare_optimizer(build_optimizer(probe, config.optimizer))
        model: Probe = probe
    else:
        optimizer = build_optimizer(probe, config.optimizer)
        probe, optimizer = accelerator.prepare(probe, optimizer)
        model = accelerator.unwrap_model(probe)
    scheduler = config.scheduler.build(optimizer, prepared.total_steps, prepared.steps_per_epoch)
    plan = prepared.cache_plan
    caches = build_caches(prepared, model, accelerator, group, log, show) if plan is not None else {}
    try:
        result, scores = _train_loop(
            prepared,
            accelerator,
            group,
            probe,
            model,
            optimizer,
            scheduler,
            caches,
            folder,
            out_dir,
            log,
            show,
            started,
            resume,
        )
    finally:
        for cache in caches.values():  # released before the outputs are written (lower peak memory)
            cache.close()
    # Every process takes part (sharded weights are gathered); only the writer keeps them.
    weights = trainable_state(model, keep=group.is_main)
    if group.is_main:
        scale = None if accelerator.scaler is None else float(accelerator.scaler.get_scale())
        _write_outputs(prepared, model, weights, folder, result, scores, loss_scale=scale, group=group)
    return result


def build_caches(
    prepared: Prepared, model: Probe, accelerator: Any, group: Group, log: Log, show: bool
) -> dict[str, SplitCache]:
    """The activation caches of the train and val splits (built, or reused from ``cache.dir``).

    With several processes each computes its share of the rows, and the shares are exchanged, so
    every process holds the whole cache and no row passes through the frozen blocks twice."""
    plan = prepared.cache_plan
    assert plan is not None
    config = prepared.config
    spec = config.train.cache
    dtype = storage_dtype(spec, prepared.precision)
    pad_id = int(prepared.backbone.tokenizer.pad_token_id)
    tokenizer = prepared.backbone.tokenizer
    tokenizer_facts = {
        "class": type(tokenizer).__name__,
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "vocab_size": len(tokenizer),
        "max_length": config.model.max_length,
        "padding_side": config.model.padding_side,
    }
    model_facts = {
        "name": prepared.backbone.name,
        "revision": prepared.backbone.revision,
        "provenance": prepared.backbone.provenance,
    }
    width = (
        model.pooler.output_dim(model.layout.hidden_size)
        if plan.mode == "pooled"
        else model.layout.hidden_size
    )
    model.eval()

    def compute(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = batch["input_ids"].to(accelerator.device)
        mask = batch["attention_mask"].to(accelerator.device)
        # Through the probe's own forward: under FSDP only a call of the root unit gathers its
        # parameters.
        with no_grad(group), accelerator.autocast():
            if plan.mode == "pooled":
                return model(ids, mask, output="features")  # type: ignore[no-any-return]
            return model(ids, mask, output="hidden", layers=plan.layers)  # type: ignore[no-any-return]

    shared_facts = cache_facts(
        model, plan, model=model_facts, tokenizer=tokenizer_facts, dtype=dtype, precision=prepared.precision
    )
    caches: dict[str, SplitCache] = {}
    try:
        for name in ("train", "val"):
            encoded = prepared.encoded[name]
            key, facts = cache_key(shared_facts, encoded.ids)
            # The cache stores real tokens only, so the rows are right-padded while computing.
            collate = Collator(encoded, pad_id, "right")
            share: list[Sequence[int]] = list(
                LengthSortedBatchSampler(
                    encoded.lengths,
                    config.train.eval_batch_size,
                    config.train.eval_max_tokens,
                    length_share(encoded.lengths, group.rank, group.size),
                )
            )
            # Under FSDP every process runs as many forwards: empty batches run a throw-away one.
            share += [[] for _ in range(group.forward_counts(len(share)) - len(share))]
            batches = progress_bar(share, show, f"caching {name}", total=len(share))
            begun = time.perf_counter()
            computed = [0]

            def run(rows: Sequence[int], collate: Collator = collate, computed: list[int] = computed) -> Any:
                computed[0] += len(rows)
                return compute(collate(rows)) if rows else compute(collate([0]))[:0]

            cache = build_split_cache(
                plan,
                encoded.lengths,
                batches,
                run,
                width=width,
                dtype=dtype,
                spec=spec,
                key=key,
                facts=facts,
                name=name,
                group=group,
            )
            caches[name] = cache
            prepared.cache_rows[name] = [int(n) for n in group.gather(computed[0])]
            verb = "reused" if cache.reused else f"built in {time.perf_counter() - begun:.1f} s"
            shares = (
                f"; rows computed per process: {' + '.join(map(str, prepared.cache_rows[name]))}"
                if group.active
                else ""
            )
            log(
                f"activation cache {name}: {len(encoded)} rows, {cache.nbytes / 2**20:.1f} MiB "
                f"({cache.location}), {verb}{shares}"
            )
    except BaseException:
        for cache in caches.values():
            cache.close()
        raise
    return caches


MAX_SKIPPED_IN_A_ROW = 50
"""fp16: this many optimiser steps in a row skipped by the grad scaler (non-finite gradients at
every loss scale it tried) count as divergence."""


def _train_loop(
    prepared: Prepared,
    accelerator: Any,
    group: Group,
    probe: Any,
    model: Probe,
    optimizer: Any,
    scheduler: Any,
    caches: dict[str, SplitCache],
    folder: Path,
    out_dir: Path,
    log: Log,
    show: bool,
    started: float,
    resume: Saved | None = None,
) -> tuple[RunResult, dict[str, tuple[np.ndarray, np.ndarray]]]:
    config, spec = prepared.config, prepared.config.train
    pad_id = int(prepared.backbone.tokenizer.pad_token_id)
    side = config.model.padding_side
    plan = prepared.cache_plan
    device = accelerator.device
    train_enc, val_enc = prepared.encoded["train"], prepared.encoded["val"]
    # Every process draws the same global batch order (seed, epoch) and takes its share of it.
    sampler = BucketBatchSampler(
        train_enc.lengths, prepared.per_device_batch, seed=spec.seed, bucket_batches=spec.bucket_batches
    )
    collate = Collator(train_enc, pad_id, side, caches.get("train"))
    val_loader = eval_loader(
        val_enc,
        pad_id,
        spec.eval_batch_size,
        padding_side=side,
        cache=caches.get("val"),
        max_tokens=spec.eval_max_tokens,
        group=group,
    )

    if group.is_main:  # only one process writes run files
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.yaml").write_text(dump_config(config), encoding="utf-8")
    metrics_file = folder / "metrics.jsonl"
    history: list[dict[str, Any]] = []
    best: float | None = None
    best_epoch, bad_epochs, step, skipped, epoch_skipped = 0, 0, 0, 0, 0
    best_state: dict[str, torch.Tensor] = snapshot(model, group)
    best_val: tuple[np.ndarray, np.ndarray] | None = None
    stopped_early = False
    start_epoch, skip = 1, 0  # skip: accumulation windows of start_epoch done before the checkpoint
    loss_total, correct, seen = 0.0, 0, 0
    if resume is not None:
        before = resume.state.get("per_device_batch", prepared.per_device_batch)
        if before != prepared.per_device_batch:
            raise UserError(
                f"--resume: the stopped run had micro-batches of {before} per process; with "
                f"{group.size} process(es) they would be {prepared.per_device_batch}, which changes the "
                f"data order; resume with a process count that keeps {before} per process"
            )
        restored = restore_training(resume, model, optimizer, scheduler, accelerator)
        history, best = restored["history"], restored["best"]
        best_epoch, bad_epochs = restored["epochs"]
        step, stopped_early = restored["step"], restored["stopped_early"]
        start_epoch, skip = restored["epoch"], restored["window"]
        skipped, epoch_skipped = restored["skipped_steps"]
        # The saved sums are over every process; the main process carries them on.
        loss_total, correct, seen = restored["accumulators"] if group.is_main else (0.0, 0, 0)
        best_state = {k.removeprefix("best."): v for k, v in resume.tensors.items() if k.startswith("best.")}
        if "bestval.probs" in resume.tensors:
            best_val = (resume.tensors["bestval.probs"].numpy(), resume.tensors["bestval.labels"].numpy())
        if group.is_main:
            metrics_file.write_text("".join(jsonio.dumps(row) + "\n" for row in history), encoding="utf-8")
        log(
            f"resumed from checkpoint {resume.path.name}: epoch {start_epoch}, "
            f"{skip} optimiser steps into it, step {step}"
        )

    def checkpoint(epoch: int, windows_done: int, epoch_done: bool) -> None:
        """Save everything needed to continue from here. Every process takes part (RNG states
        and running sums are gathered); only the main process writes."""
        totals = [0.0, 0.0, 0.0] if epoch_done else group.sum(loss_total, correct, seen)
        rngs = group.gather(rng_state())
        # Sharded weights and optimiser state are gathered; only the writer keeps them.
        params = trainable_state(model, keep=group.is_main)
        best_params = gathered(best_state, keep=group.is_main)
        optim_tensors, optim_meta = optimizer_state(optimizer, keep=group.is_main)
        if not group.is_main:
            return
        tensors = {f"param.{k}": v for k, v in params.items()}
        tensors.update({f"best.{k}": v for k, v in best_params.items()})
        if best_val is not None:
            tensors["bestval.probs"] = torch.from_numpy(np.asarray(best_val[0]))
            tensors["bestval.labels"] = torch.from_numpy(np.asarray(best_val[1]))
        tensors.update(optim_tensors)
        for rank, (rng_tensors, _meta) in enumerate(rngs):
            tensors.update({(f"rank{rank}." if rank else "") + k: v for k, v in rng_tensors.items()})
        state = {
            "config": config.model_dump(mode="json"),
            "data": prepared.data_fingerprint,
            "processes": group.size,
            "per_device_batch": prepared.per_device_batch,
            "epoch": epoch + 1 if epoch_done else epoch,
            "window": 0 if epoch_done else windows_done,
            "step": step,
            "skipped_steps": [skipped, 0 if epoch_done else epoch_skipped],
            "best": best,
            "epochs": [best_epoch, bad_epochs],
            "stopped_early": stopped_early,
            "accumulators": [totals[0], int(totals[1]), int(totals[2])],
            "history": history,
            "optimizer": optim_meta,
            "scheduler": scheduler_state(scheduler),
            "scaler": None if accelerator.scaler is None else accelerator.scaler.state_dict(),
            "rng": rngs[0][1],
            "rng_ranks": [meta for _tensors, meta in rngs],
        }
        save_state(folder, checkpoint_name(step, epoch_done), tensors, state)

    def stop_if_asked(requested: int) -> None:
        if requested:
            group.barrier()  # the checkpoint is written before any process exits
            stop.raise_for(requested, step, folder if group.is_main else None)

    every = spec.checkpoint_every_steps
    in_a_row = 0
    with _stop_requests() as stop:
        for epoch in range(start_epoch, spec.epochs + 1):
            if stopped_early:
                break
            probe.train()
            if resume is None:
                loss_total, correct, seen, epoch_skipped = 0.0, 0, 0, 0
            order = sampler.batches(epoch - 1)
            schedule = shard_windows(order, prepared.accumulation, group.size, group.rank)
            if resume is not None and epoch == start_epoch:
                schedule = [m for m in schedule if m.window >= skip]
                _restore_rng(resume, group.rank)
            bad_loss = False
            for micro in progress_bar(schedule, show, f"epoch {epoch}/{spec.epochs}", total=len(schedule)):
                batch = {k: v.to(device) for k, v in collate(micro.rows).items()}
                # Gradients are synchronised across processes on a window's last micro-batch only.
                # Autocast here too: a sharded probe is not wrapped by Accelerate, which would add it.
                with gradient_sync(probe, accelerator, enabled=micro.last), accelerator.autocast():
                    logits = probe(**probe_inputs(batch, plan)).float()
                    loss_sum = F.cross_entropy(
                        logits, batch["labels"], label_smoothing=spec.label_smoothing, reduction="sum"
                    )
                    if not torch.isfinite(loss_sum):
                        bad_loss = True
                        if not group.active:
                            raise DivergedError(
                                f"training diverged: non-finite loss at epoch {epoch}, step {step + 1}"
                            )
                    # Each example of the window weighs 1 / (its examples); DDP averages over the
                    # processes, hence x processes. A stand-in micro-batch weighs nothing.
                    scale = micro.weight * group.size / micro.window_examples
                    accelerator.backward(loss_sum * scale)
                if micro.weight:
                    loss_total += float(loss_sum.detach())
                    correct += int((logits.argmax(dim=-1) == batch["labels"]).sum())
                    seen += int(batch["labels"].numel())
                if not micro.last:
                    continue
                requested, diverged = group.max_flags(stop.requested or 0, int(bad_loss))
                if diverged:
                    where = f"epoch {epoch}, step {step + 1}"
                    raise DivergedError(f"training diverged: non-finite loss at {where}")
                if spec.max_grad_norm is not None:
                    norm = accelerator.clip_grad_norm_(probe.parameters(), spec.max_grad_norm)
                    finite = norm is None or bool(torch.isfinite(torch.as_tensor(norm)))
                    if not finite and not precision_skips(accelerator):  # fp16's scaler skips
                        where = f"epoch {epoch}, step {step + 1}"
                        raise DivergedError(f"training diverged: non-finite gradient at {where}")
                optimizer.step()
                advanced = not accelerator.optimizer_step_was_skipped
                if advanced:  # a step the grad scaler skipped does not move the schedule
                    scheduler.step()
                    step += 1
                    in_a_row = 0
                else:
                    skipped, epoch_skipped, in_a_row = skipped + 1, epoch_skipped + 1, in_a_row + 1
                    scale_now = accelerator.scaler.get_scale() if accelerator.scaler is not None else 0.0
                    log(
                        f"warning: step {step + 1} skipped by the fp16 grad scaler (non-finite "
                        f"gradients); loss scale now {scale_now:g}; {skipped} skipped in all"
                    )
                    if in_a_row >= MAX_SKIPPED_IN_A_ROW:
                        raise DivergedError(
                            f"training diverged: {in_a_row} optimiser steps in a row skipped for "
                            f"non-finite fp16 gradients, at epoch {epoch}, step {step + 1}"
                        )
                optimizer.zero_grad(set_to_none=True)
                if micro.window + 1 < prepared.steps_per_epoch and (
                    requested or (advanced and every and step % every == 0)
                ):
                    checkpoint(epoch, micro.window + 1, epoch_done=False)
                    stop_if_asked(requested)
            val_probs, val_labels, val_loss = predict_loader(
                model, val_loader, accelerator, progress=show, plan=plan, group=group
            )
            val = compute_metrics(val_labels, val_probs, 0.5)
            sum_loss, sum_correct, sum_seen = group.sum(loss_total, correct, seen)
            row: dict[str, Any] = {
                "epoch": epoch,
                "step": step,
                "lr_head": optimizer.param_groups[0]["lr"],
                "train_loss": sum_loss / max(sum_seen, 1),
                "train_accuracy": sum_correct / max(sum_seen, 1),
                "val_loss": val_loss,
                **{f"val_{k}": v for k, v in val.items() if k not in {"threshold", "n", "positives"}},
                "skipped_steps": epoch_skipped,
            }
            monitored = val_loss if spec.monitor == "loss" else val[spec.monitor]
            if improves(spec.monitor, monitored, best):
                best, best_epoch, bad_epochs = monitored, epoch, 0
                best_state = snapshot(model, group)
                best_val = (val_probs, val_labels)
                row["best"] = True
            else:
                bad_epochs += 1
                row["best"] = False
            history.append(row)
            if group.is_main:
                with metrics_file.open("a", encoding="utf-8") as handle:
                    handle.write(jsonio.dumps(row) + "\n")
            log(
                f"epoch {epoch}: train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f} | "
                f"val loss {val_loss:.4f} acc {val['accuracy']:.4f} auroc {val['auroc']:.4f}"
                + ("  *best*" if row["best"] else "")
                + (f"  ({epoch_skipped} fp16 steps skipped)" if epoch_skipped else "")
            )
            if bad_epochs >= spec.patience and epoch < spec.epochs:
                stopped_early = True
                log(f"early stop: no val {spec.monitor} improvement for {spec.patience} epochs")
            checkpoint(epoch, 0, epoch_done=True)
            stop_if_asked(group.max_flags(stop.requested or 0)[0])
            resume = None  # later epochs start from their beginning

    restore(model, best_state)
    if best_val is None:
        best_val = predict_loader(model, val_loader, accelerator, plan=plan, group=group)[:2]
    val_probs, val_labels = best_val
    threshold = choose_val_threshold(config, val_labels, val_probs)
    model.threshold = threshold
    results = {"val": compute_metrics(val_labels, val_probs, threshold)}
    scores = {"val": (val_labels, val_probs)}
    if "test" in prepared.encoded:
        test_loader = eval_loader(
            prepared.encoded["test"],
            pad_id,
            spec.eval_batch_size,
            padding_side=side,
            max_tokens=spec.eval_max_tokens,
            group=group,
        )
        test_probs, test_labels, _ = predict_loader(
            model, test_loader, accelerator, progress=show, group=group
        )
        results["test"] = compute_metrics(test_labels, test_probs, threshold)
        scores["test"] = (test_labels, test_probs)
    result = RunResult(
        run_dir=out_dir,
        best_epoch=best_epoch,
        epochs_run=len(history),
        stopped_early=stopped_early,
        threshold=threshold,
        metrics=results,
        history=history,
        seconds=time.perf_counter() - started,
    )
    return result, scores


def restore_training(
    saved: Saved, model: Probe, optimizer: Any, scheduler: Any, accelerator: Any
) -> dict[str, Any]:
    """Load a training-state checkpoint's weights, optimizer, scheduler and grad scaler; return
    its state."""
    from probekit.state import check_fits

    problem = check_fits(saved, trainable_parameters(model), optimizer)
    if problem is not None:
        raise UserError(f"{saved.path}: this checkpoint does not fit the run's probe: {problem}")
    restore(model, {k.removeprefix("param."): v for k, v in saved.tensors.items() if k.startswith("param.")})
    load_optimizer_state(optimizer, saved.tensors, saved.state["optimizer"])
    load_scheduler_state(scheduler, optimizer, saved.state["scheduler"])
    scaler = saved.state.get("scaler")
    if scaler is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(scaler)
    return saved.state


def _restore_rng(saved: Saved, rank: int) -> None:
    """This process's RNG states at the checkpoint (the main process's when the run had fewer
    processes than this one)."""
    prefix = f"rank{rank}."
    ranks = saved.state.get("rng_ranks") or []
    if rank and rank < len(ranks) and f"{prefix}rng.torch" in saved.tensors:
        tensors = {k.removeprefix(prefix): v for k, v in saved.tensors.items() if k.startswith(prefix)}
        set_rng_state(tensors, ranks[rank])
    else:
        set_rng_state({k: v for k, v in saved.tensors.items() if k.startswith("rng.")}, saved.state["rng"])


class _StopRequests:
    """SIGTERM / SIGINT during training: finish the step, write a checkpoint, then stop."""

    def __init__(self) -> None:
        self.requested: int | None = None

    def handle(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT and self.requested == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once
        self.requested = signum

    def raise_for(self, signum: int, step: int, folder: Path | None) -> None:
        """Stop for ``signum`` (received by this process or by another one of the run);
        ``folder``: where the checkpoint went (None in a process that does not write)."""
        what = "SIGTERM" if signum == signal.SIGTERM else "SIGINT"
        where = (
            f"a checkpoint was written to {folder / STATE_DIR}"
            if folder is not None
            else "the main process wrote the checkpoint"
        )
        message = (
            f"stopped by {what} after step {step}; {where}; continue with the same command plus --resume"
        )
        if signum == signal.SIGTERM:
            raise TerminatedError(message)
        raise InterruptedRunError(message)


@contextmanager
def _stop_requests() -> Iterator[_StopRequests]:
    stop = _StopRequests()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.signal(sig, stop.handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def precision_skips(accelerator: Any) -> bool:
    """True when a grad scaler (fp16) is active: it skips steps with non-finite gradients itself."""
    return getattr(accelerator, "scaler", None) is not None


def snapshot(model: Probe, group: Group) -> dict[str, torch.Tensor]:
    """The trainable weights to come back to (the best epoch's): CPU copies, or under fsdp a copy
    of this process's shards, on its device (nothing gathered; `restore` takes either)."""
    if not group.sharded:
        return trainable_state(model)
    reshard(model)  # the root unit stays gathered after a forward pass: copy its shards
    return {name: p.detach().clone() for name, p in trainable_parameters(model).items()}


def restore(model: Probe, state: dict[str, torch.Tensor]) -> None:
    """Copy trainable tensors back into ``model``: whole ones (each process takes its shard of
    them when sharded), or shards from `snapshot`."""
    reshard(model)  # write the shards, not a gathered copy that the next reshard drops
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(shard_like(tensor, params[name]))


def _write_outputs(
    prepared: Prepared,
    model: Probe,
    weights: dict[str, torch.Tensor],
    folder: Path,
    result: RunResult,
    scores: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    group: Group,
    loss_scale: float | None = None,
) -> None:
    from probekit.plots import write_report_plots

    config = prepared.config
    save_checkpoint(
        model,
        folder / "checkpoint",
        weights=weights,
        config=config.model_dump(mode="json"),
        label_map=prepared.dataset.label_map,
        label_names=label_names(prepared.dataset.label_map),
        threshold=result.threshold,
        backbone={
            "name": prepared.backbone.name,
            "revision": prepared.backbone.revision,
            "provenance": prepared.backbone.provenance,
            "model_type": model.layout.model_type,
            "num_blocks": model.layout.num_blocks,
            "hidden_size": model.layout.hidden_size,
        },
    )
    report = {
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "threshold": result.threshold,
        "threshold_rule": threshold_rule_id(config),
        "metrics": result.metrics,
        "data": {
            "label_map": prepared.dataset.label_map,
            "class_balance": {
                k: {str(c): n for c, n in v.items()} for k, v in prepared.dataset.report.class_balance.items()
            },
            "shared_duplicates": prepared.dataset.report.shared_duplicates,
            "truncated": {name: enc.truncated for name, enc in prepared.encoded.items()},
        },
        "batching": {
            "bucket_batches": config.train.bucket_batches,
            "padding_fraction": prepared.padding[0],
            "random_batches_padding_fraction": prepared.padding[1],
        },
        "activation_cache": None
        if prepared.cache_plan is None
        else {
            "mode": prepared.cache_plan.mode,
            "layers": list(prepared.cache_plan.layers),
            "boundary": prepared.cache_plan.boundary,
            "rows_computed_per_process": prepared.cache_rows,
        },
        "distributed": {
            "processes": prepared.num_processes,
            "strategy": group.strategy,
            "parameters_per_process": prepared.sharded_parameters or None,
            "per_device_batch": prepared.per_device_batch,
            "accumulation": prepared.accumulation,
            "effective_batch": prepared.effective_batch,
        },
        "numerics": {
            "precision": "fp32" if prepared.precision == "no" else prepared.precision,
            "skipped_steps": sum(int(row.get("skipped_steps", 0)) for row in result.history),
            "loss_scale": loss_scale,
        },
        "plan": prepared.describe(),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (folder / "report.json").write_text(jsonio.dumps(report, indent=2) + "\n", encoding="utf-8")
    (folder / "summary.txt").write_text("\n".join(result.summary()[1:]) + "\n", encoding="utf-8")
    labels, probs = scores.get("test", scores["val"])
    names = tuple(str(n) for n in label_names(prepared.dataset.label_map))
    write_report_plots(folder / "plots", result.history, labels, probs, result.threshold, names)
