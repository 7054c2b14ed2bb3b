"""Build, really install, and exercise third-party plugin distributions for the fault tests.

A `PluginDist` is written as a small setuptools project (``pyproject.toml`` with entry points and
top-level modules) and installed with ``pip install --no-deps --no-build-isolation --target SITE``,
so the resulting ``*.dist-info`` is exactly what pip produces for a user. Each distribution gets
its own ``SITE`` folder; a test picks the plugins it wants by listing their folders on
``PYTHONPATH`` of a subprocess, which leaves the registries of the test process untouched.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
"""The repository root: on ``PYTHONPATH`` it makes ``tests.backbones`` importable."""

MARKER_ENV = "PLUGIN_FAULTS_MARKER"
"""A plugin module appends ``imported <module>`` and its specs ``built <kind>`` to this file."""


@dataclass(frozen=True)
class PluginDist:
    """One plugin distribution: name, version, top-level modules and entry points."""

    name: str
    version: str
    modules: Mapping[str, str]
    """Module name -> source."""
    entry_points: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    """Group -> {entry-point name: ``module:attr``}."""

    @property
    def label(self) -> str:
        """``name version``, as probekit names a distribution in its messages."""
        return f"{self.name} {self.version}"


def pyproject(dist: PluginDist) -> str:
    """The ``pyproject.toml`` of ``dist`` (setuptools, one top-level module per entry of modules)."""
    lines = [
        "[build-system]",
        'requires = ["setuptools>=61"]',
        'build-backend = "setuptools.build_meta"',
        "",
        "[project]",
        f'name = "{dist.name}"',
        f'version = "{dist.version}"',
        'requires-python = ">=3.10"',
        "",
    ]
    for group, eps in dist.entry_points.items():
        lines.append(f'[project.entry-points."{group}"]')
        lines += [f'{name} = "{target}"' for name, target in eps.items()]
        lines.append("")
    modules = ", ".join(f'"{m}"' for m in dist.modules)
    lines += ["[tool.setuptools]", f"py-modules = [{modules}]", ""]
    return "\n".join(lines)


def write_project(project: Path, dist: PluginDist) -> Path:
    """Write ``dist`` as the project folder ``project``; return it."""
    project.mkdir(parents=True)
    (project / "pyproject.toml").write_text(pyproject(dist), encoding="utf-8")
    for module, source in dist.modules.items():
        (project / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
    return project


def install(project: Path, site: Path) -> Path:
    """``pip install`` the project into the folder ``site`` (offline, no dependencies)."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--quiet",
        "--target",
        str(site),
        str(project),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=project)
    if done.returncode != 0:
        raise RuntimeError(
            f"installing {project.name} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
        )
    return site


def install_all(root: Path, dists: Mapping[str, PluginDist]) -> dict[str, Path]:
    """Build and install each distribution into its own site folder; key -> site folder.

    Keys name the variants (two variants may share a distribution name). The installs run in
    parallel: each is a few seconds, mostly interpreter start-up.
    """
    jobs = [(write_project(root / "src" / key, dist), root / "site" / key) for key, dist in dists.items()]
    with ThreadPoolExecutor(max_workers=4) as pool:
        sites = list(pool.map(lambda job: install(*job), jobs))
    return dict(zip(dists, sites, strict=True))


