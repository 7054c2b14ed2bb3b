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

A checkpoint folder is untrusted input like the rest of a run folder (see `probekit.runfiles`):
``state/``, each ``state/step-*`` and every file the manifest lists must lie inside the run
folder (no symlink leads out, every listed name is a bare file name); the manifest,
``state.json`` (the `TrainState` schema: strict types, finite numbers, consistent counts) and
the tensors (`check_state`: every tensor the state needs, of the right dtype and shape) are
validated before anything reaches training. A checkpoint that fails any of it counts as
damaged, exactly like one that fails its checksum. The manifest's checksums detect damage, not a
malicious author (who can recompute them): the schemas are what keep a hand-made state out.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from probekit.checkpoint import sha256_file
from probekit.rundir import save_tensors
from probekit.runfiles import (
    JSONScalar,
    NonNegative,
    SBool,
    SFloat,
    Sha256,
    SInt,
    SStr,
    escape_note,
    first_error,
    inside,
    is_bare_name,
    load_safetensors,
    read_json,
    shown,
)

STATE_DIR = "state"
FORMAT = "probekit-train-state"
KEEP = 2
"""Complete checkpoints kept: the newest and the one before it (the fallback)."""
TENSORS = "tensors.safetensors"
STATE_JSON = "state.json"
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 20
MAX_STATE_BYTES = 256 << 20


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
        save_tensors(
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


# -- the schema of a checkpoint ----------------------------------------------------------------------
class _Open(BaseModel):
    """A block later versions may add fields to: unknown fields are kept."""

    model_config = ConfigDict(extra="allow")


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=False)


class FileEntry(_Closed):
    bytes: NonNegative
    sha256: Sha256


class Manifest(_Closed):
    format: Literal["probekit-train-state"]
    files: dict[str, FileEntry]


U32 = Annotated[SInt, Field(ge=0, le=2**32 - 1)]
Position = Annotated[SInt, Field(ge=0, le=624)]


class RngMeta(_Closed):
    """The JSON half of `rng_state`: numpy's and Python's generator states."""

    numpy: tuple[Literal["MT19937"], Position, Annotated[SInt, Field(ge=0, le=1)], SFloat]
    python: tuple[Literal[3], Annotated[list[U32], Field(min_length=625, max_length=625)], SFloat | None]

    @field_validator("python")
    @classmethod
    def _position(cls, value: tuple[int, list[int], float | None]) -> tuple[int, list[int], float | None]:
        if value[1][-1] > 624:
            raise ValueError(
                f"the state's position (its last number) must be at most 624, got {value[1][-1]}"
            )
        return value


class ParamGroupMeta(_Open):
    """An AdamW parameter group as ``optimizer.state_dict()`` gives it."""

    params: list[NonNegative]
    lr: Annotated[SFloat, Field(ge=0.0)]
    betas: tuple[Annotated[SFloat, Field(ge=0.0, lt=1.0)], Annotated[SFloat, Field(ge=0.0, lt=1.0)]]
    eps: Annotated[SFloat, Field(ge=0.0)]
    weight_decay: Annotated[SFloat, Field(ge=0.0)]
    initial_lr: Annotated[SFloat, Field(ge=0.0)] | None = None
    amsgrad: SBool = False
    maximize: SBool = False
    capturable: SBool = False
    differentiable: SBool = False
    decoupled_weight_decay: SBool = True
    foreach: SBool | None = None
    fused: SBool | None = None
    name: SStr | None = None


class OptimizerMeta(_Closed):
    param_groups: Annotated[list[ParamGroupMeta], Field(min_length=1)]
    scalars: dict[Annotated[str, StringConstraints(pattern=r"^(0|[1-9][0-9]{0,8})$")], dict[str, JSONScalar]]


class SchedulerMeta(_Closed):
    last_epoch: Annotated[SInt, Field(ge=-1)]
    step_count: Annotated[SInt, Field(ge=0, alias="_step_count")]
    last_lr: Annotated[list[Annotated[SFloat, Field(ge=0.0)]], Field(alias="_last_lr")]


class ScalerMeta(_Open):
    """``GradScaler.state_dict()`` of an fp16 run."""

    scale: Annotated[SFloat, Field(gt=0.0)]
    growth_factor: Annotated[SFloat, Field(gt=0.0)]
    backoff_factor: Annotated[SFloat, Field(gt=0.0)]
    growth_interval: Annotated[SInt, Field(ge=1)]
    growth_tracker: Annotated[SInt, Field(ge=0, alias="_growth_tracker")]


