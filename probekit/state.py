"""Training-state checkpoints: crash-safe, verified, and enough to resume bit for bit.

A training-state checkpoint is a folder ``state/step-<steps>-<phase>`` inside the unfinished run
folder, holding ``tensors.safetensors`` (trainable weights, optimizer state, the best epoch's
weights and val scores, RNG states), ``state.json`` (position in the data, early-stopping state,
history, scheduler, the rest of the RNG states) and ``manifest.json`` (size and sha256 of both).
No pickle anywhere.

Writing is atomic: the files go to a hidden temporary folder, are flushed to disk, and the
folder is renamed into place; only then are checkpoints older than the previous one removed.
Reading verifies the manifest first; a damaged checkpoint is skipped with a warning and the one
before it is used.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from probekit.checkpoint import sha256_file

STATE_DIR = "state"
FORMAT = "probekit-train-state"
KEEP = 2
"""Complete checkpoints kept: the newest and the one before it (the fallback)."""


@dataclass
class Saved:
    """A verified checkpoint: its tensors and its JSON state."""

    path: Path
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_name(steps: int, epoch_done: bool) -> str:
    """Names sort in training order: ``a`` after an optimiser step, ``b`` after an epoch's end."""
    return f"step-{steps:08d}-{'b' if epoch_done else 'a'}"


def save_state(run_folder: Path, name: str, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    """Write a checkpoint atomically into ``run_folder/state`` and prune older ones."""
    root = run_folder / STATE_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    temporary = root / f".{name}.tmp-{os.getpid()}"
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir()
    try:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, temporary / "tensors.safetensors"
        )
        (temporary / "state.json").write_text(json.dumps({"format": FORMAT, **state}), encoding="utf-8")
        files = {
            f: {"bytes": (temporary / f).stat().st_size, "sha256": sha256_file(temporary / f)}
            for f in ("tensors.safetensors", "state.json")
        }
        (temporary / "manifest.json").write_text(
            json.dumps({"format": FORMAT, "files": files}), encoding="utf-8"
        )
        for f in (*files, "manifest.json"):
            _fsync(temporary / f)
        if final.exists():
            shutil.rmtree(final)
        temporary.rename(final)
        _fsync(root)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    complete = sorted(p for p in root.iterdir() if p.name.startswith("step-"))
    for old in complete[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify(folder: Path) -> str | None:
    """Why ``folder`` is not a usable checkpoint, or None when its manifest checks out."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"no readable manifest ({exc.__class__.__name__})"
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        return "not a probekit training-state manifest"
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected.get("bytes"):
            return f"{name} has {path.stat().st_size} bytes, the manifest says {expected.get('bytes')}"
        if sha256_file(path) != expected.get("sha256"):
            return f"{name} does not match its checksum"
    return None


def load_latest(run_folder: Path, warn: Callable[[str], None]) -> Saved | None:
    """The newest checkpoint that passes verification; damaged ones are reported and skipped."""
    root = run_folder / STATE_DIR
    if not root.is_dir():
        return None
    for folder in sorted((p for p in root.iterdir() if p.name.startswith("step-")), reverse=True):
        problem = verify(folder)
        if problem is None:
            try:
                tensors = load_file(folder / "tensors.safetensors")
                state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                problem = f"unreadable ({exc})"
            else:
                return Saved(folder, tensors, state)
        warn(f"checkpoint {folder.name} is damaged ({problem}); using the one before it")
    return None


def has_checkpoint(run_folder: Path) -> bool:
    root = run_folder / STATE_DIR
    return root.is_dir() and any(p.name.startswith("step-") for p in root.iterdir())


# -- random number generators ----------------------------------------------------------------------
def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every RNG's state: torch (CPU and each CUDA device), numpy and Python's ``random``."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    meta = {
        "numpy": [kind, int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(internal), gauss_next],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if states:
            torch.cuda.set_rng_state_all(states)
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


# -- optimizer and scheduler -----------------------------------------------------------------------
def optimizer_state(optimizer: Any, *, keep: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's per-parameter tensors, whole, and its groups' settings as JSON. Sharded
    tensors are gathered one at a time, so every process must call it; with ``keep=False`` a
    process only takes part and gets no tensors."""
    from probekit.distributed import gathered

    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return gathered(tensors, keep=keep), {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: Any, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        per_param.setdefault(int(index), {}).update(values)
    # Whole tensors go back as this process's shard of the parameter they belong to.
    from probekit.distributed import is_sharded, shard_like

    params = [p for group in optimizer.param_groups for p in group["params"]]
    for position, values in per_param.items():
        if position < len(params) and is_sharded(params[position]):
            for key, value in values.items():
                if isinstance(value, torch.Tensor):
                    values[key] = shard_like(value, params[position])
    optimizer.load_state_dict({"state": per_param, "param_groups": meta["param_groups"]})


def scheduler_state(scheduler: Any) -> dict[str, Any]:
    """What a ``LambdaLR`` needs to continue: its step counters and last learning rates."""
    return {
        "last_epoch": scheduler.last_epoch,
        "_step_count": scheduler._step_count,
        "_last_lr": list(scheduler._last_lr),
    }


def load_scheduler_state(scheduler: Any, optimizer: Any, state: dict[str, Any]) -> None:
    scheduler.last_epoch = state["last_epoch"]
    scheduler._step_count = state["_step_count"]
    scheduler._last_lr = list(state["_last_lr"])
    for group, lr in zip(optimizer.param_groups, state["_last_lr"], strict=True):
        group["lr"] = lr
