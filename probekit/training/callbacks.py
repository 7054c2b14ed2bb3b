"""Callbacks: the policies around the loop, each owning its state.

Four hooks, called on every process in the same order (some of them gather under FSDP): at
the start of the fit, after each accumulation window (optimiser step), after each epoch (its
validation done), and at the end of the fit (also after an error: ``fit.failed`` says which).
A callback's ``state_dict`` goes into every training-state checkpoint and comes back through
``load_state_dict`` on ``--resume``.

The built-in ones, in the order a run uses them: `EarlyStopping` (marks the best epoch, stops
after ``train.patience`` epochs without improvement), `BestWeights` (keeps the best epoch's
weights and validation scores, restores them at the end), `MetricsFile` (``metrics.jsonl`` and
the epoch's log line), `probekit.training.trackers.StepsFile` (``steps.jsonl``, the trackers),
then the user's callbacks, then `StateCheckpoints` (writes and restores training-state
checkpoints) and `StopOnSignal` (SIGTERM / Ctrl-C stop after a checkpoint).

A callback of your own, passed as ``probekit.train(config, callbacks=[...])``::

    class LogSteps(probekit.training.Callback):
        def on_window_end(self, fit):
            print(fit.state.step, fit.window_loss, fit.optimizer.param_groups[0]["lr"])
"""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from probekit import jsonio
from probekit.checkpoint import trainable_parameters, trainable_state
from probekit.distributed import gathered, reshard, shard_like
from probekit.errors import InterruptedRunError, TerminatedError
from probekit.state import (
    STATE_DIR,
    Saved,
    checkpoint_name,
    optimizer_state,
    rng_state,
    save_state,
    scheduler_state,
    set_rng_state,
)
from probekit.tasks.base import Scores

if TYPE_CHECKING:
    from probekit.distributed import Group
    from probekit.training.loop import Fit


class Callback:
    """A policy around the loop. Override the hooks you need; ``state_dict`` returns what must
    survive a stop (JSON values, and tensors under their own names), ``load_state_dict`` takes it
    back. ``key`` names a callback's state in checkpoints (default: its class name). A user's
    callback reads ``fit.row`` and ``fit.state`` and keeps what it computes in itself: those two
    are the run's own record (``metrics.jsonl``, checkpoints)."""

    key: ClassVar[str | None] = None

    def on_fit_start(self, fit: Fit) -> None:
        """Before the first step (after a resume's checkpoint was loaded)."""

    def on_window_end(self, fit: Fit) -> None:
        """After an accumulation window's optimiser step (skipped by fp16 or not)."""

    def on_epoch_end(self, fit: Fit) -> None:
        """After an epoch's validation: ``fit.row`` is its ``metrics.jsonl`` row, ``fit.val`` its
        scores; ``fit.state`` already points at the next epoch."""

    def on_fit_end(self, fit: Fit) -> None:
        """After the last epoch, or after an error (``fit.failed``)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take back what `state_dict` gave."""

    def state_key(self) -> str:
        return self.key or type(self).__name__


LOWER_IS_BETTER = frozenset({"loss", "mae", "rmse"})
"""Monitored metrics where lower is better."""


def improves(metric: str, value: float, best: float | None) -> bool:
    """Whether ``value`` of the monitored ``metric`` beats ``best`` (lower for `LOWER_IS_BETTER`,
    higher otherwise); nan never does, anything beats None."""
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best


