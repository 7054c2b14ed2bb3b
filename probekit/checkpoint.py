"""Checkpoints: safetensors for the weights training changed, JSON for everything else.

A checkpoint never holds the frozen backbone: ``probe.json`` names the base model (id, revision,
where it was loaded from) and ``probe.safetensors`` holds only the pooler, the head and the
backbone parameters the freezing plan left trainable. Nothing is unpickled on load.

**A run folder is untrusted input** (see `probekit.runfiles`). Loading one reads ``probe.json``
through the `ProbeMeta` schema and the config schema, keeps every file it names inside the
folder, refuses a run that asks for the model's own code unless the caller allows it, checks
the backbone it loads against the one the run was trained on, and checks the weights file
(checksum, header, dtypes, finite values) before using it.

``probe.json``, ``format_version`` 2::

    format           "probekit-checkpoint"
    format_version   2
    config           the full validated config of the run
    label_map        label name -> class index, 0..K-1, K >= 2
    label_names      the K label values by class index (ints, booleans or strings)
    threshold        the decision threshold, a finite number in [0, 1] (a list of them, one per
                     label, for a multi-label probe)
    backbone         name, revision, provenance, model_type, num_blocks, hidden_size
    components       per component kind: family, kind, source, distribution
    weights          file (a bare file name in this folder), sha256, tensors (their count)
    versions         probekit and library versions that wrote it
    checksums        weights: the sha256 of the weights file; meta: the sha256 of the canonical
                     JSON (sorted keys, compact separators, ASCII) of every other field

Version 1 (written by earlier probekits) has no ``checksums`` block: its weights are checked
against ``weights.sha256`` (required), its config is not covered by any checksum, and loading it
logs one warning saying so.

What the checksums do and do not protect against: they detect damage (a flipped bit, a truncated
file) and partial edits (a changed threshold, label map or config without updating the
checksums). They do not stop a malicious author, who can recompute them. The defences against a
malicious run folder are elsewhere: nothing in it can execute code (no pickle; no model code
without the caller's ``trust_remote_code``), name a file outside the folder, or reach torch,
transformers or the OS without passing a schema first.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from probekit._version import __version__
from probekit.errors import ConfigError, UserError
from probekit.hashing import sha256_file as sha256_file
from probekit.provenance import components, require_plugins
from probekit.rundir import save_tensors
from probekit.runfiles import (
    Label,
    NonNegative,
    SFloat,
    Sha256,
    SInt,
    SStr,
    canonical_json,
    escape_note,
    first_error,
    inside,
    is_bare_name,
    is_hub_id,
    is_revision,
    printable,
    read_json,
    shown,
)

if TYPE_CHECKING:
    from probekit.config import ProbeConfig
    from probekit.hub import ModelSpec

FORMAT = "probekit-checkpoint"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
WEIGHTS = "probe.safetensors"
META = "probe.json"
MAX_META_BYTES = 16 << 20
"""The largest ``probe.json`` read."""
MAX_LENGTH = 1 << 20
"""The largest ``model.max_length`` a run folder may give (tokens)."""
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
"""Suffixes of pickled checkpoints (PyTorch, Lightning): refused by name, never loaded."""

log = logging.getLogger("probekit")


def trainable_parameters(probe: Any) -> dict[str, torch.nn.Parameter]:
    """The parameters training can change: pooler, head and trainable backbone parameters."""
    return {
        name: param
        for name, param in probe.named_parameters()
        if not name.startswith("backbone.") or name.removeprefix("backbone.") in probe.plan.trainable
    }


def trainable_state(probe: Any, *, keep: bool = True) -> dict[str, torch.Tensor]:
    """Whole CPU copies of `trainable_parameters`. Sharded parameters are gathered one at a time,
    so every process of the run must call it; a process that only takes part in the gathering
    passes ``keep=False`` and gets an empty dict (it never holds more than one whole tensor)."""
    from probekit.distributed import gathered

    return gathered({name: p.detach() for name, p in trainable_parameters(probe).items()}, keep=keep)


def versions() -> dict[str, str]:
    """Versions of probekit and the libraries that shape a checkpoint."""
    found = {"probekit": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for dist in ("transformers", "accelerate", "safetensors", "tokenizers"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


# -- probe.json -----------------------------------------------------------------------------------
class _Open(BaseModel):
    """A block later versions may add fields to (forward compatible): unknown fields are kept."""

    model_config = ConfigDict(extra="allow")


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BackboneMeta(_Open):
    """The backbone the run was trained on; checked against the one loaded."""

    name: Annotated[SStr, Field(min_length=1, max_length=4096)]
    revision: SStr | None = None
    provenance: SStr = ""
    model_type: Annotated[SStr, Field(min_length=1, max_length=200)]
    num_blocks: Annotated[SInt, Field(ge=1, le=100_000)]
    hidden_size: Annotated[SInt, Field(ge=1, le=10_000_000)]


class ComponentMeta(_Open):
    """Where a component kind of the run came from (a plugin distribution, or built in)."""

    family: SStr
    kind: SStr
    source: SStr | None = None
    distribution: SStr | None = None


class WeightsMeta(_Closed):
    file: SStr
    sha256: Sha256 | None = None
    tensors: NonNegative


class Checksums(_Closed):
    weights: Sha256
    """sha256 of the weights file."""
    meta: Sha256
    """sha256 of the canonical JSON of every field of ``probe.json`` but ``checksums``."""


class ProbeMeta(_Open):
    """The schema of ``probe.json`` (see the module docstring)."""

    format: Literal["probekit-checkpoint"]
    format_version: Literal[1, 2]
    config: dict[str, Any]
    label_map: dict[str, NonNegative]
    label_names: list[Label]
    threshold: (
        Annotated[SFloat, Field(ge=0.0, le=1.0)]
        | Annotated[list[Annotated[SFloat, Field(ge=0.0, le=1.0)]], Field(min_length=1, max_length=100_000)]
    )
    """One decision threshold, or one per label (multi-label)."""

    @field_validator("threshold", mode="before")
    @classmethod
    def _one_threshold(cls, value: Any) -> Any:
        """One message for a bad single threshold (not one per member of the union)."""
        if isinstance(value, list):
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number in [0, 1] (or a list of them, one per label), got {value!r}")
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{value!r} is not a finite number in [0, 1]")
        return value

    backbone: BackboneMeta
    components: list[ComponentMeta] = Field(default_factory=list)
    weights: WeightsMeta
    versions: dict[str, SStr] = Field(default_factory=dict)
    checksums: Checksums | None = None


def meta_checksum(meta: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of every field of ``meta`` except ``checksums``."""
    return hashlib.sha256(canonical_json({k: v for k, v in meta.items() if k != "checksums"})).hexdigest()


