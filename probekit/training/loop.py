"""The loop: accumulation windows and epochs, numerics only.

`fit` runs the epochs a `TrainState` has left. Each accumulation window is this process's share
of the global, seeded batch order (`probekit.distributed.shard_windows`); its micro-batches run
forward under autocast, their summed loss is scaled by the window's examples (the optimiser
sees the mean over the effective batch, whatever the process count), gradients are
synchronised on the window's last micro-batch, clipped, and the optimiser and schedule step
(unless the fp16 grad scaler skips the step). After each epoch the validation split is scored.
Everything else (early stopping, best weights, checkpoints, the metrics file, signals, your own
policies) is a callback.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from probekit.batching import Batch, Collator, Encoded, Progress, inference_loader
from probekit.cache import CachePlan, SplitCache
from probekit.distributed import gradient_sync, shard_windows
from probekit.errors import DivergedError
from probekit.inference import Runner, predict
from probekit.tasks.base import Scores, Task
from probekit.training.callbacks import Callback
from probekit.training.context import RunContext
from probekit.training.state import TrainState

MAX_SKIPPED_IN_A_ROW = 50
"""fp16: this many optimiser steps in a row skipped by the grad scaler (non-finite gradients at
every loss scale it tried) count as divergence."""


class FitPlan(Protocol):
    """What the loop reads from a plan (`probekit.training.plan.TrainPlan` has it; the sweep
    builds one per candidate)."""

    @property
    def config(self) -> Any: ...
    @property
    def task(self) -> Task: ...
    @property
    def encoded(self) -> dict[str, Encoded]: ...
    @property
    def pad_id(self) -> int: ...
    @property
    def per_device_batch(self) -> int: ...
    @property
    def accumulation(self) -> int: ...
    @property
    def steps_per_epoch(self) -> int: ...
    @property
    def cache_plan(self) -> CachePlan | None: ...
    @property
    def data_fingerprint(self) -> dict[str, dict[str, Any]]: ...
    @property
    def class_weights(self) -> tuple[float, ...] | None: ...


@dataclass
class Parts:
    """What trains: the model as Accelerate wraps it (DDP), the probe inside it, the optimiser,
    the schedule, and the activation caches of the splits."""

    model: Any
    probe: Any
    optimizer: Any
    scheduler: Any
    caches: dict[str, SplitCache] = field(default_factory=dict)


@dataclass
class Fit:
    """The loop as callbacks see it: the run's context, plan and parts, its `TrainState`, the
    callbacks, and what the hook at hand is about."""

    ctx: RunContext
    plan: FitPlan
    parts: Parts
    state: TrainState
    callbacks: list[Callback]
    signal: int = 0
    """A stop signal this process received (set by `StopOnSignal`); 0 for none."""
    requested: int = 0
    """At a window end: the stop signal any process received (agreed by all), or 0."""
    advanced: bool = False
    """At a window end: whether the optimiser stepped (the fp16 scaler may skip a step)."""
    last_window: bool = False
    window_loss: float = 0.0
    """At a window end: this process's summed training loss of the window divided by the window's
    examples over every process (with one process: the window's mean loss)."""
    grad_norm: float | None = None
    """At a window end: the gradient norm before clipping (``train.max_grad_norm``); None without
    clipping."""
    row: dict[str, Any] = field(default_factory=dict)
    """At an epoch end: the epoch's ``metrics.jsonl`` row."""
    val: Scores | None = None
    monitored: float = float("nan")
    """At an epoch end: the value of ``train.monitor`` on validation."""
    notes: list[str] = field(default_factory=list)
    """At an epoch end: lines for the log after the epoch's line."""
    failed: BaseException | None = None

    @property
    def probe(self) -> Any:
        return self.parts.probe

    @property
    def optimizer(self) -> Any:
        return self.parts.optimizer

    @property
    def scheduler(self) -> Any:
        return self.parts.scheduler

    def call(self, hook: str) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self)