class EarlyStopping(Callback):
    """Marks each epoch that improves the monitored validation metric (``row["best"]``) and stops
    after ``patience`` epochs without improvement (never after the last epoch)."""

    def __init__(self, monitor: str, patience: int, epochs: int) -> None:
        self.monitor, self.patience, self.epochs = monitor, patience, epochs
        self.best: float | None = None
        self.best_epoch = 0
        self.bad_epochs = 0

    def on_epoch_end(self, fit: Fit) -> None:
        row, value = fit.row, fit.monitored
        if improves(self.monitor, value, self.best):
            self.best, self.best_epoch, self.bad_epochs = value, row["epoch"], 0
            row["best"] = True
        else:
            self.bad_epochs += 1
            row["best"] = False
        if self.bad_epochs >= self.patience and row["epoch"] < self.epochs:
            fit.state.stopped_early = True
            fit.notes.append(f"early stop: no val {self.monitor} improvement for {self.patience} epochs")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "epochs": [self.best_epoch, self.bad_epochs]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = state["best"]
        self.best_epoch, self.bad_epochs = state["epochs"]


def snapshot(model: Any, group: Group) -> dict[str, torch.Tensor]:
    """The trainable weights to come back to: CPU copies, or under fsdp a copy of this process's
    shards, on its device (nothing gathered; `restore` takes either)."""
    if not group.sharded:
        return trainable_state(model)
    reshard(model)  # the root unit stays gathered after a forward pass: copy its shards
    return {name: p.detach().clone() for name, p in trainable_parameters(model).items()}


def restore(model: Any, state: Mapping[str, torch.Tensor]) -> None:
    """Copy trainable tensors back into ``model``: whole ones (each process takes its shard of
    them when sharded), or shards from `snapshot`."""
    reshard(model)  # write the shards, not a gathered copy that the next reshard drops
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(shard_like(tensor, params[name]))


class BestWeights(Callback):
    """Keeps the weights and the validation scores of the best epoch so far and restores the
    weights when the fit ends (the scores choose the decision threshold)."""

    def __init__(self, group: Group) -> None:
        self.group = group
        self.weights: dict[str, torch.Tensor] | None = None
        self.val: Scores | None = None

    def on_fit_start(self, fit: Fit) -> None:
        if self.weights is None:
            self.weights = snapshot(fit.probe, self.group)

    def on_epoch_end(self, fit: Fit) -> None:
        if fit.row.get("best"):
            self.weights = snapshot(fit.probe, self.group)
            self.val = fit.val

    def on_fit_end(self, fit: Fit) -> None:
        if fit.failed is None and self.weights is not None:
            restore(fit.probe, self.weights)

    def state_dict(self) -> dict[str, Any]:
        """Gathered under fsdp (every process takes part; only the main one keeps them)."""
        found: dict[str, Any] = {
            f"best.{k}": v for k, v in gathered(self.weights or {}, keep=self.group.is_main).items()
        }
        if self.val is not None:
            found["bestval.probs"] = torch.from_numpy(np.asarray(self.val.scores))
            found["bestval.labels"] = torch.from_numpy(np.asarray(self.val.labels))
        return found

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.weights = {k.removeprefix("best."): v for k, v in state.items() if k.startswith("best.")}
        if "bestval.probs" in state:
            self.val = Scores(state["bestval.labels"].numpy(), state["bestval.probs"].numpy(), math.nan)


class MetricsFile(Callback):
    """Appends each epoch's row to ``metrics.jsonl`` (written from the history at the start, so a
    resumed run's file holds the epochs before the stop) and
    logs the epoch's line, with what the callbacks before it noted (an early stop)."""

    def __init__(self, folder: Path | None) -> None:
        self.path = None if folder is None else folder / "metrics.jsonl"

    def on_fit_start(self, fit: Fit) -> None:
        if self.path is not None:  # a resumed run's history, or an empty file
            self.path.write_text(
                "".join(jsonio.dumps(row) + "\n" for row in fit.state.history), encoding="utf-8"
            )

    def on_epoch_end(self, fit: Fit) -> None:
        row = fit.row
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(jsonio.dumps(row) + "\n")
        val_metrics = {k.removeprefix("val_"): v for k, v in row.items() if k.startswith("val_")}
        fit.ctx.log(
            f"epoch {row['epoch']}: train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f} | "
            f"val loss {row['val_loss']:.4f} {fit.plan.task.epoch_line(val_metrics)}"
            + ("  *best*" if row["best"] else "")
            + (f"  ({row['skipped_steps']} fp16 steps skipped)" if row["skipped_steps"] else "")
        )
        for note in fit.notes:
            fit.ctx.log(note)


