"""One registry instance per component family, and explicit entry-point discovery.

Built-in components register themselves when their module is imported. Third-party components
arrive through Python entry points (groups ``probekit.poolers``, ``probekit.heads``,
``probekit.freezers``, ``probekit.schedulers``, ``probekit.presets``), read only when
`discover` is called, never at import.

Environment switches:

* ``PROBEKIT_DISABLE_PLUGIN_AUTOLOAD=1`` makes `discover` load nothing.
* ``PROBEKIT_BLOCK_PLUGINS=name,other`` skips entry points by entry-point name or distribution name.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from probekit.errors import DuplicateKindError, PluginUnavailableError, UnknownKindError
from probekit.spec import FreezerSpec, HeadSpec, PoolerSpec, Preset, SchedulerSpec, TaskSpec, spec_kind

log = logging.getLogger("probekit")

ENV_DISABLE_AUTOLOAD = "PROBEKIT_DISABLE_PLUGIN_AUTOLOAD"
ENV_BLOCK = "PROBEKIT_BLOCK_PLUGINS"
BUILTIN = "probekit (built-in)"

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered kind: what it is and where it came from."""

    family: str
    kind: str
    obj: T
    source: str
    """Human-readable origin: ``probekit (built-in)``, a module, or a distribution + entry point."""
    distribution: str | None = None
    """The distribution (package) that provided it, for plugins; None for built-ins and code."""

    @property
    def builtin(self) -> bool:
        return self.source == BUILTIN


@dataclass
class _State(Generic[T]):
    entries: dict[str, Entry[T]] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)


class Registry(Generic[T]):
    """Kinds of one family (poolers, heads, ...) keyed by ``kind``.

    A duplicate kind is an error naming both sources; lookups of unknown kinds suggest the
    closest known one.
    """

    def __init__(
        self,
        family: str,
        group: str,
        *,
        key: Callable[[T], str],
        check: Callable[[Any], None],
    ) -> None:
        self.family = family
        self.group = group
        self._key = key
        self._check = check
        self._state: _State[T] = _State()
        self.version = 0
        """Incremented on every change; caches of derived models key on it."""

    # -- registering -------------------------------------------------------------------------
    def register(self, obj: T, *, source: str | None = None, distribution: str | None = None) -> T:
        """Add ``obj`` under its kind and return it (so it works as a class decorator).

        Raises:
            DuplicateKindError: when the kind is already registered.
            TypeError: when ``obj`` is not a component of this family.
        """
        self._check(obj)
        kind = self._key(obj)
        if source is None:  # the module that called register(): where the kind is defined
            module = str(sys._getframe(1).f_globals.get("__name__", ""))
            source = BUILTIN if module.startswith("probekit.") else f"module {module}"
        existing = self._state.entries.get(kind)
        if existing is not None:
            if existing.obj is obj and existing.source == source:
                return obj  # re-import of the same module: not a conflict
            raise DuplicateKindError(self.family, kind, existing.source, source)
        self._state.entries[kind] = Entry(self.family, kind, obj, source, distribution)
        self._state.unavailable.pop(kind, None)
        self.version += 1
        return obj

    def unregister(self, kind: str) -> None:
        """Remove ``kind``; unknown kinds raise `UnknownKindError`."""
        if kind not in self._state.entries:
            raise UnknownKindError(self.family, kind, self._state.entries)
        del self._state.entries[kind]
        self.version += 1

    def mark_unavailable(self, kind: str, reason: str) -> None:
        """Record why ``kind`` cannot be used (its plugin failed or conflicts)."""
        self._state.unavailable[kind] = reason
        self.version += 1

    # -- looking up --------------------------------------------------------------------------
    def entry(self, kind: str) -> Entry[T]:
        """The entry for ``kind``.

        Raises:
            PluginUnavailableError: the kind's plugin failed to load or conflicts with another.
            UnknownKindError: no such kind (with a did-you-mean suggestion).
        """
        if not isinstance(kind, str):
            raise UnknownKindError(self.family, repr(kind), self._state.entries)
        try:
            return self._state.entries[kind]
        except KeyError:
            if kind in self._state.unavailable:
                raise PluginUnavailableError(
                    f"{self.family} kind {kind!r} is unavailable: {self._state.unavailable[kind]}"
                ) from None
            raise UnknownKindError(self.family, kind, self._state.entries) from None

    def get(self, kind: str) -> T:
        """The registered object (spec class or preset) for ``kind``."""
        return self.entry(kind).obj

    def unavailable(self) -> dict[str, str]:
        """Kinds that a plugin announced but that cannot be used, with the reason."""
        return dict(self._state.unavailable)

    def entries(self) -> list[Entry[T]]:
        """All entries, sorted by kind."""
        return [self._state.entries[k] for k in sorted(self._state.entries)]

    def kinds(self) -> list[str]:
        return sorted(self._state.entries)

    def __contains__(self, kind: object) -> bool:
        return kind in self._state.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.kinds())

    def __len__(self) -> int:
        return len(self._state.entries)

    def __repr__(self) -> str:
        return f"Registry({self.family!r}, kinds={self.kinds()})"

    # -- isolation ---------------------------------------------------------------------------
    def _snapshot(self) -> _State[T]:
        return _State(dict(self._state.entries), dict(self._state.unavailable))

    def _restore(self, state: _State[T]) -> None:
        self._state = _State(dict(state.entries), dict(state.unavailable))
        self.version += 1