def fit(
    ctx: RunContext, plan: FitPlan, parts: Parts, state: TrainState, callbacks: Sequence[Callback]
) -> Fit:
    """Train from ``state`` to the last epoch (or an early stop); returns the finished `Fit`."""
    from probekit.batching import BucketBatchSampler

    run = Fit(ctx, plan, parts, state, list(callbacks))
    spec = plan.config.train
    train = plan.encoded["train"]
    sampler = BucketBatchSampler(
        train.lengths, plan.per_device_batch, seed=spec.seed, bucket_batches=spec.bucket_batches
    )
    collate = Collator(train, plan.pad_id, plan.config.model.padding_side, parts.caches.get("train"))
    runner = Runner(ctx.device, ctx.autocast, ctx.group, ctx.progress)
    val_loader = inference_loader(
        plan.encoded["val"],
        plan.pad_id,
        spec.eval_batch_size,
        padding_side=plan.config.model.padding_side,
        cache=parts.caches.get("val"),
        max_tokens=spec.eval_max_tokens,
        group=ctx.group,
    )
    try:
        run.call("on_fit_start")
        while state.epoch <= spec.epochs and not state.stopped_early:
            parts.model.train()
            order = sampler.batches(state.epoch - 1)
            schedule = shard_windows(order, plan.accumulation, ctx.group.size, ctx.group.rank)
            _train_epoch(run, [m for m in schedule if m.window >= state.window], collate)
            _end_epoch(run, runner, val_loader)
    except BaseException as exc:
        run.failed = exc
        _end_fit(run)  # the fit's own error is the one that propagates
        raise
    error = _end_fit(run)
    if error is not None:
        raise error
    return run


def _end_fit(run: Fit) -> BaseException | None:
    """Every callback's ``on_fit_end``, even when one of them raises (a signal handler must always
    be put back); returns the first error."""
    first: BaseException | None = None
    for callback in run.callbacks:
        try:
            callback.on_fit_end(run)
        except BaseException as exc:
            first = first or exc
    return first