class StateCheckpoints(Callback):
    """Writes a training-state checkpoint every ``every`` optimiser steps (None: epochs only), at
    a stop request, and after each epoch, into ``folder``'s ``state/`` (`probekit.state`), and
    brings a run back from one (`resume`). ``write=False`` (``train.resumable=false``): none
    are written (nor gathered)."""

    def __init__(
        self, folder: Path | None, every: int | None, saved: Saved | None = None, *, write: bool = True
    ) -> None:
        self.folder, self.every, self.saved, self.enabled = folder, every, saved, write

    def on_fit_start(self, fit: Fit) -> None:
        if self.saved is None:
            return
        # The fp16 grad scaler, and the generators as they were right before the next step.
        scaler = self.saved.state.get("scaler")
        if scaler is not None and fit.ctx.scaler is not None:
            fit.ctx.scaler.load_state_dict(scaler)
        restore_rng(self.saved, fit.ctx.group.rank)

    def on_window_end(self, fit: Fit) -> None:
        every = self.every
        due = fit.advanced and every is not None and fit.state.step % every == 0
        if not fit.last_window and (fit.requested or due):
            self.write(fit)

    def on_epoch_end(self, fit: Fit) -> None:
        self.write(fit)

    def write(self, fit: Fit) -> None:
        """Save everything needed to continue from here. Every process takes part (RNG states and
        running sums are gathered, sharded tensors too); only the main process writes."""
        if not self.enabled:
            return
        group, state = fit.ctx.group, fit.state
        totals = group.sum(state.loss_sum, state.correct, state.seen) if state.window else None
        rngs = group.gather(rng_state())
        params = trainable_state(fit.probe, keep=group.is_main)
        extra = {cb: cb.state_dict() for cb in fit.callbacks}
        keys = state_keys(fit.callbacks)
        optim_tensors, optim_meta = optimizer_state(fit.optimizer, keep=group.is_main)
        if not group.is_main or self.folder is None:
            return
        tensors: dict[str, torch.Tensor] = {f"param.{k}": v for k, v in params.items()}
        document: dict[str, Any] = {
            "config": fit.plan.config.model_dump(mode="json"),
            "data": fit.plan.data_fingerprint,
            "processes": group.size,
            "per_device_batch": fit.plan.per_device_batch,
            **state.to_json(None if totals is None else (totals[0], int(totals[1]), int(totals[2]))),
        }
        for cb, values in extra.items():
            plain = {k: v for k, v in values.items() if not isinstance(v, torch.Tensor)}
            arrays = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
            key = keys.get(id(cb))
            if key is None:  # a built-in: the keys of earlier versions, at the top level
                document.update(plain)
                tensors.update(arrays)
            else:
                document.setdefault("callbacks", {})[key] = plain
                tensors.update({f"callback.{key}.{k}": v for k, v in arrays.items()})
        tensors.update(optim_tensors)
        for rank, (rng_tensors, _meta) in enumerate(rngs):
            tensors.update({(f"rank{rank}." if rank else "") + k: v for k, v in rng_tensors.items()})
        document.update(
            optimizer=optim_meta,
            scheduler=scheduler_state(fit.scheduler),
            scaler=None if fit.ctx.scaler is None else fit.ctx.scaler.state_dict(),
            rng=rngs[0][1],
            rng_ranks=[meta for _tensors, meta in rngs],
        )
        save_state(self.folder, checkpoint_name(state.step, state.window == 0), tensors, document)


BUILTIN: set[type[Callback]] = set()
"""probekit's own callback classes defined in other modules (`probekit.training.trackers`)."""


def is_builtin(cb: Callback) -> bool:
    """One of probekit's own callbacks (exactly: a subclass of one is the user's)."""
    own = (EarlyStopping, BestWeights, MetricsFile, StateCheckpoints, StopOnSignal)
    return type(cb) in own or type(cb) in BUILTIN


