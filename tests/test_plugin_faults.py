"""Faults of real, pip-installed third-party plugins, seen through fresh interpreters.

Each plugin variant is a small setuptools project installed with ``pip install --target`` into
its own folder, once per session (`sites`). A test runs ``python -m probekit`` (or ``python -c``)
in a subprocess whose ``PYTHONPATH`` lists the plugin folders it wants, so the registries of the
test process never see a plugin. Every CLI failure must exit 2 with a ``probekit: error:`` line
and no traceback; built-in kinds must keep working beside a broken plugin.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

import probekit
from tests import engine_fixtures
from tests.engine_fixtures import ToyData, names, write_toy_data
from tests.plugin_builder import (
    MARKER_ENV,
    REPO,
    Call,
    PluginDist,
    Result,
    install_all,
    plugin_env,
    pooler_module,
    read_markers,
    run,
    run_many,
)

pytestmark = pytest.mark.slow

bert_dir = engine_fixtures.bert_dir  # the tiny saved BERT (4 blocks, width 32), shared per session

POOLERS = "probekit.poolers"

GOOD = PluginDist(
    "probekit-scaled",
    "0.2.0",
    {"scaled_plugin": pooler_module("scaled_mean", "ScaledMeanSpec")},
    {POOLERS: {"scaled_mean": "scaled_plugin:ScaledMeanSpec"}},
)
GOOD_BROKEN = PluginDist(  # a later release of the same distribution whose import fails
    "probekit-scaled",
    "0.3.0",
    {"scaled_plugin": 'raise ImportError("needs libbar")\n'},
    {POOLERS: {"scaled_mean": "scaled_plugin:ScaledMeanSpec"}},
)
BROKEN = PluginDist(
    "probekit-broken",
    "0.3.1",
    {"broken_plugin": 'raise ImportError("needs libfoo")\n'},
    {POOLERS: {"broken": "broken_plugin:BrokenSpec"}},
)
TWIN_A = PluginDist(
    "probekit-twin-a",
    "1.0.0",
    {"twin_a": pooler_module("twin", "TwinSpec")},
    {POOLERS: {"twin": "twin_a:TwinSpec"}},
)
TWIN_B = PluginDist(
    "probekit-twin-b",
    "2.0.0",
    {"twin_b": pooler_module("twin", "TwinSpec")},
    {POOLERS: {"twin": "twin_b:TwinSpec"}},
)
BAD_SHAPE = PluginDist(
    "probekit-badshape",
    "0.4.0",
    {
        "wide_plugin": pooler_module("wide", "WideSpec", "wide"),
        "flat_plugin": pooler_module("flat", "FlatSpec", "flat"),
    },
    {POOLERS: {"wide": "wide_plugin:WideSpec", "flat": "flat_plugin:FlatSpec"}},
)
NOT_SPEC = PluginDist(
    "probekit-notspec",
    "0.5.0",
    {
        "notspec_plugin": '''
            from typing import Literal

            from torch import nn

            from probekit.poolers import MaskedMeanSpec
            from probekit.spec import HeadSpec


            def make_pooler(ctx):
                """A function, not a spec class."""
                return MaskedMeanSpec().build(ctx)


            class HeadPoolSpec(HeadSpec):
                """A head spec announced as a pooler."""

                kind: Literal["head_pool"] = "head_pool"

                def build(self, ctx, in_dim):
                    return nn.Linear(in_dim, self.num_classes)


            SPEC_INSTANCE = MaskedMeanSpec()


            class ShadowSpec(MaskedMeanSpec):
                """Claims the built-in kind masked_mean."""
        '''
    },
    {
        POOLERS: {
            "func_pool": "notspec_plugin:make_pooler",
            "head_pool": "notspec_plugin:HeadPoolSpec",
            "spec_instance": "notspec_plugin:SPEC_INSTANCE",
            "ghost": "notspec_plugin:DoesNotExist",
            "masked_mean": "notspec_plugin:ShadowSpec",
        }
    },
)
DISTS = {
    "good": GOOD,
    "good_broken": GOOD_BROKEN,
    "broken": BROKEN,
    "twin_a": TWIN_A,
    "twin_b": TWIN_B,
    "bad_shape": BAD_SHAPE,
    "not_spec": NOT_SPEC,
}


@pytest.fixture(scope="session")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every plugin variant of `DISTS`, pip-installed into its own folder: key -> folder."""
    return install_all(tmp_path_factory.mktemp("plugins"), DISTS)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> ToyData:
    """32 train / 16 val / 16 test toy rows: enough for a one-epoch run in a second."""
    return write_toy_data(tmp_path_factory.mktemp("plugin-data"), train=32, val=16, test=16)


