"""Plugin provenance: which package each component kind of a run came from, and what to say
when a run needs a plugin that is not here (`probekit.checkpoint` records and checks it)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from probekit.errors import PluginError
from probekit.runfiles import is_distribution_name, printable, shown

if TYPE_CHECKING:
    from probekit.checkpoint import ProbeMeta


def components(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Where each component kind of a config comes from (built-in, or which plugin distribution)."""
    from probekit.config import FAMILY_FIELDS

    found = []
    blocks = [(field, config.get(field, {})) for field in FAMILY_FIELDS]
    token = config.get("pooler", {}).get("token_pooler")
    if isinstance(token, dict):
        blocks.append(("pooler", token))
    for field, block in blocks:
        registry = FAMILY_FIELDS[field]
        kind = block.get("kind")
        if isinstance(kind, str) and kind in registry:
            entry = registry.entry(kind)
            found.append(
                {
                    "family": registry.family,
                    "kind": kind,
                    "source": entry.source,
                    "distribution": entry.distribution,
                }
            )
    return found


def require_plugins(meta: ProbeMeta, where: Path) -> None:
    """Refuse, naming the package to install, a run whose plugin kinds are not available here.
    The names come from the run folder: a distribution name is shown in an install command only
    when it is a valid one (PEP 508), shell-quoted; anything else is shown with ``repr``."""
    from probekit.registry import BUILTIN, REGISTRIES

    by_family = {registry.family: registry for registry in REGISTRIES.values()}
    for component in meta.components:
        dist, kind = component.distribution, component.kind
        registry = by_family.get(component.family)
        if registry is None or kind in registry:
            continue
        if dist is None:
            source = component.source
            if source and source != BUILTIN:
                family = registry.family
                raise PluginError(
                    f"{where}: this run uses the {family} kind {shown(kind)}, which was registered in "
                    f"code ({printable(source)}) and is not registered now: run the code that registers "
                    f"it (import its module, or {family.upper()}S.register(...)) before loading the run, "
                    "or package it as a plugin (docs/plugins.md)"
                )
            continue
        if not is_distribution_name(dist):
            raise PluginError(
                f"{where}: components: this run uses the {registry.family} kind {shown(kind)} from a "
                f"package it names with an invalid distribution name, {shown(dist)}; no such package "
                "can be installed"
            )
        raise PluginError(
            f"{where}: this run uses the {registry.family} kind {shown(kind)} from the package {dist}, "
            + _why_missing(registry.unavailable().get(kind), dist, kind)
        )


def _why_missing(reason: str | None, dist: str, kind: str) -> str:
    """Why a recorded plugin kind is not registered: failed, switched off, or not installed."""
    from probekit.registry import ENV_BLOCK, ENV_DISABLE_AUTOLOAD, last_report

    if reason:
        return f"which failed to load: {printable(reason)}"
    report = last_report()
    if report is not None and report.disabled:
        return f"but plugin autoload is disabled by {ENV_DISABLE_AUTOLOAD}; unset it to load {dist}"
    if report is not None and any(f":{kind} (" in b or f"({dist} " in b for b in report.blocked):
        return f"which is installed but blocked by {ENV_BLOCK}"
    return f"which is not installed: pip install {shlex.quote(dist)}"
