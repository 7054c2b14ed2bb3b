"""The quick commands start without the heavy stack, and shell completion works (issue 18).

``probekit --help``, ``--version``, ``components list``, ``presets show``, ``config validate``
and ``config schema`` (and every completion) run without importing torch, transformers,
scikit-learn, scipy or matplotlib: each is checked in a fresh interpreter. No timings are
asserted here; docs/performance.md ("Command start-up") has the measurements.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "transformers", "sklearn", "scipy", "matplotlib")

CHECK = f"""
import json, sys
from probekit.cli import main
rc = main(json.loads(sys.argv[1]))
heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)
print("STARTUP-CHECK " + json.dumps({{"rc": rc, "heavy": heavy}}), file=sys.stderr)
"""


def _fresh(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> dict[str, object]:
    """Run ``main(argv)`` in a new interpreter; its exit code and the heavy modules it loaded."""
    done = subprocess.run(
        [sys.executable, "-c", CHECK, json.dumps(argv)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=300,
    )
    lines = [line for line in done.stderr.splitlines() if line.startswith("STARTUP-CHECK ")]
    assert lines, done.stderr
    result: dict[str, object] = json.loads(lines[-1].removeprefix("STARTUP-CHECK "))
    return result


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "small.yaml"
    path.write_text("task:\n  kind: binary\npooler:\n  kind: last_token\nhead:\n  kind: linear\n")
    return path


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["--version"],
        ["components", "list"],
        ["components", "list", "--json"],
        ["presets", "show", "safety8k"],
        ["presets", "list"],
        ["config", "schema"],
        ["config", "validate", "CONFIG"],
    ],
    ids=lambda argv: " ".join(argv),
)
def test_quick_commands_import_no_heavy_module(argv: list[str], config_file: Path, tmp_path: Path) -> None:
    argv = [str(config_file) if a == "CONFIG" else a for a in argv]
    assert _fresh(argv, tmp_path) == {"rc": 0, "heavy": []}


def test_a_broken_config_is_refused_without_the_heavy_stack(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("pooler:\n  kind: no_such_pooler\n")
    assert _fresh(["config", "validate", str(bad)], tmp_path) == {"rc": 2, "heavy": []}


def test_importing_probekit_still_serves_the_whole_api() -> None:
    code = (
        "import sys, probekit\n"
        "assert not {'torch', 'sklearn'} & set(sys.modules), sorted(sys.modules)\n"
        "from probekit.poolers import MaskedMean, Pooler\n"
        "from probekit.poolers.cls import FirstToken\n"
        "assert issubclass(FirstToken, Pooler) and probekit.Probe.__name__ == 'Probe'\n"
        "assert callable(probekit.build) and callable(probekit.train)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# -- completion --------------------------------------------------------------------------------
def test_set_completes_config_paths_kinds_and_values() -> None:
    from probekit.completion import set_items

    top = set_items("")
    assert {"pooler.", "head.", "train.", "data.", "model."} <= set(top)
    assert set_items("po") == ["pooler."]
    assert "pooler.kind=" in set_items("pooler.")
    kinds = set_items("pooler.kind=")
    assert {"pooler.kind=masked_mean", "pooler.kind=multilayer", "pooler.kind=last_token"} <= set(kinds)
    assert set_items("pooler.kind=rol") == ["pooler.kind=rolling_max"]
    assert set_items("head.kind=") == ["head.kind=linear", "head.kind=mlp"]
    # a kind set earlier on the command line picks the fields offered
    assert "pooler.window=" in set_items("pooler.", ["pooler.kind=rolling_max"])
    assert "pooler.token_pooler." in set_items("pooler.t", ["pooler.kind=multilayer"])
    assert "pooler.token_pooler.kind=max" in set_items(
        "pooler.token_pooler.kind=", ["pooler.kind=multilayer"]
    )
    # optional blocks (`X | None`) and fixed values
    assert "data.chat." in set_items("data.ch")
    assert any(item.startswith("data.chat.") for item in set_items("data.chat."))
    assert set_items("model.quantization.bits=") == ["model.quantization.bits=4", "model.quantization.bits=8"]
    assert "train.precision=bf16" in set_items("train.precision=")
    assert set_items("no_such_block.x") == []


def test_presets_and_kinds_complete() -> None:
    from probekit.completion import family_kinds, preset_names

    assert "safety8k" in preset_names("")
    assert preset_names("safe") == ["safety8k"]
    assert family_kinds("head", "") == ["linear", "mlp"]
    assert family_kinds("no_such_family", "") == []


def _run_folder(path: Path) -> Path:
    (path / "checkpoint").mkdir(parents=True)
    (path / "checkpoint" / "probe.json").write_text("{}")
    return path


def test_run_arguments_complete_run_folders(tmp_path: Path) -> None:
    from probekit.completion import run_folders

    _run_folder(tmp_path / "runs" / "a-1")
    _run_folder(tmp_path / "runs" / "b-2")
    _run_folder(tmp_path / ".hidden" / "c")
    (tmp_path / "runs" / "not-a-run").mkdir()
    assert run_folders("", tmp_path) == ["runs/a-1", "runs/b-2"]
    assert run_folders("runs/b", tmp_path) == ["runs/b-2"]
    assert run_folders("./runs/a", tmp_path) == ["./runs/a-1"]
    assert run_folders("nowhere/", tmp_path) == []


def _complete(words: str, cwd: Path) -> tuple[list[str], list[str]]:
    """Click's bash completion in a fresh ``probekit``: the candidates and the heavy modules."""
    env = {
        "_PROBEKIT_COMPLETE": "complete_bash",
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split(" ")) - 1),
    }
    code = (
        "import sys, atexit\n"
        f"atexit.register(lambda: print('HEAVY', *sorted(m for m in {HEAVY!r} if m in sys.modules), "
        "file=sys.stderr))\n"
        "from probekit.cli import main\n"
        "main([])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **env},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    heavy = next(line for line in done.stderr.splitlines() if line.startswith("HEAVY")).split()[1:]
    return done.stdout.split(), heavy


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        ("probekit train --set pooler.kind=", "pooler.kind=masked_mean"),
        ("probekit train --set hea", "head."),
        (
            "probekit sweep --set pooler.kind=multilayer --set pooler.token_pooler.kind=m",
            "pooler.token_pooler.kind=max",
        ),
        ("probekit train --preset ", "safety8k"),
        ("probekit presets show ", "hazards13"),
        ("probekit config show --preset saf", "safety8k"),
        ("probekit eval ", "runs/r-1"),
        ("probekit predict runs/", "runs/r-1"),
        ("probekit train --resume ", "runs/r-1"),
    ],
)
def test_completion_through_click(words: str, expected: str, tmp_path: Path) -> None:
    _run_folder(tmp_path / "runs" / "r-1")
    candidates, heavy = _complete(words, tmp_path)
    assert expected in candidates
    assert heavy == []


def test_completion_scripts_are_offered(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "from probekit.cli import main; raise SystemExit(main(['--help']))"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "200"},
        timeout=300,
    )
    assert done.returncode == 0
    assert "--install-completion" in done.stdout
    assert "--show-completion" in done.stdout
