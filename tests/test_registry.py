"""Registries: registration, lookup, duplicates, explicit entry-point discovery, isolation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import pytest

import probekit
from probekit.errors import ConfigError, DuplicateKindError, PluginUnavailableError, UnknownKindError
from probekit.poolers import MaskedMean
from probekit.registry import POOLERS, discover
from probekit.spec import BuildContext, TokenPoolerSpec
from probekit.testing import check_pooler
from tests.fake_dists import forget_modules, make_dist, toy_pooler_module

BUILTIN_KINDS = {
    "poolers": {"masked_mean", "cls", "last_token", "max", "multilayer"},
    "heads": {"linear", "mlp"},
    "freezers": {"none", "all", "bottom", "regex"},
    "schedulers": {"cosine", "linear", "constant"},
    "tasks": {"binary"},
    "presets": {"safety8k"},
}


def test_every_family_lists_its_builtins_with_their_source() -> None:
    listing = probekit.components()
    assert set(listing) == set(BUILTIN_KINDS)
    for family, kinds in BUILTIN_KINDS.items():
        entries = {e.kind: e for e in listing[family]}
        assert kinds <= set(entries), family
        for kind in kinds:
            assert entries[kind].source == "probekit (built-in)"
            assert entries[kind].builtin


def test_lookup_of_an_unknown_kind_suggests_the_closest() -> None:
    with pytest.raises(UnknownKindError) as info:
        POOLERS.get("masked_maen")
    message = str(info.value)
    assert "did you mean 'masked_mean'?" in message
    assert "cls, ema, last_token, masked_mean, max, multilayer, rolling_max" in message


def _spec(kind: str, doc: str = "") -> type[TokenPoolerSpec]:
    namespace: dict[str, Any] = {
        "__annotations__": {"kind": Literal[kind]},  # type: ignore[valid-type]
        "kind": kind,
        "__doc__": doc,
        "__module__": "user_code",
        "build": lambda self, ctx: MaskedMean(),
    }
    return type(f"Spec_{kind}", (TokenPoolerSpec,), namespace)


def test_duplicate_kind_names_both_sources(isolated_registry: Any) -> None:
    POOLERS.register(_spec("twin"), source="first place")
    with pytest.raises(DuplicateKindError) as info:
        POOLERS.register(_spec("twin"), source="second place")
    assert "first place" in str(info.value) and "second place" in str(info.value)
    with pytest.raises(DuplicateKindError, match=r"probekit \(built-in\)"):
        POOLERS.register(_spec("masked_mean"))


def test_register_refuses_what_is_not_a_spec_of_the_family(isolated_registry: Any) -> None:
    with pytest.raises(TypeError):
        POOLERS.register(probekit.heads.LinearHeadSpec)  # type: ignore[arg-type]

    class NoLiteral(TokenPoolerSpec):
        kind: str = "free"

    with pytest.raises(TypeError, match="Literal"):
        POOLERS.register(NoLiteral)


def test_isolated_registry_forgets_what_the_block_registered() -> None:
    before = {name: reg.kinds() for name, reg in probekit.REGISTRIES.items()}
    with probekit.isolated_registries():
        POOLERS.register(_spec("temporary"))
        POOLERS.unregister("max")
        assert "temporary" in POOLERS and "max" not in POOLERS
        assert "temporary" in json.dumps(probekit.json_schema())
    assert {name: reg.kinds() for name, reg in probekit.REGISTRIES.items()} == before
    assert "temporary" not in json.dumps(probekit.json_schema())


# -- discovery -------------------------------------------------------------------------------
@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_registry: Any) -> Path:
    """A folder on sys.path that acts as site-packages for fake plugin distributions."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("PROBEKIT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("PROBEKIT_BLOCK_PLUGINS", raising=False)
    yield tmp_path
    forget_modules("good_plugin", "broken_plugin", "twin_a", "twin_b", "shadow_plugin", "misnamed_plugin")


def test_a_discovered_plugin_is_usable_like_a_builtin(site: Path) -> None:
    make_dist(
        site,
        "probekit-scaled-mean",
        {"good_plugin": toy_pooler_module("scaled_mean")},
        {"probekit.poolers": {"scaled_mean": "good_plugin:ScaledMeanSpec"}},
    )
    assert "scaled_mean" not in POOLERS  # nothing is read before discover()
    report = discover()
    # installed first-party plugins (probekit-attention-pool) may load too
    assert [e.kind for e in report.loaded if e.distribution == "probekit-scaled-mean"] == ["scaled_mean"]
    entry = POOLERS.entry("scaled_mean")
    assert entry.distribution == "probekit-scaled-mean"
    assert "probekit-scaled-mean 0.1.0" in entry.source and "good_plugin:ScaledMeanSpec" in entry.source
    config = probekit.load_config({"pooler": {"kind": "scaled_mean", "scale": 3.0}})
    assert config.pooler.model_dump() == {"kind": "scaled_mean", "layer": -1, "scale": 3.0}
    assert probekit.load_config(json.loads(probekit.dump_config(config, "json"))) == config
    assert '"scaled_mean"' in json.dumps(probekit.json_schema())
    check_pooler(config.pooler, examples=5)