class HistoryRow(_Open):
    """One finished epoch of ``metrics.jsonl``; metrics may be undefined (nan) or null."""

    __pydantic_extra__: dict[str, JSONScalar] = Field(init=False)
    epoch: Annotated[SInt, Field(ge=1)]
    step: NonNegative
    best: SBool
    skipped_steps: NonNegative = 0


class DataPrint(_Open):
    rows: NonNegative
    sha256: SStr


class TrainState(_Open):
    """The schema of ``state.json``, as `probekit.training.callbacks.StateCheckpoints` writes it."""

    format: Literal["probekit-train-state"]
    config: dict[str, Any]
    processes: Annotated[SInt, Field(ge=1, le=100_000)]
    per_device_batch: Annotated[SInt, Field(ge=1)] | None = None
    epoch: Annotated[SInt, Field(ge=1)]
    window: NonNegative
    step: NonNegative
    skipped_steps: tuple[NonNegative, NonNegative]
    best: SFloat | None
    epochs: tuple[NonNegative, NonNegative]
    stopped_early: SBool
    accumulators: tuple[SFloat, NonNegative, NonNegative]
    history: list[HistoryRow]
    optimizer: OptimizerMeta
    scheduler: SchedulerMeta
    scaler: ScalerMeta | None
    rng: RngMeta
    rng_ranks: Annotated[list[RngMeta], Field(min_length=1)]
    data: dict[str, DataPrint] | None = None
    callbacks: dict[str, dict[str, Any]] | None = None
    """The state of the user's callbacks, by `probekit.training.callbacks.state_keys`."""


OPTIM_TENSOR = re.compile(r"optim\.(0|[1-9][0-9]{0,8})\.([A-Za-z_][A-Za-z0-9_]{0,63})")
RANK_TENSOR = re.compile(r"rank([1-9][0-9]{0,5})\.(rng\..+)")
CUDA_TENSOR = re.compile(r"rng\.cuda\.(0|[1-9][0-9]{0,3})")


def _consistency(state: TrainState) -> str | None:
    """What the field types cannot say: counts that must agree with each other."""
    finished = len(state.history)
    if state.epoch != finished + 1:
        return (
            f"epoch: {state.epoch}, but the history holds {finished} finished epochs "
            f"(expected {finished + 1})"
        )
    for index, row in enumerate(state.history):
        if row.epoch != index + 1:
            return f"history[{index}].epoch: {row.epoch}, expected {index + 1}"
    if state.epochs[0] > finished:
        return f"epochs[0]: best epoch {state.epochs[0]}, but only {finished} epochs are finished"
    if len(state.rng_ranks) != state.processes:
        return f"rng_ranks: {len(state.rng_ranks)} entries for {state.processes} processes"
    groups = state.optimizer.param_groups
    if len(state.scheduler.last_lr) != len(groups):
        return f"scheduler._last_lr: {len(state.scheduler.last_lr)} rates for {len(groups)} parameter groups"
    indices = [i for group in groups for i in group.params]
    if indices != list(range(len(indices))):
        return "optimizer.param_groups: the parameter indices must run 0..N-1 across the groups, in order"
    for key in state.optimizer.scalars:
        if int(key) >= len(indices):
            return f"optimizer.scalars: parameter {key} does not exist ({len(indices)} parameters)"
    return None


def _kind(tensor: torch.Tensor) -> str:
    return f"{str(tensor.dtype).removeprefix('torch.')} {tuple(tensor.shape)}"


