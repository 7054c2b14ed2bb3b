"""The distribution: one import package at top level, the CLI inside it, the console script."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_holds_only_probekit_at_top_level(tmp_path: Path) -> None:
    build = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = tmp_path.glob("probekit_lm-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        console = archive.read(entry_points).decode()
    top = {name.split("/", 1)[0] for name in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"probekit"}, sorted(top)
    assert "probekit/cli/__init__.py" in names  # cli/ is installed as probekit.cli
    assert not any(n.startswith(("cli/", "tests/", "plugins/", "docs/")) for n in names)
    assert "probekit/py.typed" in names
    assert "probekit = probekit.cli:run" in console


def test_cli_module_is_the_repository_cli_folder() -> None:
    import probekit.cli

    assert Path(probekit.cli.__file__).resolve().parent.name == "cli"