def _spec_checker(base: type[BaseModel]) -> Callable[[Any], None]:
    def check(obj: Any) -> None:
        if not (isinstance(obj, type) and issubclass(obj, base)):
            raise TypeError(f"expected a subclass of {base.__qualname__}, got {obj!r}")
        spec_kind(obj)

    return check


def _preset_checker(obj: Any) -> None:
    if not isinstance(obj, Preset):
        raise TypeError(f"expected a probekit.spec.Preset, got {obj!r}")


POOLERS: Registry[type[PoolerSpec]] = Registry(
    "pooler", "probekit.poolers", key=spec_kind, check=_spec_checker(PoolerSpec)
)
HEADS: Registry[type[HeadSpec]] = Registry(
    "head", "probekit.heads", key=spec_kind, check=_spec_checker(HeadSpec)
)
FREEZERS: Registry[type[FreezerSpec]] = Registry(
    "freezer", "probekit.freezers", key=spec_kind, check=_spec_checker(FreezerSpec)
)
SCHEDULERS: Registry[type[SchedulerSpec]] = Registry(
    "scheduler", "probekit.schedulers", key=spec_kind, check=_spec_checker(SchedulerSpec)
)
TASKS: Registry[type[TaskSpec]] = Registry(
    "task", "probekit.tasks", key=spec_kind, check=_spec_checker(TaskSpec)
)
PRESETS: Registry[Preset] = Registry(
    "preset", "probekit.presets", key=lambda p: p.kind, check=_preset_checker
)

REGISTRIES: dict[str, Registry[Any]] = {
    "poolers": POOLERS,
    "heads": HEADS,
    "freezers": FREEZERS,
    "schedulers": SCHEDULERS,
    "tasks": TASKS,
    "presets": PRESETS,
}


# -- discovery -------------------------------------------------------------------------------
@dataclass(frozen=True)
class PluginFailure:
    """A plugin entry point that could not be used, and why."""

    group: str
    name: str
    value: str
    distribution: str | None
    reason: str

    def __str__(self) -> str:
        dist = self.distribution or "an unknown distribution"
        return f"plugin {self.group}:{self.name} = {self.value} (from {dist}) {self.reason}"


@dataclass
class DiscoveryReport:
    """What `discover` found: loaded kinds, failures, and whether autoload was off."""

    loaded: list[Entry[Any]] = field(default_factory=list)
    failed: list[PluginFailure] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    disabled: bool = False


_report: DiscoveryReport | None = None