# -- running probekit in a fresh interpreter ------------------------------------------------------
def plugin_env(paths: Sequence[Path], **extra: str) -> dict[str, str]:
    """The environment of a subprocess that sees exactly the plugin folders ``paths``.

    Every ``PROBEKIT_*`` variable of the test process is dropped (``extra`` may set them again);
    Hugging Face stays offline.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROBEKIT_") and k != "PYTHONPATH"}
    env.update(
        PYTHONPATH=os.pathsep.join(str(p) for p in paths),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        OMP_NUM_THREADS="1",
        PYTHONDONTWRITEBYTECODE="1",
    )
    env.pop(MARKER_ENV, None)
    env.update(extra)
    return env


@dataclass(frozen=True)
class Result:
    """Exit code and output of one subprocess."""

    argv: tuple[str, ...]
    code: int
    out: str
    err: str

    def __str__(self) -> str:
        return f"$ {' '.join(self.argv)}\nexit {self.code}\n--- stdout\n{self.out}--- stderr\n{self.err}"

    def warnings(self) -> list[str]:
        """stderr lines of the ``probekit: warning:`` kind."""
        return [line for line in self.err.splitlines() if line.startswith("probekit: warning: ")]

    def errors(self) -> list[str]:
        """stderr lines of the ``probekit: error:`` kind."""
        return [line for line in self.err.splitlines() if line.startswith("probekit: error: ")]


@dataclass(frozen=True)
class Call:
    """One command to run: ``python -m probekit ARGS`` (or ``python ARGS`` with ``python=True``)."""

    args: Sequence[str | Path]
    env: Mapping[str, str]
    cwd: Path
    python: bool = False
    timeout: float = 240


def run(call: Call) -> Result:
    """Run ``call`` in a fresh interpreter and return its result."""
    prefix = [sys.executable] if call.python else [sys.executable, "-m", "probekit"]
    argv = [*prefix, *(str(a) for a in call.args)]
    done = subprocess.run(
        argv,
        env=dict(call.env),
        cwd=call.cwd,
        capture_output=True,
        text=True,
        check=False,
        timeout=call.timeout,
        stdin=subprocess.DEVNULL,
    )
    return Result(tuple(argv[1:]), done.returncode, done.stdout, done.stderr)


def run_many(*calls: Call) -> list[Result]:
    """Run independent calls concurrently (each is mostly interpreter start-up); results in order."""
    with ThreadPoolExecutor(max_workers=min(len(calls), 3) or 1) as pool:
        return list(pool.map(run, calls))


def read_markers(path: Path) -> list[str]:
    """The lines plugin modules wrote to the marker file (none when it does not exist)."""
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


# -- plugin sources -------------------------------------------------------------------------------
POOLER_MODULE = '''
"""A plugin pooler: a scaled masked mean, optionally returning a wrong shape."""

import os
from typing import Literal

import torch
from pydantic import Field

from probekit.poolers.base import Pooler, as_bool_mask
from probekit.spec import BuildContext, TokenPoolerSpec


def _mark(line):
    path = os.environ.get("{marker_env}")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line + "\\n")


_mark("imported " + __name__)


class _Pool(Pooler):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, hidden, mask):
        keep = as_bool_mask(mask, hidden).unsqueeze(-1)
        total = torch.where(keep, hidden, torch.zeros((), dtype=hidden.dtype)).sum(dim=1)
        pooled = self.scale * total / keep.sum(dim=1).clamp(min=1)
        return {result}

    def output_dim(self, hidden_size):
        return hidden_size


class {cls}(TokenPoolerSpec):
    """A scaled masked mean ({shape})."""

    kind: Literal["{kind}"] = "{kind}"
    scale: float = Field(default=2.0, gt=0)

    def build(self, ctx: BuildContext) -> _Pool:
        _mark("built {kind}")
        return _Pool(self.scale)
'''

RESULTS = {
    "ok": "pooled",
    "wide": "torch.cat([pooled, pooled[:, :1]], dim=-1)",  # (b, h + 1) while output_dim says h
    "flat": "pooled.mean(dim=-1)",  # (b,)
}


def pooler_module(kind: str, cls: str, shape: str = "ok") -> str:
    """Source of a module defining the pooler spec ``cls`` of ``kind`` (``shape``: ok/wide/flat)."""
    return (
        POOLER_MODULE.replace("{marker_env}", MARKER_ENV)
        .replace("{result}", RESULTS[shape])
        .replace("{shape}", shape)
        .replace("{cls}", cls)
        .replace("{kind}", kind)
    )