def _tensor_problem(state: TrainState, tensors: Mapping[str, torch.Tensor]) -> str | None:
    """Every tensor the state needs is there, with the dtype and shape it needs."""
    where = TENSORS
    needed = ["rng.torch", "rng.numpy"]
    needed += [f"rank{r}.rng.{k}" for r in range(1, state.processes) for k in ("torch", "numpy")]
    for name in needed:
        if name not in tensors:
            return f"{where}: no tensor {name}, which {STATE_JSON} needs"
    torch_size = torch.get_rng_state().numel()
    count = sum(len(group.params) for group in state.optimizer.param_groups)
    params: set[str] = set()
    best: set[str] = set()
    for name, tensor in tensors.items():
        base = match.group(2) if (match := RANK_TENSOR.fullmatch(name)) else name
        if match is not None and int(match.group(1)) >= state.processes:
            return f"{where}: {shown(name)} belongs to a process the run did not have"
        if base == "rng.torch":
            if tensor.dtype != torch.uint8 or tuple(tensor.shape) != (torch_size,):
                return f"{where}: {name} must be {torch_size} bytes (uint8), got {_kind(tensor)}"
        elif base == "rng.numpy":
            if tensor.dtype != torch.int64 or tuple(tensor.shape) != (624,):
                return f"{where}: {name} must be 624 int64 values, got {_kind(tensor)}"
            if bool(((tensor < 0) | (tensor > 2**32 - 1)).any()):
                return f"{where}: {name} holds values outside 0..2**32-1"
        elif CUDA_TENSOR.fullmatch(base):
            if tensor.dtype != torch.uint8 or tensor.dim() != 1:
                return f"{where}: {name} must be a 1-D uint8 tensor, got {_kind(tensor)}"
        elif base.startswith("rng.") or match is not None:
            return f"{where}: unexpected tensor {shown(name)}"
        elif name.startswith(("param.", "best.")):
            (params if name.startswith("param.") else best).add(name.split(".", 1)[1])
            if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
                return f"{where}: {shown(name)} must hold finite floating-point values"
        elif name.startswith("optim."):
            optim = OPTIM_TENSOR.fullmatch(name)
            if optim is None or int(optim.group(1)) >= count:
                return f"{where}: {shown(name)} names no parameter of the optimizer ({count} parameters)"
            if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
                return f"{where}: {shown(name)} must hold finite floating-point values"
        elif name == "bestval.labels" and (
            tensor.dim() not in (1, 2) or (tensor.dtype != torch.int64 and not tensor.is_floating_point())
        ):
            return f"{where}: {name} must hold class indices or targets (1-D or 2-D), got {_kind(tensor)}"
        elif name == "bestval.probs" and (
            tensor.dim() not in (1, 2)
            or not tensor.is_floating_point()
            or not bool(torch.isfinite(tensor).all())
        ):
            return f"{where}: {name} must hold finite scores (1-D or 2-D), got {_kind(tensor)}"
    if not params:
        return f"{where}: no trainable weights (param.*)"
    if params != best:
        return f"{where}: the best weights (best.*) and the weights (param.*) name different tensors"
    probs, labels = tensors.get("bestval.probs"), tensors.get("bestval.labels")
    if (probs is None) != (labels is None) or (
        probs is not None and labels is not None and probs.shape[0] != labels.shape[0]
    ):
        return f"{where}: bestval.probs and bestval.labels must come together, one per validation row"
    return None