def write_meta(folder: Path, meta: Mapping[str, Any]) -> Path:
    """Write ``meta`` (format version 2) as ``folder/probe.json`` with its checksums, computed
    from ``meta`` itself (``weights.sha256`` must already be the weights file's). Returns the path."""
    # Hash what a reader will parse: the JSON round trip (tuples become lists, keys strings).
    sealed = json.loads(json.dumps({k: v for k, v in meta.items() if k != "checksums"}))
    sealed["checksums"] = {"weights": sealed["weights"]["sha256"], "meta": meta_checksum(sealed)}
    path = folder / META
    path.write_text(json.dumps(sealed, indent=2) + "\n", encoding="utf-8")
    return path


def class_keys(label_map: Mapping[str, int]) -> list[str]:
    """The label map's keys by class index: the names configs use for classes
    (``task.negative_class``, ``loss.class_weights``) and the keys of ``predict``'s probabilities."""
    return [name for name, _ in sorted(label_map.items(), key=lambda kv: kv[1])]


def label_names(label_map: Mapping[str, int]) -> list[Any]:
    """Label values as the data gave them, by class index: ints, booleans or strings (what
    training stores in ``label_names`` and ``predict`` writes)."""
    names = [name for name, _ in sorted(label_map.items(), key=lambda kv: kv[1])]
    if all(n.lstrip("-").isdigit() for n in names):
        return [int(n) for n in names]
    if set(names) == {"false", "true"}:
        return [n == "true" for n in names]
    return names


