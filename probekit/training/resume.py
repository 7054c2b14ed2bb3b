"""Continuing a stopped run: find its newest intact checkpoint, check that the config and the
data are the stopped run's, and load the weights, optimiser, schedule and grad scaler."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from probekit.checkpoint import trainable_parameters
from probekit.config import ProbeConfig
from probekit.errors import UserError
from probekit.state import Saved, has_checkpoint, load_latest, load_optimizer_state, load_scheduler_state
from probekit.training.callbacks import restore
from probekit.training.context import Log
from probekit.training.loop import Parts
from probekit.training.plan import TrainPlan


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
    detail = (
        "it is a finished run"
        if (out_dir / "checkpoint").is_dir()
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


def check_same_data(state: Mapping[str, Any], plan: TrainPlan, log: Log) -> None:
    """Refuse to resume on data other than the stopped run's (a changed file, a changed split)."""
    before, now = state.get("data"), plan.data_fingerprint
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


def check_same_batches(state: Mapping[str, Any], plan: TrainPlan) -> None:
    """Refuse a process count that changes the per-process micro-batch (the data order would
    differ from the stopped run's)."""
    before = state.get("per_device_batch", plan.per_device_batch)
    if before != plan.per_device_batch:
        raise UserError(
            f"--resume: the stopped run had micro-batches of {before} per process; with "
            f"{plan.num_processes} process(es) they would be {plan.per_device_batch}, which changes the "
            f"data order; resume with a process count that keeps {before} per process"
        )


def restore_training(saved: Saved, parts: Parts, plan: TrainPlan) -> None:
    """Load a training-state checkpoint's weights, optimizer and scheduler (the RNG states and
    the fp16 grad scaler come back at the start of the fit: `StateCheckpoints`)."""
    import torch

    from probekit.state import check_fits

    # the shape of the task's scores of the val split: (rows,) or (rows, classes)
    logits = torch.zeros(1, plan.config.head.num_classes)
    scores = (len(plan.dataset.val), *plan.task.scores(logits).shape[1:])
    problem = check_fits(saved, trainable_parameters(parts.probe), parts.optimizer, scores)
    if problem is not None:
        raise UserError(f"{saved.path}: this checkpoint does not fit the run's probe: {problem}")
    restore(
        parts.probe, {k.removeprefix("param."): v for k, v in saved.tensors.items() if k.startswith("param.")}
    )
    load_optimizer_state(parts.optimizer, saved.tensors, saved.state["optimizer"])
    load_scheduler_state(parts.scheduler, parts.optimizer, saved.state["scheduler"])
