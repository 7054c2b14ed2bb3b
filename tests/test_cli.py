"""The ``probekit`` command line: outputs, exit codes and one-line errors without tracebacks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from probekit.cli import main

import probekit
from probekit import REGISTRIES, load_config
from probekit.poolers import MaskedMean
from probekit.registry import BUILTIN, ENV_DISABLE_AUTOLOAD
from probekit.spec import BuildContext, TokenPoolerSpec

FAMILIES = ("poolers", "heads", "freezers", "schedulers", "tasks", "presets")
VERSION_LINE = f"probekit {probekit.__version__}"


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``probekit argv`` in-process; return (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, out: str, err: str, *fragments: str) -> list[str]:
    """Exit 2, nothing on stdout, no traceback, each fragment on stderr; return stderr's lines."""
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in stderr:\n{err}"
    return err.splitlines()


def assert_probekit_error(code: int, out: str, err: str, *fragments: str) -> list[str]:
    """A probekit user error: every stderr line is a ``probekit: error:`` line."""
    lines = assert_user_error(code, out, err, *fragments)
    assert out == ""
    assert lines
    for line in lines:
        assert line.startswith("probekit: error: "), line
    return [line.removeprefix("probekit: error: ") for line in lines]


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


# -- version ------------------------------------------------------------------------------------
def test_version_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "--version")
    assert (code, out, err) == (0, VERSION_LINE + "\n", "")


@pytest.mark.parametrize(
    "command",
    [
        pytest.param([str(Path(sys.executable).parent / "probekit"), "--version"], id="console-script"),
        pytest.param([sys.executable, "-m", "probekit", "--version"], id="python-m"),
    ],
)
def test_version_real_process(command: list[str]) -> None:
    if not Path(command[0]).exists():
        pytest.fail(f"console script not installed: {command[0]}")
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == VERSION_LINE + "\n"
    assert "Traceback" not in done.stderr


# -- components ---------------------------------------------------------------------------------
def _parse_listing(out: str) -> dict[str, dict[str, str]]:
    families: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in out.splitlines():
        if re.fullmatch(r"[a-z]+:", line):
            current = families.setdefault(line[:-1], {})
            continue
        match = re.fullmatch(r"  (\S+)\s+(.+)", line)
        assert match and current is not None, f"unexpected line {line!r}"
        current[match.group(1)] = match.group(2)
    return families


def test_components_list_shows_every_kind_with_its_source(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "components", "list")
    assert code == 0, err
    assert "Traceback" not in out + err
    listing = _parse_listing(out)
    assert list(listing) == list(FAMILIES)
    for family, registry in REGISTRIES.items():
        assert set(listing[family]) >= set(registry.kinds()), family
        for entry in registry.entries():
            assert listing[family][entry.kind] == entry.source
    builtin = {("poolers", k) for k in ("cls", "last_token", "masked_mean", "max", "multilayer")} | {
        ("heads", "linear"),
        ("heads", "mlp"),
        ("presets", "safety8k"),
    }
    builtin |= {("freezers", k) for k in ("all", "bottom", "none", "regex")}
    builtin |= {("schedulers", k) for k in ("constant", "cosine", "linear")}
    builtin |= {("tasks", "binary")}
    for family, kind in builtin:
        assert listing[family][kind] == BUILTIN == "probekit (built-in)"