@pytest.fixture(scope="module")
def builtin_kinds() -> dict[str, set[str]]:
    """The built-in kinds per family, as this process (which loads no plugin) registers them."""
    return {
        family: {e.kind for e in entries if e.builtin} for family, entries in probekit.components().items()
    }


# -- helpers --------------------------------------------------------------------------------------
def train_args(model: Path, data: ToyData, *extra: str | Path) -> list[str | Path]:
    return [
        "train",
        "--model",
        model,
        "--data",
        data.folder,
        "--set",
        "train.cpu=true",
        "--set",
        "model.max_length=16",
        *extra,
    ]


def write_config(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def assert_ok(result: Result) -> None:
    assert result.code == 0, result
    assert "Traceback" not in result.err, result


def assert_error(result: Result, *fragments: str) -> None:
    """Exit 2, nothing on stdout, no traceback; every fragment in the ``probekit: error:`` lines."""
    assert result.code == 2, result
    assert result.out == "", result
    assert "Traceback" not in result.err, result
    errors = "\n".join(result.errors())
    assert errors, result
    for fragment in fragments:
        assert fragment in errors, f"{fragment!r} not in the error lines of\n{result}"


def listing(text: str) -> dict[str, dict[str, str]]:
    """Parse ``components list``: family -> {kind: source (or ``UNAVAILABLE: ...``)}."""
    families: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in text.splitlines():
        if re.fullmatch(r"\w+:", line):
            current = families.setdefault(line[:-1], {})
        elif line.startswith("  "):
            kind, _, source = line.strip().partition(" ")
            current[kind] = source.strip()
    return families


def assert_builtins_listed(families: dict[str, dict[str, str]], builtin_kinds: dict[str, set[str]]) -> None:
    assert set(families) == set(builtin_kinds)
    for family, kinds in builtin_kinds.items():
        for kind in kinds:
            assert families[family].get(kind) == "probekit (built-in)", (family, kind, families[family])


def json_kinds(payload: dict[str, object], family: str) -> dict[str, dict[str, object]]:
    return {e["kind"]: e for e in payload["families"][family]}  # type: ignore[index]


# -- 1. a plugin whose import fails --------------------------------------------------------------
BROKEN_WARNING = (
    "probekit: warning: plugin probekit.poolers:broken = broken_plugin:BrokenSpec "
    "(from probekit-broken 0.3.1) failed to import: ImportError: needs libfoo"
)


def test_a_plugin_that_fails_to_import_is_reported_once_and_the_builtins_keep_working(
    sites: dict[str, Path],
    bert_dir: Path,
    small_data: ToyData,
    builtin_kinds: dict[str, set[str]],
    tmp_path: Path,
) -> None:
    env = plugin_env([sites["broken"]])
    broken = write_config(tmp_path / "broken.yaml", "pooler:\n  kind: broken\n")
    builtin = write_config(tmp_path / "builtin.yaml", "pooler:\n  kind: max\nhead:\n  kind: linear\n")
    listed, as_json, validate_broken, dry_broken, validate_builtin = run_many(
        Call(["components", "list"], env, tmp_path),
        Call(["components", "list", "--json"], env, tmp_path),
        Call(["config", "validate", broken], env, tmp_path),
        Call(train_args(bert_dir, small_data, "--dry-run", "--set", "pooler.kind=broken"), env, tmp_path),
        Call(["config", "validate", builtin], env, tmp_path),
    )

    assert_ok(listed)
    assert listed.err.splitlines() == [BROKEN_WARNING]  # exactly once, nothing else
    families = listing(listed.out)
    assert_builtins_listed(families, builtin_kinds)
    assert families["poolers"]["broken"] == (
        "UNAVAILABLE: failed to import: ImportError: needs libfoo "
        "[entry point probekit.poolers:broken from probekit-broken 0.3.1]"
    )

    assert_ok(as_json)
    assert as_json.err.splitlines() == [BROKEN_WARNING]
    payload = json.loads(as_json.out)
    assert "broken" not in json_kinds(payload, "poolers")
    assert set(payload["unavailable"]) == {"poolers"}
    reason = payload["unavailable"]["poolers"]["broken"]
    assert "needs libfoo" in reason and "probekit.poolers:broken" in reason and BROKEN.label in reason
    assert payload["plugins_disabled"] is False
    for family, kinds in builtin_kinds.items():
        entries = json_kinds(payload, family)
        assert all(entries[k]["builtin"] and entries[k]["distribution"] is None for k in kinds)

    assert_error(
        validate_broken,
        f"{broken}:2: pooler.kind: pooler kind 'broken' is unavailable: failed to import: "
        "ImportError: needs libfoo",
        BROKEN.label,
    )
    assert_error(dry_broken, "pooler kind 'broken' is unavailable", "needs libfoo", BROKEN.label)
    assert_ok(validate_builtin)  # a built-in kind, in the same environment
    assert validate_builtin.out == f"{builtin}: ok\n"
    for result in (validate_broken, dry_broken, validate_builtin):
        assert result.warnings() == [BROKEN_WARNING], result


# -- 2. two distributions claim one kind ----------------------------------------------------------
def test_two_distributions_claiming_one_kind_make_it_unusable_naming_both(
    sites: dict[str, Path], bert_dir: Path, small_data: ToyData, tmp_path: Path
) -> None:
    marks = tmp_path / "marks.txt"
    both = [sites["twin_a"], sites["twin_b"]]
    env = plugin_env(both, **{MARKER_ENV: str(marks)})
    env_reversed = plugin_env(both[::-1], **{MARKER_ENV: str(marks)})
    listed, listed_reversed, dry = run_many(
        Call(["components", "list", "--json"], env, tmp_path),
        Call(["components", "list", "--json"], env_reversed, tmp_path),
        Call(train_args(bert_dir, small_data, "--dry-run", "--set", "pooler.kind=twin"), env, tmp_path),
    )

    for result in (listed, listed_reversed):  # whichever distribution comes first on sys.path
        assert_ok(result)
        payload = json.loads(result.out)
        assert "twin" not in json_kinds(payload, "poolers")  # never a silent first-wins
        reason = payload["unavailable"]["poolers"]["twin"]
        assert "claimed twice" in reason and TWIN_A.label in reason and TWIN_B.label in reason
        [warning] = result.warnings()
        assert "probekit.poolers:twin" in warning and "claimed twice" in warning
        assert TWIN_A.label in warning and TWIN_B.label in warning

    assert_error(dry, "pooler kind 'twin' is unavailable", "claimed twice", TWIN_A.label, TWIN_B.label)
    assert len(dry.warnings()) == 1
    # Both modules were imported (to read their kinds); neither pooler was ever built. (The
    # "built" mark of the same template is seen in `plugin_run`.)
    assert set(read_markers(marks)) == {"imported twin_a", "imported twin_b"}


# -- 3. environment switches ----------------------------------------------------------------------
def test_autoload_switches_hide_an_installed_plugin(sites: dict[str, Path], tmp_path: Path) -> None:
    site = [sites["good"]]
    marks, control_marks = tmp_path / "marks.txt", tmp_path / "control-marks.txt"
    config = write_config(tmp_path / "scaled.yaml", "pooler:\n  kind: scaled_mean\n")
    disabled = plugin_env(site, PROBEKIT_DISABLE_PLUGIN_AUTOLOAD="1", **{MARKER_ENV: str(marks)})
    by_dist = plugin_env(site, PROBEKIT_BLOCK_PLUGINS=GOOD.name, **{MARKER_ENV: str(marks)})
    control = plugin_env(site, **{MARKER_ENV: str(control_marks)})
    results = run_many(
        Call(["components", "list"], disabled, tmp_path),
        Call(["config", "validate", config], disabled, tmp_path),
        Call(["components", "list", "--json"], by_dist, tmp_path),
        Call(["config", "validate", config], by_dist, tmp_path),
        Call(["config", "validate", config], control, tmp_path),
    )
    listed, validate, blocked_json, validate_blocked, ok = results

    assert_ok(listed)
    assert "scaled_mean" not in listing(listed.out)["poolers"]
    assert listed.out.splitlines()[-1] == "(plugin autoload disabled by PROBEKIT_DISABLE_PLUGIN_AUTOLOAD)"

    assert_ok(blocked_json)
    payload = json.loads(blocked_json.out)
    assert payload["plugins_disabled"] is False
    assert "scaled_mean" not in json_kinds(payload, "poolers") and payload["unavailable"] == {}

    for result in (validate, validate_blocked):
        assert_error(result, f"{config}:2: pooler.kind: unknown pooler kind 'scaled_mean'")
    for result in results[:4]:
        assert result.warnings() == [], result
    assert read_markers(marks) == []  # disabled or blocked: the plugin module is never imported

    assert_ok(ok)  # control: the same plugin, not switched off
    assert ok.out == f"{config}: ok\n"
    assert "imported scaled_plugin" in read_markers(control_marks)


# -- 4. a pooler that breaks its shape promise ----------------------------------------------------
SHAPE_SCRIPT = """
import json, sys
import probekit
from tests.backbones import make_backbone, make_batch

probekit.discover()
ids, mask = make_batch(batch=3, tokens=7)
found = {}
for name, pooler in json.loads(sys.argv[1]).items():
    config = probekit.load_config({"pooler": pooler, "head": {"kind": "linear"}})
    probe = probekit.Probe.from_config(config, make_backbone("bert"))  # building is fine
    try:
        logits = probe(ids, mask)  # the first use is checked
    except Exception as exc:
        found[name] = {"error": f"{type(exc).__module__}.{type(exc).__qualname__}", "message": str(exc)}
    else:
        found[name] = {"shape": list(logits.shape)}
print(json.dumps(found))
"""
SHAPE_POOLERS = {
    "wide": {"kind": "wide"},
    "flat": {"kind": "flat"},
    "scaled_mean": {"kind": "scaled_mean"},
    "multilayer/wide": {"kind": "multilayer", "layers": [-2, -1], "token_pooler": {"kind": "wide"}},
}


@pytest.fixture(scope="module")
def shape_faults(
    sites: dict[str, Path], bert_dir: Path, small_data: ToyData, tmp_path_factory: pytest.TempPathFactory
) -> SimpleNamespace:
    """`SHAPE_SCRIPT` over `SHAPE_POOLERS`, and a ``probekit train`` with the pooler ``wide``."""
    env = plugin_env([sites["bad_shape"], sites["good"], REPO])
    home, cwd = tmp_path_factory.mktemp("wide-home"), tmp_path_factory.mktemp("shape-script")
    args = train_args(bert_dir, small_data, "--set", "pooler.kind=wide", "--set", "train.epochs=1")
    script, train = run_many(
        Call(["-c", SHAPE_SCRIPT, json.dumps(SHAPE_POOLERS)], env, cwd, python=True),
        Call([*args, "--out", home / "run"], env, home),
    )
    assert script.code == 0, script
    return SimpleNamespace(found=json.loads(script.out), train=train, home=home)


def assert_shape_error(found: dict[str, str], kind: str, got: str) -> None:
    assert found["error"] == "probekit.errors.PluginError", found
    message = found["message"]
    assert f"pooler {kind!r}" in message and BAD_SHAPE.label in message, message
    assert f"returned shape {got}, but promised (3, 32)" in message, message


def test_a_pooler_with_the_wrong_output_shape_fails_on_first_use_naming_plugin_and_shapes(
    shape_faults: SimpleNamespace,
) -> None:
    found = shape_faults.found
    assert found["scaled_mean"] == {"shape": [3, 2]}  # a well-behaved plugin on the same backbone
    assert_shape_error(found["wide"], "wide", "(3, 33)")
    assert_shape_error(found["flat"], "flat", "(3,)")

    train = shape_faults.train
    assert train.code == 2, train
    assert "Traceback" not in train.err and train.out == "", train
    [error] = train.errors()
    assert train.err.splitlines()[-1] == error
    assert re.search(
        rf"pooler 'wide' from {re.escape(BAD_SHAPE.label)} .*returned shape \(\d+, 33\), "
        r"but promised \(\d+, 32\)",
        error,
    ), error
    assert names(shape_faults.home) == []  # no run folder, no hidden partial folder


def test_a_plugin_token_pooler_inside_multilayer_is_named_when_its_shape_is_wrong(
    shape_faults: SimpleNamespace,
) -> None:
    """The preset's layout (``multilayer`` around a token pooler) with a broken plugin inside.

    The error must blame the plugin, not the built-in ``multilayer``.
    """
    assert_shape_error(shape_faults.found["multilayer/wide"], "wide", "(3, 33)")


# -- 5. a checkpoint made with a plugin -----------------------------------------------------------
PREDICT_TEXT = "the cat drinks poison"


@pytest.fixture(scope="module")
def plugin_run(
    sites: dict[str, Path], bert_dir: Path, small_data: ToyData, tmp_path_factory: pytest.TempPathFactory
) -> SimpleNamespace:
    """One ``probekit train`` (1 epoch, linear head) with the plugin pooler ``scaled_mean``."""
    home = tmp_path_factory.mktemp("plugin-run")
    marks = tmp_path_factory.mktemp("plugin-run-marks") / "marks.txt"
    args = train_args(
        bert_dir,
        small_data,
        "--set",
        "pooler.kind=scaled_mean",
        "--set",
        "pooler.scale=3.0",
        "--set",
        "head.kind=linear",
        "--set",
        "train.epochs=1",
        "--out",
        home / "run",
    )
    result = run(Call(args, plugin_env([sites["good"]], **{MARKER_ENV: str(marks)}), home))
    assert_ok(result)
    return SimpleNamespace(result=result, run=home / "run", marks=marks)


@pytest.fixture(scope="module")
def predictions(
    plugin_run: SimpleNamespace, sites: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Result]:
    """``probekit predict RUN TEXT`` with the plugin present, missing, broken, blocked, disabled."""
    cwd = tmp_path_factory.mktemp("predict")
    argv = ["predict", plugin_run.run, PREDICT_TEXT]
    envs = {
        "present": plugin_env([sites["good"]]),
        "missing": plugin_env([]),
        "broken": plugin_env([sites["good_broken"]]),
        "blocked": plugin_env([sites["good"]], PROBEKIT_BLOCK_PLUGINS=GOOD.name),
        "disabled": plugin_env([sites["good"]], PROBEKIT_DISABLE_PLUGIN_AUTOLOAD="1"),
    }
    results = run_many(*(Call(argv, env, cwd) for env in envs.values()))
    return dict(zip(envs, results, strict=True))


def test_the_checkpoint_records_the_plugin_distribution(plugin_run: SimpleNamespace) -> None:
    assert "built scaled_mean" in read_markers(plugin_run.marks)
    meta = json.loads((plugin_run.run / "checkpoint" / "probe.json").read_text(encoding="utf-8"))
    components = {c["family"]: c for c in meta["components"]}
    pooler = components["pooler"]
    assert (pooler["kind"], pooler["distribution"]) == ("scaled_mean", GOOD.name)
    assert GOOD.label in pooler["source"] and "scaled_plugin:ScaledMeanSpec" in pooler["source"]
    assert meta["config"]["pooler"] == {"kind": "scaled_mean", "layer": -1, "scale": 3.0}
    assert set(components) == {"task", "pooler", "head", "freezer", "scheduler"}
    for family in ("head", "freezer", "scheduler"):
        assert components[family]["distribution"] is None
        assert components[family]["source"] == "probekit (built-in)"


def test_predict_needs_the_plugin_and_names_the_package_to_install(
    plugin_run: SimpleNamespace, predictions: dict[str, Result]
) -> None:
    present = predictions["present"]
    assert_ok(present)
    [row] = [json.loads(line) for line in present.out.splitlines()]
    assert row["text"] == PREDICT_TEXT and 0.0 <= row["probability"] <= 1.0 and row["label"] in (0, 1)

    missing = predictions["missing"]
    assert_error(
        missing,
        f"{plugin_run.run / 'checkpoint' / 'probe.json'}: this run uses the pooler kind 'scaled_mean' "
        f"from the package {GOOD.name}, which is not installed: pip install {GOOD.name}",
    )
    assert missing.err.splitlines() == missing.errors()  # nothing but the error

    broken = predictions["broken"]
    assert_error(
        broken,
        f"pooler kind 'scaled_mean' from the package {GOOD.name}, which failed to load",
        "ImportError: needs libbar",
    )
    assert len(broken.warnings()) == 1 and "needs libbar" in broken.warnings()[0]


@pytest.mark.parametrize(
    ("case", "switch"),
    [("blocked", "PROBEKIT_BLOCK_PLUGINS"), ("disabled", "PROBEKIT_DISABLE_PLUGIN_AUTOLOAD")],
)
def test_predict_with_the_plugin_switched_off_names_the_switch_not_an_install(
    predictions: dict[str, Result], case: str, switch: str
) -> None:
    """The package is installed; telling the user to ``pip install`` it sends them the wrong way."""
    result = predictions[case]
    assert_error(result, "pooler kind 'scaled_mean'", GOOD.name, switch)
    assert "not installed" not in result.err, result


# -- 6. entry points that are not pooler specs ----------------------------------------------------
def test_entry_points_that_are_not_pooler_specs_are_reported_and_break_nothing(
    sites: dict[str, Path], builtin_kinds: dict[str, set[str]], tmp_path: Path
) -> None:
    env = plugin_env([sites["not_spec"], sites["good"]])
    bad = write_config(tmp_path / "bad.yaml", "pooler:\n  kind: func_pool\nhead:\n  kind: head_pool\n")
    fine = write_config(tmp_path / "fine.yaml", "pooler:\n  kind: scaled_mean\nhead:\n  kind: mlp\n")
    listed, validate_bad, validate_fine = run_many(
        Call(["components", "list"], env, tmp_path),
        Call(["config", "validate", bad], env, tmp_path),
        Call(["config", "validate", fine], env, tmp_path),
    )

    assert_ok(listed)
    not_a_pooler = "is not a pooler component: expected a subclass of PoolerSpec"
    expected = {
        "func_pool": ("notspec_plugin:make_pooler", not_a_pooler),
        "head_pool": ("notspec_plugin:HeadPoolSpec", not_a_pooler),
        "spec_instance": ("notspec_plugin:SPEC_INSTANCE", not_a_pooler),
        "ghost": ("notspec_plugin:DoesNotExist", "failed to import: AttributeError"),
        "masked_mean": (
            "notspec_plugin:ShadowSpec",
            "conflicts: pooler kind 'masked_mean' is claimed twice: by probekit (built-in) and by "
            + NOT_SPEC.label,
        ),
    }
    warnings = listed.warnings()
    assert len(warnings) == len(expected), listed
    for name, (target, reason) in expected.items():
        prefix = f"probekit: warning: plugin probekit.poolers:{name} = {target} (from {NOT_SPEC.label}) "
        [line] = [w for w in warnings if w.startswith(prefix)]
        assert reason in line, line
    families = listing(listed.out)
    assert_builtins_listed(families, builtin_kinds)  # masked_mean included: the shadow did not take it
    assert GOOD.label in families["poolers"]["scaled_mean"]  # the other plugin is unaffected
    assert "head_pool" not in families["heads"]  # announced as a pooler: never a head
    for name in ("func_pool", "head_pool", "spec_instance", "ghost"):
        assert families["poolers"][name].startswith("UNAVAILABLE: "), families["poolers"]

    assert_error(
        validate_bad,
        f"{bad}:2: pooler.kind: pooler kind 'func_pool' is unavailable: is not a pooler component",
        f"[entry point probekit.poolers:func_pool from {NOT_SPEC.label}]",
        f"{bad}:4: head.kind: unknown head kind 'head_pool'",
    )
    assert_ok(validate_fine)
    assert validate_fine.out == f"{fine}: ok\n"
    for result in (validate_bad, validate_fine):
        assert len(result.warnings()) == len(expected), result