def _token_level(run: Fit, batch: Batch, weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level training (``loss.token_level``): every token the pooler reads carries its row's
    label; a row's loss is the mean over its tokens (normalised per row), summed over rows as the
    row-level loss is. Also returns per-row logits (the mean of its tokens') for the running
    accuracy."""
    inputs = batch.inputs(run.plan.cache_plan)
    reads = inputs.pop("read_mask", batch.attention_mask)
    tokens = run.parts.model(**inputs, output="token_logits").float()
    smoothing = run.plan.config.train.label_smoothing
    return token_level_loss(run.plan.task, tokens, reads, batch.labels, smoothing=smoothing, weights=weights)


def token_level_loss(
    task: Task,
    tokens: torch.Tensor,
    reads: torch.Tensor,
    labels: torch.Tensor,
    *,
    smoothing: float = 0.0,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, row_logits)`` of token-level training: ``tokens`` ``(b, t, outputs)`` logits, of
    which row ``r`` reads those where ``reads[r]`` is set; each read token gets its row's label,
    row ``r``'s loss is the mean of its tokens' (the task's loss, smoothing and class weights
    included), and ``loss`` is the sum over rows, as a row-level batch loss is. ``row_logits``:
    the mean of each row's read tokens' logits."""
    total = tokens.new_zeros(())
    rows = []
    for r in range(tokens.shape[0]):
        chosen = tokens[r][reads[r].bool()]
        target = labels[r : r + 1].expand(chosen.shape[0], *labels.shape[1:])
        total = total + task.loss(chosen, target, smoothing=smoothing, weights=weights) / chosen.shape[0]
        rows.append(chosen.mean(dim=0))
    return total, torch.stack(rows)


def _train_epoch(run: Fit, schedule: Sequence[Any], collate: Collator) -> None:
    """The epoch's remaining micro-batches: forward, scaled backward, and at each window's end the
    agreed stop/divergence flags, clipping, the optimiser step and the window's callbacks."""
    ctx, plan, parts, state = run.ctx, run.plan, run.parts, run.state
    spec, group, task = plan.config.train, ctx.group, plan.task
    bad_loss, window_loss = False, 0.0
    epochs = spec.epochs
    weights = None if plan.class_weights is None else torch.tensor(plan.class_weights, device=ctx.device)
    shown = Progress(
        schedule,
        bar=ctx.progress,
        desc=f"epoch {state.epoch}/{epochs}",
        total=len(schedule),
        heartbeat=None if ctx.progress else ctx.log,
    )
    for micro in shown:
        batch = collate(micro.rows).to(ctx.device)
        # Gradients are synchronised across processes on a window's last micro-batch only.
        # Autocast here too: a sharded probe is not wrapped by Accelerate, which would add it.
        with gradient_sync(parts.model, ctx.accelerator, enabled=micro.last), ctx.autocast():
            if plan.config.loss.token_level:
                loss_sum, logits = _token_level(run, batch, weights)
            else:
                logits = parts.model(**batch.inputs(plan.cache_plan)).float()
                loss_sum = task.loss(logits, batch.labels, smoothing=spec.label_smoothing, weights=weights)
            if not torch.isfinite(loss_sum):
                bad_loss = True
                if not group.active:
                    raise DivergedError(f"training diverged: non-finite loss at {_where(state)}")
            # Each example of the window weighs 1 / (its examples); DDP averages over the
            # processes, hence x processes. A stand-in micro-batch weighs nothing.
            ctx.accelerator.backward(loss_sum * (micro.weight * group.size / micro.window_examples))
        if micro.weight:
            value = float(loss_sum.detach())
            state.loss_sum += value
            window_loss += value
            state.correct += task.correct(logits, batch.labels)
            state.seen += len(batch)
        if not micro.last:
            continue
        run.requested, diverged = group.max_flags(run.signal, int(bad_loss))
        if diverged:
            raise DivergedError(f"training diverged: non-finite loss at {_where(state)}")
        run.advanced = _step(run)
        state.window = micro.window + 1
        run.last_window = state.window >= plan.steps_per_epoch
        run.window_loss = window_loss / max(micro.window_examples, 1)
        window_loss = 0.0
        run.call("on_window_end")
        shown.note(loss=run.window_loss, lr=run.optimizer.param_groups[0]["lr"])


def _where(state: TrainState) -> str:
    return f"epoch {state.epoch}, step {state.step + 1}"


def _step(run: Fit) -> bool:
    """Clip, step the optimiser (and the schedule, unless the fp16 scaler skipped the step),
    clear the gradients; return whether the optimiser stepped."""
    ctx, parts, state = run.ctx, run.parts, run.state
    spec = run.plan.config.train
    run.grad_norm = None
    if spec.max_grad_norm is not None:
        norm = ctx.accelerator.clip_grad_norm_(parts.model.parameters(), spec.max_grad_norm)
        run.grad_norm = None if norm is None else float(norm)
        finite = norm is None or bool(torch.isfinite(torch.as_tensor(norm)))
        if not finite and ctx.scaler is None:  # fp16's scaler skips the step itself
            raise DivergedError(f"training diverged: non-finite gradient at {_where(state)}")
    parts.optimizer.step()
    advanced = not ctx.accelerator.optimizer_step_was_skipped
    if advanced:  # a step the grad scaler skipped does not move the schedule
        parts.scheduler.step()
        state.step += 1
        state.in_a_row = 0
    else:
        state.skipped, state.epoch_skipped, state.in_a_row = (
            state.skipped + 1,
            state.epoch_skipped + 1,
            state.in_a_row + 1,
        )
        scale = ctx.scaler.get_scale() if ctx.scaler is not None else 0.0
        ctx.log(
            f"warning: step {state.step + 1} skipped by the fp16 grad scaler (non-finite "
            f"gradients); loss scale now {scale:g}; {state.skipped} skipped in all"
        )
        if state.in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise DivergedError(
                f"training diverged: {state.in_a_row} optimiser steps in a row skipped for "
                f"non-finite fp16 gradients, at {_where(state)}"
            )
    parts.optimizer.zero_grad(set_to_none=True)
    return advanced


def _end_epoch(run: Fit, runner: Runner, val_loader: Any) -> None:
    """Score the validation split, make the epoch's row, move the state to the next epoch, and
    call the epoch's callbacks."""
    ctx, plan, state = run.ctx, run.plan, run.state
    task, spec = plan.task, plan.config.train
    val = predict(run.probe, val_loader, runner, task, cache_plan=plan.cache_plan)
    metrics = task.epoch_metrics(val)
    loss, correct, seen = ctx.group.sum(state.loss_sum, state.correct, state.seen)
    row: dict[str, Any] = {
        "epoch": state.epoch,
        "step": state.step,
        "lr_head": run.optimizer.param_groups[0]["lr"],
        "train_loss": loss / max(seen, 1),
        "train_accuracy": correct / max(seen, 1),
        "val_loss": val.loss,
        **{f"val_{k}": v for k, v in metrics.items()},
        "skipped_steps": state.epoch_skipped,
    }
    run.row, run.val, run.notes = row, val, []
    run.monitored = task.monitor(spec.monitor, val, metrics)
    state.history.append(row)
    state.next_epoch()
    run.call("on_epoch_end")