def _distribution(ep: importlib.metadata.EntryPoint) -> tuple[str | None, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, "unknown distribution"
    name = dist.metadata["Name"] or dist.name
    return name, f"{name} {dist.version}"


def discover(*, force: bool = False) -> DiscoveryReport:
    """Load third-party components from entry points into the registries.

    Runs once per process (``force=True`` runs again). A plugin that fails to import, is not a
    component of its family, or whose entry-point name differs from its kind is recorded in the
    report and logged once; the built-ins and other plugins keep working. Two plugins claiming
    one kind make that kind unusable, with an error naming both; a plugin claiming a built-in
    kind is rejected, naming both.
    """
    global _report
    if _report is not None and not force:
        return _report
    report = DiscoveryReport()
    if os.environ.get(ENV_DISABLE_AUTOLOAD, "").strip().lower() in {"1", "true", "yes", "on"}:
        report.disabled = True
        _report = report
        return report
    blocked = {b.strip() for b in os.environ.get(ENV_BLOCK, "").split(",") if b.strip()}
    for registry in REGISTRIES.values():
        for ep in importlib.metadata.entry_points(group=registry.group):
            _load_entry_point(registry, ep, blocked, report)
    for failure in report.failed:
        log.warning("%s", failure)
    _report = report
    return report


def _load_entry_point(
    registry: Registry[Any],
    ep: importlib.metadata.EntryPoint,
    blocked: set[str],
    report: DiscoveryReport,
) -> None:
    dist_name, dist_label = _distribution(ep)

    def fail(reason: str, *, kind: str | None = None) -> None:
        report.failed.append(PluginFailure(registry.group, ep.name, ep.value, dist_label, reason))
        target = kind or ep.name
        if target not in registry:
            registry.mark_unavailable(
                target, f"{reason} [entry point {registry.group}:{ep.name} from {dist_label}]"
            )

    if ep.name in blocked or (dist_name is not None and dist_name in blocked):
        report.blocked.append(f"{registry.group}:{ep.name} ({dist_label})")
        return
    try:
        obj = ep.load()
    except Exception as exc:  # a broken plugin must not take the built-ins down
        fail(f"failed to import: {type(exc).__name__}: {exc}")
        return
    try:
        registry._check(obj)
        kind = registry._key(obj)
    except TypeError as exc:
        fail(f"is not a {registry.family} component: {exc}")
        return
    if kind != ep.name:
        fail(f"is named {ep.name!r} but its kind is {kind!r}; they must match")
        return
    source = f"{dist_label} (entry point {registry.group}:{ep.name} = {ep.value})"
    if kind in registry:
        first = registry.entry(kind)
        if first.obj is obj:
            return
        error = DuplicateKindError(registry.family, kind, first.source, source)
        if not first.builtin:
            registry.unregister(kind)
            registry.mark_unavailable(kind, str(error))
        report.failed.append(
            PluginFailure(registry.group, ep.name, ep.value, dist_label, f"conflicts: {error}")
        )
        return
    if kind in registry.unavailable():
        reason = registry.unavailable()[kind]
        report.failed.append(
            PluginFailure(registry.group, ep.name, ep.value, dist_label, f"conflicts: {reason}")
        )
        return
    registry.register(obj, source=source, distribution=dist_name)
    report.loaded.append(registry.entry(kind))


def last_report() -> DiscoveryReport | None:
    """The report of the last `discover` call in this process, if any."""
    return _report


@contextlib.contextmanager
def isolated_registries() -> Iterator[dict[str, Registry[Any]]]:
    """Give the block a private copy of every registry; restore all of them afterwards.

    Whatever the block registers, unregisters or discovers is forgotten on exit, and
    `discover` runs afresh inside the block.
    """
    global _report
    # The built-ins are registered already: importing any probekit module imports the package,
    # which imports probekit.builtins first.
    saved = {name: reg._snapshot() for name, reg in REGISTRIES.items()}
    saved_report = _report
    _report = None
    try:
        yield REGISTRIES
    finally:
        for name, reg in REGISTRIES.items():
            reg._restore(saved[name])
        _report = saved_report