def test_components_list_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "components", "list", "--json")
    assert code == 0, err
    payload = json.loads(out)
    assert set(payload["families"]) == set(FAMILIES)
    for family, registry in REGISTRIES.items():
        rows = payload["families"][family]
        assert [row["kind"] for row in rows] == registry.kinds()
        for row, entry in zip(rows, registry.entries(), strict=True):
            assert row["source"] == entry.source
            assert row["builtin"] is entry.builtin
            assert row["distribution"] == entry.distribution
    assert {row["kind"] for row in payload["families"]["poolers"]} >= {"masked_mean", "multilayer"}
    assert all(row["builtin"] for row in payload["families"]["presets"] if row["kind"] == "safety8k")
    disabled = os.environ.get(ENV_DISABLE_AUTOLOAD, "").strip().lower() in {"1", "true", "yes", "on"}
    assert payload["plugins_disabled"] is disabled
    env = {**os.environ, ENV_DISABLE_AUTOLOAD: "1"}
    done = subprocess.run(
        [sys.executable, "-m", "probekit", "components", "list", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0 and json.loads(done.stdout)["plugins_disabled"] is True, done.stderr


class _ToyPoolSpec(TokenPoolerSpec):
    kind: Literal["toy_pool"] = "toy_pool"
    temperature: float = 1.0

    def build(self, ctx: BuildContext) -> MaskedMean:
        return MaskedMean()


def test_components_list_includes_runtime_plugins(
    capsys: pytest.CaptureFixture[str], isolated_registry: Any, tmp_path: Path
) -> None:
    isolated_registry["poolers"].register(_ToyPoolSpec)
    code, out, err = cli(capsys, "components", "list")
    assert code == 0, err
    assert _parse_listing(out)["poolers"]["toy_pool"] == f"module {__name__}"
    code, out, _ = cli(capsys, "components", "list", "--json")
    row = next(r for r in json.loads(out)["families"]["poolers"] if r["kind"] == "toy_pool")
    assert row["builtin"] is False

    code, out, err = cli(capsys, "config", "schema")
    assert code == 0, err
    assert "toy_pool" in json.loads(out)["properties"]["pooler"]["discriminator"]["mapping"]

    config = write(tmp_path, "toy.yaml", "pooler:\n  kind: toy_pool\n  temperature: 3.5\n")
    code, out, err = cli(capsys, "config", "validate", str(config))
    assert (code, out) == (0, f"{config}: ok\n"), err
    code, out, err = cli(capsys, "config", "show", "--config", str(config))
    assert code == 0, err
    assert yaml.safe_load(out)["pooler"] == {"kind": "toy_pool", "layer": -1, "temperature": 3.5}


# -- config schema / show -----------------------------------------------------------------------
def test_config_schema_is_json_with_every_pooler_kind(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "config", "schema")
    assert code == 0, err
    schema = json.loads(out)
    assert schema == probekit.json_schema()
    pooler = schema["properties"]["pooler"]
    assert set(pooler["discriminator"]["mapping"]) == set(probekit.POOLERS.kinds())
    consts = set()
    for alt in pooler["oneOf"]:
        spec = schema["$defs"][alt["$ref"].rsplit("/", 1)[-1]]
        consts.add(spec["properties"]["kind"]["const"])
    assert consts == set(probekit.POOLERS.kinds())
    for field, registry in probekit.config.FAMILY_FIELDS.items():
        assert set(schema["properties"][field]["discriminator"]["mapping"]) == set(registry.kinds())


@pytest.mark.parametrize("name", probekit.PRESETS.kinds())
def test_config_show_preset_yaml_loads_back(
    name: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, err = cli(capsys, "config", "show", "--preset", name)
    assert code == 0, err
    assert err == ""
    expected = probekit.preset(name)
    assert load_config(yaml.safe_load(out)) == expected
    assert load_config(write(tmp_path, "shown.yaml", out)) == expected
    assert out == probekit.dump_config(expected, "yaml")


def test_config_show_json_and_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = cli(capsys, "config", "show", "--preset", "safety8k", "--format", "json")
    assert code == 0, err
    safety = probekit.preset("safety8k")
    assert load_config(json.loads(out)) == safety
    path = write(tmp_path, "safety.json", out)
    code, out, err = cli(capsys, "config", "show", "--config", str(path))
    assert code == 0, err
    assert load_config(yaml.safe_load(out)) == safety

    # A partial file is shown with every default filled in.
    partial = write(tmp_path, "partial.yml", "head:\n  kind: mlp\n")
    code, out, err = cli(capsys, "config", "show", "--config", str(partial))
    assert code == 0, err
    shown = yaml.safe_load(out)
    assert shown["head"]["hidden_sizes"] == [128]
    assert shown["pooler"] == {"kind": "masked_mean", "layer": -1}


def test_config_show_unknown_preset(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "config", "show", "--preset", "safety8x")
    (line,) = assert_probekit_error(code, out, err, "did you mean 'safety8k'")
    assert "'safety8x'" in line


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        pytest.param([], "give exactly one of --preset or --config", id="neither"),
        pytest.param(
            ["--preset", "safety8k", "--config", "x.yaml"],
            "give exactly one of --preset or --config",
            id="both",
        ),
        pytest.param(
            ["--preset", "safety8k", "--format", "toml"], "--format must be yaml or json", id="format"
        ),
    ],
)
def test_config_show_bad_arguments(
    capsys: pytest.CaptureFixture[str], args: list[str], fragment: str
) -> None:
    code, out, err = cli(capsys, "config", "show", *args)
    assert_probekit_error(code, out, err, fragment)


# -- config validate ----------------------------------------------------------------------------
def test_config_validate_ok(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = write(tmp_path, "good.yaml", probekit.dump_config(probekit.preset("safety8k")))
    code, out, err = cli(capsys, "config", "validate", str(path))
    assert (code, out, err) == (0, f"{path}: ok\n", "")


BAD_CONFIG = """\
pooler:
  kind: masked_mean
  layerz: 3
head:
  kind: mlpp
freezer:
  kind: bottom
  count: 2
  fraction: 0.5
optimizer:
  lr_head: 0
"""


def test_config_validate_reports_every_problem_on_its_own_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = write(tmp_path, "bad.yaml", BAD_CONFIG)
    code, out, err = cli(capsys, "config", "validate", str(path))
    lines = assert_probekit_error(code, out, err)
    located = sorted(tuple(line.split(": ", 2)[:2]) for line in lines)
    assert located == sorted(
        [
            (f"{path}:3", "pooler.layerz"),
            (f"{path}:5", "head.kind"),
            (f"{path}:6", "freezer"),
            (f"{path}:11", "optimizer.lr_head"),
        ]
    )
    text = "\n".join(lines)
    assert "did you mean 'layer'?" in text
    assert "did you mean 'mlp'?" in text
    assert "allowed kinds: linear, mlp" in text
    assert "give exactly one of count or fraction" in text


@pytest.mark.parametrize(
    ("name", "text", "fragments"),
    [
        pytest.param(
            "bad.yaml", "head:\n  kind: linear\n   dropout: 0.1\n", [":3: not valid YAML"], id="yaml"
        ),
        pytest.param("bad.json", '{"head": {"kind": "linear"},,}\n', [":1: not valid JSON"], id="json"),
        pytest.param("list.yaml", "- 1\n- 2\n", [":1: a config must be a mapping, got list"], id="list"),
        pytest.param("c.txt", "{}\n", ["config files must end in .json, .yaml or .yml"], id="suffix"),
        pytest.param(
            "evil.yaml",
            'x: !!python/object/apply:os.system ["touch {marker}"]\n',
            [":1: not valid YAML", "python/object/apply:os.system"],
            id="python-tag",
        ),
        pytest.param(
            "nested.yaml",
            "pooler:\n  kind: multilayer\n  token_pooler: {kind: cls, layer: 1}\n",
            [":3: pooler.token_pooler: token_pooler.layer is not used inside multilayer"],
            id="nested-layer",
        ),
    ],
)
def test_config_validate_bad_files(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str, text: str, fragments: list[str]
) -> None:
    marker = tmp_path / "pwned"
    path = write(tmp_path, name, text.replace("{marker}", str(marker)))
    code, out, err = cli(capsys, "config", "validate", str(path))
    (line,) = assert_probekit_error(code, out, err, *fragments)
    assert line.startswith(str(path))
    assert not marker.exists()


def test_config_validate_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    code, out, err = cli(capsys, "config", "validate", str(path))
    assert assert_probekit_error(code, out, err) == [f"{path}: no such file"]


# -- usage errors -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        pytest.param(["bogus"], ["No such command 'bogus'", "Usage: probekit"], id="command"),
        pytest.param(
            ["components", "lst"], ["No such command 'lst'", "Usage: probekit components"], id="subcommand"
        ),
        pytest.param(["--bogus"], ["No such option: --bogus", "Usage: probekit"], id="root-option"),
        pytest.param(
            ["config", "show", "--bogus"],
            ["No such option: --bogus", "Usage: probekit config show"],
            id="option",
        ),
        pytest.param(["components", "list", "--jsn"], ["No such option: --jsn"], id="option-typo"),
        pytest.param(
            ["config", "validate"],
            ["Missing argument", "Usage: probekit config validate"],
            id="missing-argument",
        ),
        pytest.param(["config", "show", "--preset"], ["'--preset' requires an argument"], id="missing-value"),
    ],
)
def test_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], fragments: list[str]
) -> None:
    code, out, err = cli(capsys, *argv)
    assert_user_error(code, out, err, *fragments)
    assert "probekit: error:" not in err  # click prints usage errors itself, once
