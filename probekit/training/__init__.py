"""Training: ``train(config) -> RunResult``, read top to bottom like the recipe it runs.

``config -> prepare (TrainPlan) -> parts and caches -> fit (TrainState + callbacks) -> finish
(threshold, test) -> outputs (RunResult)``. The modules, one concern each:

- `probekit.training.context`: `RunContext` (device, process group, `Precision`), resolved once;
- `probekit.training.plan`: `prepare` and the frozen `TrainPlan` (``--dry-run`` prints it);
- `probekit.batching`: tokenising, the typed `Batch`, loaders;
- `probekit.training.caches`: building the activation caches;
- `probekit.training.state`: `TrainState`, where a run stands;
- `probekit.training.callbacks`: the `Callback` hooks and the built-in policies;
- `probekit.training.loop`: `fit`, numerics only;
- `probekit.inference`: `forward` / `predict` (the one inference path) and `finish`;
- `probekit.training.outputs`: `RunResult`, the checkpoint folder, report, summary and plots;
- `probekit.training.resume`: continuing a stopped run.

The task (binary today) is `probekit.tasks`; the run folder transaction is `probekit.rundir`.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from probekit import memory
from probekit.batching import inference_loader
from probekit.checkpoint import trainable_state
from probekit.config import ProbeConfig
from probekit.distributed import is_peer_failure, peer_lost, shard_model
from probekit.errors import Terminated, UserError
from probekit.inference import Runner, finish, predict
from probekit.optim import build_optimizer, fused_update
from probekit.rundir import RunFolder, check_out, default_run_dir, explain_failure
from probekit.state import STATE_DIR, Saved, has_checkpoint
from probekit.tasks.base import Scores
from probekit.training.caches import build_caches
from probekit.training.callbacks import (
    BestWeights,
    Callback,
    EarlyStopping,
    MetricsFile,
    StateCheckpoints,
    StopOnSignal,
    callback_states,
    state_keys,
)
from probekit.training.context import Log, Precision, RunContext, deterministic_algorithms
from probekit.training.loop import Fit, Parts, fit
from probekit.training.outputs import RunFacts, RunResult, write_config, write_outputs
from probekit.training.plan import TrainPlan, absolute_paths, check_cache_dir, input_paths, prepare
from probekit.training.resume import (
    check_same_batches,
    check_same_data,
    check_same_spec,
    find_resumable,
    restore_training,
)
from probekit.training.state import TrainState
from probekit.training.trackers import StepsFile

__all__ = [
    "Callback",
    "Fit",
    "Precision",
    "RunContext",
    "RunResult",
    "TrainPlan",
    "TrainState",
    "prepare",
    "train",
]


def train(
    config: ProbeConfig,
    *,
    out: str | Path | None = None,
    callbacks: Sequence[Callback] = (),
    overwrite: bool = False,
    log: Log = print,
    progress: bool | None = None,
    name: str = "run",
    resume: bool = False,
    allow_spec_change: bool = False,
    protect: Mapping[str, str | Path] | None = None,
    model: Any = None,
    tokenizer: Any = None,
    data: Any = None,
) -> RunResult:
    """Train the probe ``config`` describes and write its run folder; return the results.

    Args:
        config: a validated config (``probekit.preset(...)``, ``probekit.load_config(...)``).
        out: the run folder (default ``runs/<name>-<timestamp>``); must not exist or be empty
            unless ``overwrite``. The run is written to a temporary sibling and moved into place
            when complete, so a failed run leaves no half-written folder.
        callbacks: your own `Callback` objects, called after the built-in ones that decide
            (early stopping, best weights, the metrics file) and before the checkpoint is written.
        overwrite: replace an earlier run in ``out`` once the new run is complete.
        log: where progress lines go (``print`` by default).
        progress: show progress bars; default: when stderr is a terminal.
        name: prefix of the default run folder name; one folder name (letters, digits, ``.``,
            ``_``, ``-``), never a path.
        resume: continue the unfinished run of ``out`` from its newest intact training-state
            checkpoint; the result is bit-identical to a run that was never stopped (on the CPU;
            on a GPU with ``train.deterministic``).
        allow_spec_change: with ``resume``, accept a config that differs from the stopped run's.
        protect: more paths ``out`` must not be, hold or lie inside (by description), besides the
            data, model and cache folders of ``config``; the CLI passes its ``--config`` file.
        model: a backbone you already loaded (a float32 transformers model), trained as it is:
            probekit neither loads nor copies it. Its ``name_or_path`` becomes ``model.name``
            (where the saved run reloads it from). Give its ``tokenizer`` with it.
        tokenizer: the tokenizer of ``model``.
        data: the data, instead of ``config.data``'s files: a path (file or folder), a mapping of
            split name to paths, or Python objects (`probekit.memory`: records, columns,
            ``(texts, labels)``, a pandas DataFrame, a ``datasets.Dataset``, or a mapping of
            split name to one of these). Objects are checked like files (errors name the row);
            the stored config says what they were (``data.in_memory``), and ``resume`` needs
            them again (the data's fingerprint is checked).

    Raises:
        UserError: bad input, or an ``out`` that could destroy the user's files or is being
            written by another process (`probekit.rundir.check_out`, `probekit.rundir.RunLock`).
    """
    started = time.perf_counter()
    config, objects = memory.bind(config, data)
    if model is not None:
        name = getattr(getattr(model, "config", None), "name_or_path", "")
        if name:
            config = config.replace(model={"name": str(name)})
    if resume and out is None:
        raise UserError("--resume needs --out: the run folder whose unfinished run to continue")
    out_dir = Path(out) if out is not None else default_run_dir(name)
    inputs = input_paths(config, dict(protect or {}))
    check_cache_dir(config)
    with deterministic_algorithms(config.train.deterministic):
        try:
            ctx = RunContext.start(config.train, log=log, progress=progress)
            # The main process checks and locks the folder first: a refusal should not wait for the model.
            folder = (
                RunFolder.open(out_dir, overwrite=overwrite, inputs=inputs, log=ctx.log, resume=resume)
                if ctx.is_main
                else None
            )
            if folder is None:
                check_out(out_dir, overwrite=overwrite, inputs=inputs, resume=resume)
        except (KeyboardInterrupt, Terminated) as exc:  # nothing is written yet: say so
            raise explain_failure(exc, None) from exc
        try:
            saved: Saved | None = None
            if resume:
                partial, saved = find_resumable(out_dir, ctx.log)
                check_same_spec(saved.state["config"], absolute_paths(config), allow_spec_change)
                if folder is not None:
                    folder.partial = partial
            else:
                partial = folder.create() if folder is not None else out_dir  # only the main one writes
            try:
                plan = prepare(
                    config,
                    device=ctx.device,
                    num_processes=ctx.group.size,
                    model=model,
                    tokenizer=tokenizer,
                    data=objects,
                )
                if saved is not None:
                    check_same_data(saved.state, plan, ctx.log)
                    check_same_batches(saved.state, plan)
                for line in plan.describe():
                    ctx.log(line)
                result = _run(ctx, plan, partial if folder is not None else None, saved, callbacks, started)
                ctx.group.barrier()
                if folder is not None:
                    shutil.rmtree(partial / STATE_DIR, ignore_errors=True)  # finished: nothing to resume
                    folder.publish()
            except BaseException as exc:
                if folder is not None:
                    folder.abandon(ctx.log, keep=has_checkpoint(partial))
                if ctx.group.active and is_peer_failure(exc):
                    raise peer_lost(exc, f"training (process {ctx.group.rank} of {ctx.group.size})") from exc
                error = explain_failure(exc, folder.partial if folder is not None else None)
                if error is exc:
                    raise
                raise error from exc
        finally:
            if folder is not None:
                folder.release()
        result.run_dir = out_dir
        for line in result.summary():
            ctx.log(line)
        return result


def _run(
    ctx: RunContext,
    plan: TrainPlan,
    folder: Path | None,
    saved: Saved | None,
    extra: Sequence[Callback],
    started: float,
) -> RunResult:
    """Parts, caches, the fit with its callbacks, the threshold and test metrics, the outputs
    (``folder``: where this process writes; None for a process that does not)."""
    parts, facts = build_parts(plan, ctx)
    if plan.cache_plan is not None:
        parts.caches, facts.cache_rows = build_caches(plan, parts.probe, ctx)
    try:
        if folder is not None:
            write_config(folder, plan)
        state = TrainState()
        callbacks = default_callbacks(plan, ctx, folder, saved, extra)
        if saved is not None:
            restore_training(saved, parts, plan)
            state = TrainState.from_json(saved.state, sums=ctx.is_main)
            keys = state_keys(callbacks)
            for callback in callbacks:
                callback.load_state_dict(callback_states(saved, callback, keys.get(id(callback))))
            ctx.log(
                f"resumed from checkpoint {saved.path.name}: epoch {state.epoch}, "
                f"{state.window} optimiser steps into it, step {state.step}"
            )
        done = fit(ctx, plan, parts, state, callbacks)
        result, scores = _finish(done, callbacks)
        result.seconds = time.perf_counter() - started
    finally:
        for cache in parts.caches.values():  # released before the outputs (lower peak memory)
            cache.close()
    # Every process takes part (sharded weights are gathered); only the writer keeps them.
    weights = trainable_state(parts.probe, keep=folder is not None)
    if folder is not None:
        facts.loss_scale = None if ctx.scaler is None else float(ctx.scaler.get_scale())
        write_outputs(folder, plan, result, scores, weights, facts)
    return result


def default_callbacks(
    plan: TrainPlan, ctx: RunContext, folder: Path | None, saved: Saved | None, extra: Sequence[Callback]
) -> list[Callback]:
    """The built-in policies of a run, in their order, with ``extra`` before the checkpoints."""
    spec = plan.config.train
    return [
        EarlyStopping(spec.monitor, spec.patience, spec.epochs),
        BestWeights(ctx.group),
        MetricsFile(folder),
        StepsFile(folder, spec.report_to),
        *extra,
        StateCheckpoints(folder, spec.checkpoint_every_steps, saved, write=spec.resumable),
        StopOnSignal(folder, resumable=spec.resumable),
    ]


def build_parts(plan: TrainPlan, ctx: RunContext) -> tuple[Parts, RunFacts]:
    """The model as training runs it (DDP-wrapped, or sharded under fsdp), its optimiser and
    schedule."""
    config, probe, group = plan.config, plan.probe, ctx.group
    facts = RunFacts(strategy=group.strategy)
    if group.sharded:
        # Shard first: the optimiser must hold the sharded parameters. Each unit moves to the
        # device as it is sharded, so the whole model is never on one device.
        held, total = shard_model(probe, ctx.device)
        facts.sharded_parameters = [int(n) for n in group.gather(held)]
        shares = " + ".join(f"{n:,}" for n in facts.sharded_parameters)
        ctx.log(f"fsdp: {total:,} parameters sharded over {group.size} processes: {shares}")
        optimizer = ctx.accelerator.prepare_optimizer(build_optimizer(probe, config.optimizer))
        model = probe
    else:
        fused = fused_update(ctx.device, ctx.precision.name, sharded=False)
        optimizer = build_optimizer(probe, config.optimizer, fused=fused)
        model, optimizer = ctx.accelerator.prepare(probe, optimizer)
        probe = ctx.accelerator.unwrap_model(model)
    scheduler = config.scheduler.build(optimizer, plan.total_steps, plan.steps_per_epoch)
    return Parts(model, probe, optimizer, scheduler), facts


def _finish(done: Fit, callbacks: Sequence[Callback]) -> tuple[RunResult, dict[str, Scores]]:
    """The threshold on the best epoch's val scores, the val and test metrics at it."""
    ctx, plan, state = done.ctx, done.plan, done.state
    assert isinstance(plan, TrainPlan)
    spec = plan.config.train
    runner = Runner(ctx.device, ctx.autocast, ctx.group, ctx.progress)
    best = next(cb for cb in callbacks if isinstance(cb, BestWeights))
    early = next(cb for cb in callbacks if isinstance(cb, EarlyStopping))
    side = plan.config.model.padding_side

    def scored(split: str) -> Scores:
        cache = done.parts.caches.get(split)
        loader = inference_loader(
            plan.encoded[split],
            plan.pad_id,
            spec.eval_batch_size,
            padding_side=side,
            cache=cache,
            max_tokens=spec.eval_max_tokens,
            group=ctx.group,
        )
        return predict(done.probe, loader, runner, plan.task, cache_plan=plan.cache_plan if cache else None)

    # No epoch improved (a nan metric throughout): the last weights' scores.
    val = best.val if best.val is not None else scored("val")
    others = {"test": lambda: scored("test")} if "test" in plan.encoded else {}
    finished = finish(plan.task, val, others)
    plan.probe.attach(threshold=finished.threshold)
    plan.probe.eval()
    result = RunResult(
        run_dir=Path(),  # set by train() (the summary file leaves it out)
        best_epoch=early.best_epoch,
        epochs_run=len(state.history),
        stopped_early=state.stopped_early,
        threshold=finished.threshold,
        metrics=finished.metrics,
        history=state.history,
        task=plan.task,
        probe=plan.probe,
    )
    return result, finished.scores
