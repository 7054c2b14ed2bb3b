"""docs/plugins.md: the plugin its three code blocks describe is short, installs, and works.

The blocks are written into a fresh project, installed with pip into a private folder, and
exercised in subprocesses that have only that folder added to their path: the plugin's own
test passes, ``probekit components list`` names its distribution, and a config using its kind
validates after ``probekit.discover()``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.plugin_builder import install

DOC = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"
TITLES = ("pyproject.toml", "my_pooler.py", "test_my_pooler.py")
MAX_LINES = 40
BLOCK = re.compile(
    r'^```(?P<lang>\w+) title="(?P<title>[^"]+)"\n(?P<body>.*?)^```$', re.MULTILINE | re.DOTALL
)


def author_blocks() -> dict[str, str]:
    """The code blocks of docs/plugins.md by title; exactly the three files an author writes."""
    found = [(m["title"], m["body"]) for m in BLOCK.finditer(DOC.read_text(encoding="utf-8"))]
    assert sorted(title for title, _ in found) == sorted(TITLES), found
    return dict(found)


def code_lines(blocks: dict[str, str]) -> int:
    return sum(1 for body in blocks.values() for line in body.splitlines() if line.strip())


def test_the_author_writes_fewer_than_40_lines() -> None:
    assert code_lines(author_blocks()) < MAX_LINES


def _field(pattern: str, text: str) -> re.Match[str]:
    match = re.search(pattern, text, re.MULTILINE)
    assert match is not None, f"pyproject.toml of docs/plugins.md has no match for {pattern!r}"
    return match


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


VALIDATE = """
import json, sys
import probekit
probekit.discover()
kind = sys.argv[1]
alone = probekit.load_config({"pooler": {"kind": kind}})
nested = probekit.load_config({"pooler": {"kind": "multilayer", "token_pooler": {"kind": kind}}})
spec = type(alone.pooler)
print(json.dumps({
    "pooler": alone.pooler.model_dump(),
    "token_pooler": nested.pooler.token_pooler.model_dump(),
    "file": sys.modules[spec.__module__].__file__,
}))
"""


@pytest.mark.slow
def test_the_documented_plugin_installs_passes_its_test_and_is_discovered(tmp_path: Path) -> None:
    blocks = author_blocks()
    pyproject = blocks["pyproject.toml"]
    dist = _field(r'^name = "([^"]+)"', pyproject)[1]
    version = _field(r'^version = "([^"]+)"', pyproject)[1]
    kind = _field(r'^\[project\.entry-points\."probekit\.poolers"\]\n(\w+) = ', pyproject)[1]

    project, site, checks = tmp_path / "project", tmp_path / "site", tmp_path / "checks"
    for folder in (project, checks):
        folder.mkdir()
    for title, body in blocks.items():
        (project / title).write_text(body, encoding="utf-8")
    # The test runs from a folder of its own, so my_pooler can only come from the installed copy.
    (checks / "test_my_pooler.py").write_text(blocks["test_my_pooler.py"], encoding="utf-8")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROBEKIT_", "PYTEST_", "PIP_"))}
    install(project, site)  # offline, with the test environment's setuptools, as `pip install .`
    env["PYTHONPATH"] = str(site)

    tests = _run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_my_pooler.py"], checks, env
    )
    assert "1 passed" in tests

    listing = json.loads(
        _run([sys.executable, "-m", "probekit", "components", "list", "--json"], checks, env)
    )
    entry = {e["kind"]: e for e in listing["families"]["poolers"]}[kind]
    assert entry["distribution"] == dist and not entry["builtin"]
    assert entry["source"].startswith(f"{dist} {version} (entry point probekit.poolers:{kind} = ")
    assert kind not in listing["unavailable"].get("poolers", {})

    validated = json.loads(_run([sys.executable, "-c", VALIDATE, kind], checks, env))
    assert validated["pooler"] == {"kind": kind, "layer": -1}
    assert validated["token_pooler"] == {"kind": kind, "layer": -1}
    assert Path(validated["file"]).resolve().is_relative_to(site.resolve())