def test_a_plugin_that_fails_to_import_is_reported_and_builtins_keep_working(site: Path) -> None:
    make_dist(
        site,
        "probekit-broken",
        {"broken_plugin": "raise RuntimeError('boom at import')\n"},
        {"probekit.poolers": {"broken": "broken_plugin:Spec"}},
    )
    report = discover()
    assert len(report.failed) == 1
    text = str(report.failed[0])
    assert "probekit.poolers:broken" in text and "probekit-broken 0.1.0" in text and "boom at import" in text
    assert "masked_mean" in POOLERS
    assert probekit.load_config({"pooler": {"kind": "max"}}).pooler.kind == "max"
    with pytest.raises(PluginUnavailableError, match="boom at import"):
        POOLERS.get("broken")
    with pytest.raises(ConfigError, match=r"pooler\.kind: pooler kind 'broken' is unavailable: .*boom"):
        probekit.load_config({"pooler": {"kind": "broken"}})


def test_two_distributions_claiming_one_kind_is_an_error_naming_both(site: Path) -> None:
    for dist, module in (("probekit-twin-a", "twin_a"), ("probekit-twin-b", "twin_b")):
        make_dist(
            site,
            dist,
            {module: toy_pooler_module("twin")},
            {"probekit.poolers": {"twin": f"{module}:ScaledMeanSpec"}},
        )
    report = discover()
    assert "twin" not in POOLERS  # never a silent first-wins
    with pytest.raises(PluginUnavailableError) as info:
        POOLERS.get("twin")
    assert "probekit-twin-a" in str(info.value) and "probekit-twin-b" in str(info.value)
    assert any("claimed twice" in f.reason for f in report.failed)


def test_a_plugin_cannot_take_a_builtin_kind(site: Path) -> None:
    make_dist(
        site,
        "probekit-shadow",
        {"shadow_plugin": toy_pooler_module("masked_mean")},
        {"probekit.poolers": {"masked_mean": "shadow_plugin:ScaledMeanSpec"}},
    )
    report = discover()
    assert POOLERS.entry("masked_mean").builtin
    assert any("probekit-shadow" in str(f) and "probekit (built-in)" in str(f) for f in report.failed)


def test_entry_point_name_must_match_the_kind(site: Path) -> None:
    make_dist(
        site,
        "probekit-misnamed",
        {"misnamed_plugin": toy_pooler_module("real_name")},
        {"probekit.poolers": {"other_name": "misnamed_plugin:ScaledMeanSpec"}},
    )
    report = discover()
    assert "real_name" not in POOLERS and "other_name" not in POOLERS
    assert "kind is 'real_name'" in str(report.failed[0])


def test_environment_switches_disable_or_block_plugins(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_dist(
        site,
        "probekit-scaled-mean",
        {"good_plugin": toy_pooler_module("scaled_mean")},
        {"probekit.poolers": {"scaled_mean": "good_plugin:ScaledMeanSpec"}},
    )
    monkeypatch.setenv("PROBEKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    report = discover(force=True)
    assert report.disabled and not report.loaded and "scaled_mean" not in POOLERS
    monkeypatch.delenv("PROBEKIT_DISABLE_PLUGIN_AUTOLOAD")
    monkeypatch.setenv("PROBEKIT_BLOCK_PLUGINS", "probekit-scaled-mean")
    report = discover(force=True)
    assert report.blocked and "scaled_mean" not in POOLERS
    monkeypatch.delenv("PROBEKIT_BLOCK_PLUGINS")
    assert discover(force=True).loaded and "scaled_mean" in POOLERS


def test_import_reads_no_entry_point_and_the_cli_lists_plugins(tmp_path: Path) -> None:
    """In a fresh interpreter: ``import probekit`` never imports a plugin; ``discover()`` does."""
    canary = tmp_path / "imported.txt"
    source = toy_pooler_module("canary_pool") + f"\nopen({str(canary)!r}, 'w').write('imported')\n"
    make_dist(
        tmp_path,
        "probekit-canary",
        {"canary_plugin": source},
        {"probekit.poolers": {"canary_pool": "canary_plugin:ScaledMeanSpec"}},
    )
    env_path = {"PYTHONPATH": str(tmp_path)}
    code = "import probekit; assert 'canary_pool' not in probekit.POOLERS; print('ok')"
    run = subprocess.run(
        [sys.executable, "-c", code], env=_env(env_path), capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr
    assert not canary.exists()
    listing = subprocess.run(
        [sys.executable, "-m", "probekit", "components", "list", "--json"],
        env=_env(env_path),
        capture_output=True,
        text=True,
        check=False,
    )
    assert listing.returncode == 0, listing.stderr
    poolers = {e["kind"]: e for e in json.loads(listing.stdout)["families"]["poolers"]}
    assert poolers["canary_pool"]["distribution"] == "probekit-canary"
    assert canary.exists()


def _env(extra: dict[str, str]) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("PROBEKIT_")}
    env.update(extra)
    return env


def test_build_context_is_what_specs_receive() -> None:
    ctx = BuildContext(hidden_size=8, num_layers=2)
    assert probekit.poolers.MaskedMeanSpec().build(ctx).output_dim(8) == 8