def check_state(state: Any, tensors: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``state`` (``state.json``'s content) with ``tensors`` is not a usable checkpoint
    (``<field path>: <problem>``), or None."""
    if not isinstance(state, dict):
        return f"{STATE_JSON}: a JSON object was expected, got {type(state).__name__}"
    try:
        parsed = TrainState.model_validate(state)
    except ValidationError as exc:
        return f"{STATE_JSON}: {first_error(exc)}"
    problem = _consistency(parsed)
    if problem is not None:
        return f"{STATE_JSON}: {problem}"
    return _tensor_problem(parsed, tensors)


def check_fits(
    saved: Saved, params: Mapping[str, torch.Tensor], optimizer: Any, scores: tuple[int, ...] | None = None
) -> str | None:
    """Why ``saved`` does not fit the probe whose trainable ``params`` and ``optimizer`` are given
    (names, shapes, parameter groups) and the shape of the task's val ``scores``, or None."""
    probs = saved.tensors.get("bestval.probs")
    if scores is not None and probs is not None and tuple(probs.shape) != scores:
        return f"bestval.probs has shape {tuple(probs.shape)}, the task's val scores {scores}"
    got = {k.removeprefix("param."): v for k, v in saved.tensors.items() if k.startswith("param.")}
    if set(got) != set(params):
        missing, extra = sorted(set(params) - set(got)), sorted(set(got) - set(params))
        return (
            f"its weights do not match the probe (missing {shown(missing[:3])}, "
            f"unexpected {shown(extra[:3])})"
        )
    for name, tensor in got.items():
        if tuple(tensor.shape) != tuple(params[name].shape):
            return f"{shown(name)} has shape {tuple(tensor.shape)}, the probe's {tuple(params[name].shape)}"
    groups = saved.state["optimizer"]["param_groups"]
    if len(groups) != len(optimizer.param_groups) or any(
        len(g["params"]) != len(o["params"]) for g, o in zip(groups, optimizer.param_groups, strict=False)
    ):
        return "its optimizer parameter groups differ from the probe's"
    flat = [p for group in optimizer.param_groups for p in group["params"]]
    for key, tensor in saved.tensors.items():
        found = OPTIM_TENSOR.fullmatch(key)
        if (
            found is not None
            and tensor.dim()
            and tuple(tensor.shape) != tuple(flat[int(found.group(1))].shape)
        ):
            return f"{key} has shape {tuple(tensor.shape)}, its parameter {_kind(flat[int(found.group(1))])}"
    return None


# -- reading a checkpoint -------------------------------------------------------------------------
def verify(folder: Path) -> str | None:
    """Why ``folder`` is not a usable checkpoint, or None when its manifest checks out: the
    manifest's schema, every listed file a bare name inside ``folder`` with its size and sha256."""
    path = folder / MANIFEST
    if path.is_symlink() and not inside(path, folder):
        return f"{MANIFEST} leads out of the checkpoint folder ({escape_note(path)})"
    try:
        raw = read_json(path, limit=MAX_MANIFEST_BYTES)
    except ValueError as exc:
        return f"no readable manifest: {exc}"
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        return "not a probekit training-state manifest"
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        return f"{MANIFEST}: {first_error(exc)}"
    for needed in (TENSORS, STATE_JSON):
        if needed not in manifest.files:
            return f"{MANIFEST}: files: {needed} is not listed"
    for name, expected in manifest.files.items():
        if not is_bare_name(name):
            return f"{MANIFEST}: files: {shown(name)} is not a bare file name"
        path = folder / name
        if not inside(path, folder):
            return f"{name} leads out of the checkpoint folder ({escape_note(path)})"
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected.bytes:
            return f"{name} has {size} bytes, the manifest says {expected.bytes}"
        if sha256_file(path) != expected.sha256:
            return f"{name} does not match its checksum"
    return None


def _load(folder: Path, root: Path) -> Saved | str:
    """The checkpoint in ``folder`` (of the state folder ``root``), or why it is not usable."""
    if not inside(folder, root):
        return f"it leads out of the run folder ({escape_note(folder)})"
    if not folder.is_dir():
        return "not a folder"
    problem = verify(folder)
    if problem is not None:
        return problem
    try:
        tensors = load_safetensors(folder / TENSORS)
    except ValueError as exc:
        return f"{TENSORS}: {exc}"
    try:
        state = read_json(folder / STATE_JSON, limit=MAX_STATE_BYTES)
    except ValueError as exc:
        return f"{STATE_JSON}: {exc}"
    problem = check_state(state, tensors)
    if problem is not None:
        return problem
    return Saved(folder, tensors, state)


def load_latest(
    run_folder: Path, warn: Callable[[str], None], problems: list[str] | None = None
) -> Saved | None:
    """The newest checkpoint that passes verification (manifest, schema, tensors); damaged ones
    are reported through ``warn`` and skipped, and their problems appended to ``problems``."""
    root = run_folder / STATE_DIR
    if not root.is_dir():
        return None
    if not inside(root, run_folder):
        problem = f"{STATE_DIR}/ leads out of the run folder ({escape_note(root)})"
        warn(f"{problem}; its checkpoints are not used")
        if problems is not None:
            problems.append(problem)
        return None
    folders = sorted((p for p in root.iterdir() if p.name.startswith("step-")), reverse=True)
    for index, folder in enumerate(folders):
        loaded = _load(folder, root)
        if isinstance(loaded, Saved):
            return loaded
        name = folder.name if is_bare_name(folder.name) else shown(folder.name)
        after = "using the one before it" if index + 1 < len(folders) else "no checkpoint is left before it"
        warn(f"checkpoint {name} is damaged ({loaded}); {after}")
        if problems is not None:
            problems.append(f"checkpoint {name}: {loaded}")
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