@dataclass(frozen=True)
class RunMeta:
    """A validated ``probe.json``: where it is, its fields and its config."""

    path: Path
    """``probe.json``."""
    folder: Path
    """The checkpoint folder holding it."""
    raw: dict[str, Any]
    meta: ProbeMeta
    config: ProbeConfig


def _locate(run_dir: str | Path) -> tuple[Path, Path]:
    """The checkpoint folder of a run folder (itself or its ``checkpoint`` subfolder) and its
    ``probe.json``; neither may lead out of the run folder."""
    root = Path(run_dir)
    if "\0" in str(root):
        raise UserError(f"{shown(str(root))}: a path cannot hold a NUL character")
    for folder in (root, root / "checkpoint"):
        path = folder / META
        try:
            found = path.is_file()
        except OSError:
            found = False
        if not found:
            continue
        if not inside(folder, root):
            raise UserError(f"{folder}: leads out of the run folder ({escape_note(folder)}); refused")
        if not inside(path, folder):
            raise UserError(f"{path}: leads out of the run folder ({escape_note(path)}); refused")
        return folder, path
    if not root.exists():
        raise UserError(f"{root}: no such run folder")
    if root.is_file():
        kind = "a pickle file" if root.suffix.lower() in PICKLE_SUFFIXES else "a file"
        raise UserError(
            f"{root}: {kind}, not a probekit run folder; probekit never unpickles checkpoints, it "
            f"reads a run folder holding {META} and {WEIGHTS} (safetensors)"
        )
    raise UserError(f"{root}: no {META} here or in {root / 'checkpoint'}; is this a probekit run folder?")


def _check_fields(meta: ProbeMeta, raw: dict[str, Any], where: Path) -> None:
    """What the schema's types cannot say: labels, the weights file name, the checksums."""
    values = sorted(meta.label_map.values())
    if values != list(range(len(values))):  # K >= 0: a regression has none; the head is checked on load
        raise UserError(f"{where}: label_map: class indices must be 0..K-1, each once; got {shown(values)}")
    names = meta.label_names
    expected = label_names(meta.label_map)
    if names != expected or [type(n) for n in names] != [type(n) for n in expected]:
        raise UserError(
            f"{where}: label_names: {shown(names)} do not match label_map (expected {shown(expected)})"
        )
    if not is_bare_name(meta.weights.file):
        raise UserError(
            f"{where}: weights.file: {shown(meta.weights.file)} is not a bare file name in the "
            "checkpoint folder (one name: no '/', '\\' or '..', not absolute, not hidden)"
        )
    if meta.format_version == 1:
        if meta.weights.sha256 is None:
            raise UserError(
                f"{where}: weights.sha256: missing; a checkpoint without the checksum of its weights "
                "is refused (the weights could have been replaced)"
            )
        return
    if meta.checksums is None:
        raise UserError(
            f"{where}: checksums: missing; format_version 2 requires the checksums of the weights "
            "and of the rest of probe.json"
        )
    if meta.weights.sha256 is not None and meta.weights.sha256 != meta.checksums.weights:
        raise UserError(f"{where}: checksums.weights: differs from weights.sha256; the file was edited")
    if meta_checksum(raw) != meta.checksums.meta:
        raise UserError(
            f"{where}: checksums.meta: does not match the content of {META}; the file is damaged or "
            "was edited after it was written"
        )


def _check_model(model: ModelSpec, where: Path) -> None:
    """What a run folder may say about its backbone: a hub id, or a local folder by absolute path."""
    name = model.name
    local = Path(name)
    if name.startswith("/") or local.is_absolute():
        if not name.isprintable() or len(name) > 4096:
            raise UserError(f"{where}: config.model.name: {shown(name)} is not a usable path")
        try:
            is_dir = local.is_dir()
        except OSError:
            is_dir = False
        if not is_dir:
            raise UserError(f"{where}: config.model.name: {shown(name)}: no such model folder")
    elif is_hub_id(name):
        try:
            ambiguous = local.exists()
        except OSError:
            ambiguous = False
        if ambiguous:
            raise UserError(
                f"{where}: config.model.name: {shown(name)} is a hub id, but the working folder holds "
                "a path of that name; a run folder names a local model by its absolute path, so "
                "probekit will not load that path in its place (run from another folder)"
            )
    else:
        raise UserError(
            f"{where}: config.model.name: {shown(name)} is neither a hub id ('name' or 'org/name' of "
            "letters, digits, '.', '_' and '-', no '..') nor the absolute path of a model folder"
        )
    if model.max_length > MAX_LENGTH:
        raise UserError(
            f"{where}: config.model.max_length: {model.max_length} tokens; a run may say at most {MAX_LENGTH}"
        )
    if model.revision is not None and not is_revision(model.revision):
        raise UserError(
            f"{where}: config.model.revision: {shown(model.revision)} is not a branch, tag or commit"
        )


