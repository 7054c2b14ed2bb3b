"""Shell completion of the ``probekit`` command line: config paths, kinds, presets, run folders.

The command's ``autocompletion=`` callbacks call these. They read the config schema and the
registries only (no torch, no model): a completion answers as fast as ``probekit --help``.
"""

from __future__ import annotations

import os
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from probekit.config import _NESTED_FIELDS, FAMILY_FIELDS, _block_model, config_model
from probekit.registry import PRESETS, Registry, discover

RUN_MARKER = Path("checkpoint") / "probe.json"
"""A folder holding this file is a run folder (what ``eval``, ``predict`` and ``--resume`` take)."""
RUN_SEARCH_DEPTH = 3
"""How deep below the working folder (or the folder typed so far) run folders are looked for."""
_SKIPPED = {"node_modules", "site-packages", "__pycache__"}


def _registry_of(name: str, depth: int) -> Registry[Any] | None:
    return FAMILY_FIELDS.get(name) if depth == 0 else _NESTED_FIELDS.get(name)


def _chosen_kinds(earlier: Iterable[str]) -> dict[str, str]:
    """``path -> kind`` from earlier ``--set path.kind=NAME`` on the command line."""
    chosen = {}
    for item in earlier:
        key, sep, value = item.partition("=")
        if sep and key.endswith(".kind"):
            chosen[key.removesuffix(".kind")] = value.strip()
    return chosen


def _child(model: type[BaseModel], name: str, depth: int, path: str, chosen: dict[str, str]) -> Any:
    """The model of block ``name`` of ``model``: a family's spec (the kind set earlier on the
    command line, else the default's), a nested block, or None for a plain value."""
    info = model.model_fields.get(name)
    if info is None:
        return None
    registry = _registry_of(name, depth)
    if registry is not None:
        kind = chosen.get(path)
        if kind is not None and kind in registry:
            return registry.get(kind)
        default = info.get_default(call_default_factory=True)
        return type(default) if isinstance(default, BaseModel) else None
    return _block_model(info.annotation)


def _values(annotation: Any) -> list[str]:
    """The values a plain field takes, where there are few: a ``Literal``'s, booleans, null."""
    args = typing.get_args(annotation)
    if annotation is bool:
        return ["true", "false"]
    if typing.get_origin(annotation) is typing.Literal:
        return [str(a).lower() if isinstance(a, bool) else str(a) for a in args]
    if args and type(None) in args:
        return [v for arg in args if arg is not type(None) for v in _values(arg)] + ["null"]
    return []


def set_items(incomplete: str, earlier: Sequence[str] = ()) -> list[str]:
    """Completions of one ``--set`` item: ``a.b.`` and ``a.b.c=`` paths from the config schema,
    then, after ``=``, a family's registered kinds (``pooler.kind=``) or a field's fixed values."""
    discover()
    chosen = _chosen_kinds(earlier)
    key, sep, typed_value = incomplete.partition("=")
    parts = key.split(".")
    model: Any = config_model()
    for depth, name in enumerate(parts[:-1]):
        model = _child(model, name, depth, ".".join(parts[: depth + 1]), chosen) if model else None
    if model is None:
        return []
    last, depth, prefix = parts[-1], len(parts) - 1, ".".join(parts[:-1])
    if sep:
        parent = parts[-2] if len(parts) > 1 else ""
        registry = _registry_of(parent, depth - 1) if parent else None
        info = model.model_fields.get(last)
        if last == "kind" and registry is not None:
            values = registry.kinds()
        else:
            values = _values(info.annotation) if info is not None else []
        return [f"{key}={v}" for v in values if v.startswith(typed_value)]
    found = []
    for name in model.model_fields:
        if not name.startswith(last):
            continue
        path = f"{prefix}.{name}" if prefix else name
        block = _child(model, name, depth, path, chosen)
        found.append(f"{path}." if block is not None else f"{path}=")
    return found


def preset_names(incomplete: str) -> list[str]:
    """Registered presets (plugins' included) starting with ``incomplete``."""
    discover()
    return [kind for kind in PRESETS.kinds() if kind.startswith(incomplete)]


def family_kinds(family: str, incomplete: str) -> list[str]:
    """Registered kinds of one family (``pooler``, ``head``, ...) starting with ``incomplete``."""
    discover()
    registry = FAMILY_FIELDS.get(family)
    return [kind for kind in registry.kinds() if kind.startswith(incomplete)] if registry else []


def run_folders(incomplete: str, root: Path | None = None) -> list[str]:
    """Run folders (holding ``checkpoint/probe.json``) whose path starts with ``incomplete``,
    looked for up to `RUN_SEARCH_DEPTH` levels below the folder typed so far (default: the
    working folder); hidden folders are skipped."""
    root = Path.cwd() if root is None else root
    typed = Path(incomplete)
    base = incomplete if incomplete.endswith(("/", os.sep)) else str(typed.parent)
    start = root / base if base not in {"", "."} else root
    if not start.is_dir():
        return []
    found = []
    for folder, subfolders, _files in os.walk(start):
        here = Path(folder)
        level = len(here.relative_to(start).parts)
        subfolders[:] = sorted(
            s for s in subfolders if not s.startswith(".") and s not in _SKIPPED and level < RUN_SEARCH_DEPTH
        )
        if (here / RUN_MARKER).is_file():
            if typed.is_absolute():
                shown = here.as_posix()
            else:
                name = here.relative_to(root).as_posix() if here != root else "."
                shown = f"./{name}" if incomplete.startswith("./") and name != "." else name
            if shown.startswith(incomplete):
                found.append(shown)
            subfolders[:] = [s for s in subfolders if s != "checkpoint"]
    return found