def state_keys(callbacks: list[Callback]) -> dict[int, str]:
    """Where each user callback's state goes in a checkpoint (by ``id``): its `state_key`, with
    ``#2``, ``#3``... for further callbacks of the same key."""
    keys: dict[int, str] = {}
    counts: dict[str, int] = {}
    for cb in callbacks:
        if is_builtin(cb):
            continue
        base = cb.state_key()
        counts[base] = counts.get(base, 0) + 1
        keys[id(cb)] = base if counts[base] == 1 else f"{base}#{counts[base]}"
    return keys


def callback_states(saved: Saved, cb: Callback, key: str | None) -> dict[str, Any]:
    """What a checkpoint holds for ``cb``: the top-level keys for a built-in callback (``key``
    None), its own block and tensors for another (see `state_keys`)."""
    if key is None:
        return {**saved.state, **saved.tensors}
    prefix = f"callback.{key}."
    blocks = saved.state.get("callbacks")
    own = dict(blocks.get(key) or {}) if isinstance(blocks, dict) else {}
    own.update({k.removeprefix(prefix): v for k, v in saved.tensors.items() if k.startswith(prefix)})
    return own


def restore_rng(saved: Saved, rank: int) -> None:
    """This process's RNG states at the checkpoint (the main process's when the run had fewer
    processes than this one)."""
    prefix = f"rank{rank}."
    ranks = saved.state.get("rng_ranks") or []
    if rank and rank < len(ranks) and f"{prefix}rng.torch" in saved.tensors:
        tensors = {k.removeprefix(prefix): v for k, v in saved.tensors.items() if k.startswith(prefix)}
        set_rng_state(tensors, ranks[rank])
    else:
        set_rng_state({k: v for k, v in saved.tensors.items() if k.startswith("rng.")}, saved.state["rng"])


CONTINUE = "continue with the same command plus --resume"


class StopOnSignal(Callback):
    """SIGTERM and the first Ctrl-C during the fit: finish the step, let `StateCheckpoints` write
    a checkpoint, then stop (exit 143 / 130); a second Ctrl-C stops at once. Every process agrees
    on a request at the next window end (or epoch end), so all stop after the same step."""

    def __init__(self, folder: Path | None, *, resumable: bool = True) -> None:
        self.folder, self.resumable = folder, resumable
        self.previous: dict[int, Any] = {}
        self.fit: Fit | None = None

    def handle(self, signum: int, _frame: Any) -> None:
        assert self.fit is not None
        if signum == signal.SIGINT and self.fit.signal == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once
        self.fit.signal = signum

    def on_fit_start(self, fit: Fit) -> None:
        self.fit = fit
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def on_window_end(self, fit: Fit) -> None:
        if fit.requested and not fit.last_window:
            self.stop(fit, fit.requested)

    def on_epoch_end(self, fit: Fit) -> None:
        requested = fit.ctx.group.max_flags(fit.signal)[0]
        if requested:
            self.stop(fit, requested)

    def on_fit_end(self, fit: Fit) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def stop(self, fit: Fit, signum: int) -> None:
        """Stop for ``signum`` (received by this process or another one of the run), after every
        process is past the checkpoint."""
        fit.ctx.group.barrier()
        what = "SIGTERM" if signum == signal.SIGTERM else "SIGINT"
        if not self.resumable:
            where = "no checkpoint was written (train.resumable is false), so the run cannot be continued"
        elif self.folder is not None and fit.ctx.is_main:
            where = f"a checkpoint was written to {self.folder / STATE_DIR}; {CONTINUE}"
        else:
            where = f"the main process wrote the checkpoint; {CONTINUE}"
        message = f"stopped by {what} after step {fit.state.step}; {where}"
        raise (TerminatedError if signum == signal.SIGTERM else InterruptedRunError)(message)