def _validate_config(data: dict[str, Any], where: Path) -> ProbeConfig:
    """The run's config through the config schema; the message names ``config.<field>`` and is one
    line (its first problem, and how many more)."""
    from probekit.config import validate

    label = str(where)
    try:
        return validate(data, label=label)
    except ConfigError as exc:
        lines = str(exc).splitlines() or ["invalid"]
        first = lines[0].removeprefix(f"{label}: ").removeprefix(f"{label}:")
        first = "config" if first.startswith("(top level)") else f"config.{first}"
        more = f" (and {len(lines) - 1} more problems)" if len(lines) > 1 else ""
        raise ConfigError(f"{label}: {printable(first)}{more}") from None


def read_run(run_dir: str | Path) -> RunMeta:
    """Find ``probe.json`` in a run folder (or its ``checkpoint`` subfolder) and validate all of
    it: the schema, the checksums (format version 2), the plugins it needs, its config, and what
    it says about its backbone.

    Raises:
        UserError: ``<path>/probe.json: <field path>: <problem>``.
    """
    from probekit.registry import discover

    folder, path = _locate(run_dir)
    try:
        raw = read_json(path, limit=MAX_META_BYTES)
    except ValueError as exc:
        raise UserError(f"{path}: unreadable checkpoint description: {exc}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise UserError(f"{path}: not a probekit checkpoint")
    version = raw.get("format_version")
    if "format_version" not in raw:
        raise UserError(f"{path}: format_version: missing (a required field)")
    if type(version) is int and version > FORMAT_VERSION:
        raise UserError(
            f"{path}: format_version: written by a newer probekit: format_version {version}; this "
            f"probekit reads {' and '.join(map(str, READABLE_VERSIONS))}"
        )
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise UserError(
            f"{path}: format_version: {shown(version)} is not a format version; this probekit reads "
            + " and ".join(map(str, READABLE_VERSIONS))
        )
    try:
        meta = ProbeMeta.model_validate(raw)
    except ValidationError as exc:
        raise UserError(f"{path}: {first_error(exc)}") from None
    _check_fields(meta, raw, path)
    discover()
    require_plugins(meta, path)
    config = _validate_config(meta.config, path)
    _check_model(config.model, path)
    return RunMeta(path, folder, raw, meta, config)


def read_meta(run_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """Find and validate ``probe.json`` in a run folder (see `read_run`); return its folder and
    its content."""
    run = read_run(run_dir)
    return run.folder, run.raw


def save_checkpoint(
    probe: Any,
    folder: Path,
    *,
    config: dict[str, Any],
    label_map: dict[str, int],
    label_names: list[Any],
    threshold: float | list[float],
    backbone: dict[str, Any],
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``probe.safetensors`` and ``probe.json`` (format version 2, with its checksums) into
    ``folder``; return the JSON's path. ``weights``: the probe's `trainable_state`, when already
    gathered."""
    folder.mkdir(parents=True, exist_ok=True)
    state = trainable_state(probe) if weights is None else weights
    weights_file = folder / WEIGHTS
    save_tensors(state, weights_file, metadata={"format": FORMAT})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config,
        "label_map": label_map,
        "label_names": label_names,
        "threshold": threshold,
        "backbone": backbone,
        "components": components(config),
        "weights": {"file": WEIGHTS, "sha256": sha256_file(weights_file), "tensors": len(state)},
        "versions": versions(),
    }
    return write_meta(folder, meta)
