"""Configs: round trips of every registered kind, presets, located errors, schema, runtime plugins."""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

import probekit
from probekit import POOLERS, PRESETS, ProbeConfig, config_model, dump_config, json_schema, load_config
from probekit.config import FAMILY_FIELDS
from probekit.errors import EXIT_BAD_INPUT, ConfigError, UserError
from probekit.poolers import MaskedMean
from probekit.spec import BuildContext, TokenPoolerSpec

FAMILY_KINDS = [(field, kind) for field, registry in FAMILY_FIELDS.items() for kind in registry.kinds()]
SUFFIXES = {".json": "json", ".yaml": "yaml", ".yml": "yaml"}


def token_pooler_kinds() -> list[str]:
    return [k for k in POOLERS.kinds() if issubclass(POOLERS.get(k), TokenPoolerSpec)]


# -- strategies ---------------------------------------------------------------------------------
layers_st = st.integers(-8, 12)
unit_st = st.floats(0.0, 1.0, allow_nan=False)
dropout_st = st.floats(0.0, 0.99, allow_nan=False)
positive_lr_st = st.floats(1e-8, 1.0, allow_nan=False)


def _regex_ok(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


patterns_st = st.lists(
    st.one_of(
        st.sampled_from(
            [r"embeddings\.", r"layer\.\d+\.", r"^encoder\.layer\.[0-3]\.", "bias$", "null", "yes"]
        ),
        # BMP only here: characters beyond it are covered by test_non_ascii_regex_patterns_round_trip.
        st.text(st.characters(max_codepoint=0xFFFF, exclude_categories=["Cs"]), min_size=1, max_size=12),
    ).filter(_regex_ok),
    min_size=1,
    max_size=4,
)


@st.composite
def warmup_st(draw: Any) -> dict[str, Any]:
    unit = draw(st.sampled_from(["none", "warmup_steps", "warmup_fraction", "warmup_epochs"]))
    if unit == "warmup_steps":
        return {unit: draw(st.integers(0, 10_000))}
    if unit == "warmup_fraction":
        return {unit: draw(unit_st)}
    if unit == "warmup_epochs":
        return {unit: draw(st.floats(0.0, 20.0, allow_nan=False))}
    return {}


@st.composite
def multilayer_st(draw: Any) -> dict[str, Any]:
    inner: dict[str, Any] = {"kind": draw(st.sampled_from(token_pooler_kinds()))}
    if draw(st.booleans()):
        inner["layer"] = -1
    return {
        "kind": "multilayer",
        "layers": draw(st.lists(layers_st, min_size=1, max_size=5, unique=True)),
        "combine": draw(st.sampled_from(["mean", "concat", "scalar_mix"])),
        "combine_at": draw(st.sampled_from(["tokens", "pooled"])),
        "token_pooler": inner,
    }


@st.composite
def bottom_st(draw: Any) -> dict[str, Any]:
    which = draw(st.sampled_from(["count", "fraction"]))
    value = draw(st.integers(0, 64)) if which == "count" else draw(unit_st)
    return {"kind": "bottom", which: value, "freeze_embeddings": draw(st.booleans())}


@st.composite
def scheduler_st(draw: Any, kind: str) -> dict[str, Any]:
    fields: dict[str, Any] = {"kind": kind, **draw(warmup_st())}
    if "min_lr_ratio" in FAMILY_FIELDS["scheduler"].get(kind).model_fields:
        fields["min_lr_ratio"] = draw(unit_st)
    return fields


def _token_pooler_st(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({"kind": st.just(kind), "layer": layers_st})


# Non-default field values for each built-in kind; other kinds (plugins) fall back to their defaults.
KIND_STRATEGIES: dict[tuple[str, str], Callable[[], st.SearchStrategy[dict[str, Any]]]] = {
    ("pooler", "masked_mean"): lambda: _token_pooler_st("masked_mean"),
    ("pooler", "cls"): lambda: _token_pooler_st("cls"),
    ("pooler", "last_token"): lambda: _token_pooler_st("last_token"),
    ("pooler", "max"): lambda: _token_pooler_st("max"),
    ("pooler", "ema"): lambda: st.fixed_dictionaries(
        {
            "kind": st.just("ema"),
            "layer": layers_st,
            "alpha": st.floats(1e-6, 1.0, allow_nan=False).filter(lambda a: a > 0),
        }
    ),
    ("pooler", "rolling_max"): lambda: st.fixed_dictionaries(
        {"kind": st.just("rolling_max"), "layer": layers_st, "window": st.integers(1, 4096)}
    ),
    ("pooler", "multilayer"): multilayer_st,
    ("head", "linear"): lambda: st.fixed_dictionaries(
        {"kind": st.just("linear"), "num_classes": st.integers(2, 50), "dropout": dropout_st}
    ),
    ("head", "mlp"): lambda: st.fixed_dictionaries(
        {
            "kind": st.just("mlp"),
            "num_classes": st.integers(2, 50),
            "hidden_sizes": st.lists(st.integers(1, 4096), max_size=3),
            "norm": st.sampled_from(["layernorm", "none"]),
            "activation": st.sampled_from(["gelu", "relu", "silu", "tanh"]),
            "dropout": dropout_st,
        }
    ),
    ("freezer", "all"): lambda: st.just({"kind": "all"}),
    ("freezer", "none"): lambda: st.just({"kind": "none"}),
    ("freezer", "bottom"): bottom_st,
    ("freezer", "regex"): lambda: st.fixed_dictionaries({"kind": st.just("regex"), "patterns": patterns_st}),
    ("scheduler", "constant"): lambda: scheduler_st("constant"),
    ("scheduler", "cosine"): lambda: scheduler_st("cosine"),
    ("scheduler", "linear"): lambda: scheduler_st("linear"),
    ("task", "binary"): lambda: st.just({"kind": "binary"}),  # binary has no fields
    ("task", "multilabel"): lambda: st.just({"kind": "multilabel"}),
    ("task", "regression"): lambda: st.fixed_dictionaries(
        {"kind": st.just("regression")},
        optional={
            "loss": st.sampled_from(["mse", "huber"]),
            "huber_delta": st.floats(0.01, 10),
            "standardize": st.booleans(),
            "target_mean": st.floats(-100, 100),
            "target_std": st.floats(0.01, 100),
        },
    ),
    ("task", "multiclass"): lambda: st.fixed_dictionaries(
        {"kind": st.just("multiclass")},
        optional={"negative_class": st.text(min_size=1, max_size=20), "top_k": st.integers(1, 50)},
    ),
}

optimizer_st = st.fixed_dictionaries(
    {
        "lr_head": positive_lr_st,
        "lr_body": positive_lr_st,
        "weight_decay": st.floats(0.0, 1.0),
        "betas": st.tuples(st.floats(0.0, 0.999), st.floats(0.0, 0.9999)).map(list),
        "eps": st.floats(1e-12, 1e-3),
    }
)


def kind_st(field: str, kind: str) -> st.SearchStrategy[dict[str, Any]]:
    factory = KIND_STRATEGIES.get((field, kind))
    return factory() if factory is not None else st.just({"kind": kind})


@st.composite
def config_dicts(draw: Any) -> dict[str, Any]:
    """A full config: every family a drawn kind with drawn fields, plus a drawn optimizer."""
    data: dict[str, Any] = {}
    for field, registry in FAMILY_FIELDS.items():
        if draw(st.booleans()):
            data[field] = draw(kind_st(field, draw(st.sampled_from(registry.kinds()))))
    if draw(st.booleans()):
        data["optimizer"] = draw(optimizer_st)
    return data


# -- helpers ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tmp_dir() -> Iterator[Path]:
    """A temporary folder usable inside hypothesis tests (tmp_path is function-scoped)."""
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def assert_round_trips(config: ProbeConfig, directory: Path) -> None:
    """dump -> write -> load gives an equal config in every format and suffix."""
    for suffix, fmt in SUFFIXES.items():
        text = dump_config(config, fmt)
        path = write(directory, f"config{suffix}", text)
        back = load_config(path)
        assert back == config, f"{fmt} round trip changed the config:\n{text}"
        assert back.model_dump() == config.model_dump()
        for field in FAMILY_FIELDS:
            assert type(getattr(back, field)) is type(getattr(config, field))
        assert dump_config(back, fmt) == text


def assert_subset(drawn: Any, dumped: Any, where: str = "") -> None:
    """Every value the test chose appears unchanged in the dump (JSON mode)."""
    if isinstance(drawn, dict):
        assert isinstance(dumped, dict), where
        for key, value in drawn.items():
            assert key in dumped, f"{where}.{key} missing from the dump"
            assert_subset(value, dumped[key], f"{where}.{key}")
    else:
        assert dumped == drawn, f"{where}: dumped {dumped!r}, drew {drawn!r}"


def config_error(source: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(source)
    return str(info.value)


# -- round trips --------------------------------------------------------------------------------
def test_every_builtin_kind_has_a_field_strategy() -> None:
    builtin = {(f, e.kind) for f, reg in FAMILY_FIELDS.items() for e in reg.entries() if e.builtin}
    assert builtin <= set(KIND_STRATEGIES), builtin - set(KIND_STRATEGIES)


@pytest.mark.parametrize(("field", "kind"), FAMILY_KINDS)
@given(data=st.data())
def test_every_kind_round_trips_through_json_and_yaml(
    field: str, kind: str, data: Any, tmp_dir: Path
) -> None:
    block = data.draw(kind_st(field, kind), label=field)
    optimizer = data.draw(optimizer_st, label="optimizer")
    raw = {field: block, "optimizer": optimizer}
    config = load_config(raw)
    assert getattr(config, field).kind == kind
    assert_subset(raw, config.model_dump(mode="json"))
    assert_round_trips(config, tmp_dir)


@given(raw=config_dicts())
def test_any_config_round_trips(raw: dict[str, Any], tmp_dir: Path) -> None:
    config = load_config(raw)
    assert_subset(raw, config.model_dump(mode="json"))
    assert_round_trips(config, tmp_dir)


@pytest.mark.parametrize("combine_at", ["tokens", "pooled"])
@pytest.mark.parametrize("combine", ["mean", "concat", "scalar_mix"])
@pytest.mark.parametrize("inner", token_pooler_kinds())
def test_multilayer_round_trips_with_each_token_pooler(
    inner: str, combine: str, combine_at: str, tmp_path: Path
) -> None:
    raw = {
        "pooler": {
            "kind": "multilayer",
            "layers": [0, -1, 2],
            "combine": combine,
            "combine_at": combine_at,
            "token_pooler": {"kind": inner},
        }
    }
    config = load_config(raw)
    pooler = config.pooler
    assert pooler.layers == (0, -1, 2)  # type: ignore[attr-defined]
    assert pooler.token_pooler.kind == inner  # type: ignore[attr-defined]
    assert type(pooler.token_pooler) is POOLERS.get(inner)  # type: ignore[attr-defined]
    assert_subset(raw, config.model_dump(mode="json"))
    assert_round_trips(config, tmp_path)


@pytest.mark.parametrize("pattern", ["\U0001f600", "caf\u00e9", "a\tb", "\u2028"])
def test_non_ascii_regex_patterns_round_trip(pattern: str, tmp_path: Path) -> None:
    """Characters outside the BMP included (json.dumps writes them as surrogate pairs)."""
    config = load_config({"freezer": {"kind": "regex", "patterns": [pattern]}})
    assert_round_trips(config, tmp_path)


def test_json_file_indented_with_tabs_loads(tmp_path: Path) -> None:
    """Any valid JSON document is a valid .json config, whatever its whitespace."""
    text = '{\n\t"head": {\n\t\t"kind": "mlp",\n\t\t"dropout": 0.5\n\t}\n}\n'
    assert json.loads(text)
    config = load_config(write(tmp_path, "tabs.json", text))
    assert config.head.kind == "mlp"
    assert config.head.dropout == 0.5  # type: ignore[attr-defined]


def test_safety8k_preset_values_and_round_trip(tmp_path: Path) -> None:
    config = probekit.preset("safety8k")
    assert config.pooler.kind == "multilayer"
    assert config.pooler.layers == (-3, -2, -1)  # type: ignore[attr-defined]
    assert config.pooler.token_pooler.kind == "masked_mean"  # type: ignore[attr-defined]
    assert config.head.kind == "mlp"
    assert config.head.hidden_sizes == (128,)  # type: ignore[attr-defined]
    assert config.head.dropout == 0.2  # type: ignore[attr-defined]
    assert config.freezer.kind == "bottom"
    assert config.freezer.fraction == 0.625  # type: ignore[attr-defined]
    assert config.scheduler.kind == "cosine"
    assert config.scheduler.warmup_epochs == 1.0  # type: ignore[attr-defined]
    assert config.scheduler.min_lr_ratio == 0.0  # type: ignore[attr-defined]
    assert (config.optimizer.lr_head, config.optimizer.lr_body) == (2e-4, 2e-5)
    assert_round_trips(config, tmp_path)


@pytest.mark.parametrize("name", PRESETS.kinds())
def test_every_preset_validates_and_round_trips(name: str, tmp_path: Path) -> None:
    entry = PRESETS.entry(name)
    assert entry.obj.description.strip()
    config = probekit.preset(name)
    assert isinstance(config, ProbeConfig)
    assert config == load_config(entry.obj.config)
    assert_subset(entry.obj.config, config.model_dump(mode="json"))
    assert_round_trips(config, tmp_path)


def test_unknown_preset_suggests_the_closest() -> None:
    with pytest.raises(UserError, match="did you mean 'safety8k'"):
        probekit.preset("safety8x")


def test_dump_rejects_unknown_formats() -> None:
    with pytest.raises(ValueError, match="toml"):
        dump_config(load_config({}), "toml")


# -- defaults -----------------------------------------------------------------------------------
def test_static_defaults() -> None:
    expected = {"pooler": "masked_mean", "head": "linear", "freezer": "all", "scheduler": "cosine"}
    for config in (load_config({}), load_config(None), ProbeConfig()):
        assert isinstance(config, ProbeConfig)
        assert {field: getattr(config, field).kind for field in expected} == expected
        assert config.optimizer.kind == "adamw"
    assert load_config({}) == config_model()()


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_empty_file_gives_the_defaults(text: str, tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "empty.yaml", text)) == load_config({})


def test_configs_are_frozen() -> None:
    config = load_config({})
    with pytest.raises(ValueError, match="frozen"):
        config.head = config.head  # type: ignore[misc]


# -- validation errors --------------------------------------------------------------------------
def test_config_errors_are_user_errors() -> None:
    assert issubclass(ConfigError, UserError)
    assert ConfigError.exit_code == EXIT_BAD_INPUT == 2


@pytest.mark.parametrize(
    ("text", "line", "path", "name", "suggestion"),
    [
        ("pooler:\n  kind: masked_mean\n  layerz: 3\n", 3, "pooler.layerz", "layerz", "layer"),
        ("head:\n  kind: mlp\n  hiden_sizes: [4]\n", 3, "head.hiden_sizes", "hiden_sizes", "hidden_sizes"),
        ("poolr:\n  kind: cls\n", 1, "poolr", "poolr", "pooler"),
        ("optimizer:\n  lr_head: 0.1\n  lr_bdy: 0.2\n", 3, "optimizer.lr_bdy", "lr_bdy", "lr_body"),
        (
            "scheduler:\n  kind: cosine\n  min_lr_ration: 0.1\n",
            3,
            "scheduler.min_lr_ration",
            "min_lr_ration",
            "min_lr_ratio",
        ),
        (
            "pooler:\n  kind: multilayer\n  token_pooler:\n    kind: cls\n    layerz: 1\n",
            5,
            "pooler.token_pooler.layerz",
            "layerz",
            "layer",
        ),
    ],
)
def test_unknown_field_names_file_line_path_and_suggestion(
    text: str, line: int, path: str, name: str, suggestion: str, tmp_path: Path
) -> None:
    file = write(tmp_path, "bad.yaml", text)
    message = config_error(file)
    assert message.startswith(f"{file}:{line}: {path}: "), message
    assert f"unknown field {name!r}" in message
    assert f"did you mean {suggestion!r}?" in message
    assert len(message.splitlines()) == 1


@pytest.mark.parametrize(("field", "kind"), FAMILY_KINDS)
def test_unknown_kind_names_path_allowed_kinds_and_suggestion(field: str, kind: str, tmp_path: Path) -> None:
    typo = kind + "z"
    file = write(tmp_path, "bad.yaml", f"optimizer:\n  lr_head: 0.1\n{field}:\n  kind: {typo}\n")
    message = config_error(file)
    registry = FAMILY_FIELDS[field]
    assert message.startswith(f"{file}:4: {field}.kind: "), message
    assert f"unknown {registry.family} kind {typo!r}" in message
    assert f"did you mean {kind!r}?" in message
    assert f"(allowed kinds: {', '.join(registry.kinds())})" in message


def test_unknown_head_kind_message(tmp_path: Path) -> None:
    file = write(tmp_path, "bad.yaml", "head:\n  kind: mlpp\n")
    message = config_error(file)
    assert message.startswith(
        f"{file}:2: head.kind: unknown head kind 'mlpp'; did you mean 'mlp'? (allowed kinds: linear, mlp)"
    ), message
    assert len(message.splitlines()) == 1


def test_unknown_kind_without_a_close_match_lists_the_kinds() -> None:
    message = config_error({"freezer": {"kind": "zzzzzz"}})
    assert message.startswith("config: freezer.kind: unknown freezer kind 'zzzzzz'")
    assert "did you mean" not in message
    assert "allowed kinds: all, bottom, none, regex" in message


def test_missing_kind_is_named() -> None:
    message = config_error({"head": {"dropout": 0.1}})
    assert message.startswith("config: head.kind: missing head kind"), message


BAD_VALUES = [
    pytest.param(
        "head:\n  kind: linear\n  dropout: -0.1\n",
        3,
        "head.dropout",
        "greater than or equal to 0",
        id="neg-dropout",
    ),
    pytest.param("head:\n  kind: mlp\n  dropout: 1.0\n", 3, "head.dropout", "less than 1", id="dropout-1"),
    pytest.param(
        "head:\n  kind: mlp\n  num_classes: 0\n",
        3,
        "head.num_classes",
        "greater than or equal to 1",
        id="no-output",
    ),
    pytest.param("optimizer:\n  lr_head: 0\n", 2, "optimizer.lr_head", "greater than 0", id="lr-zero"),
    pytest.param("optimizer:\n  lr_body: -1.0e-5\n", 2, "optimizer.lr_body", "greater than 0", id="lr-neg"),
    pytest.param(
        "freezer:\n  kind: bottom\n  count: 3\n  fraction: 0.5\n",
        1,
        "freezer",
        "exactly one of count or fraction",
        id="bottom-both",
    ),
    pytest.param(
        "freezer:\n  kind: bottom\n", 1, "freezer", "exactly one of count or fraction", id="bottom-none"
    ),
    pytest.param(
        "freezer:\n  kind: regex\n  patterns: ['(']\n",
        3,
        "freezer.patterns",
        "not a regular expression",
        id="regex",
    ),
    pytest.param(
        "pooler:\n  kind: multilayer\n  layers: [1, -1, 1]\n",
        3,
        "pooler.layers",
        "layers must be distinct",
        id="dup-layers",
    ),
    pytest.param(
        "pooler:\n  kind: multilayer\n  layers: []\n", 3, "pooler.layers", "at least 1 item", id="no-layers"
    ),
    pytest.param(
        "pooler:\n  kind: multilayer\n  token_pooler:\n    kind: multilayer\n",
        3,
        "pooler.token_pooler",
        "token_pooler must be a single-layer pooler; 'multilayer' reads several layers",
        id="nested-multilayer",
    ),
    pytest.param(
        "pooler:\n  kind: multilayer\n  token_pooler:\n    kind: cls\n    layer: 2\n",
        3,
        "pooler.token_pooler",
        "token_pooler.layer is not used inside multilayer",
        id="nested-layer",
    ),
    pytest.param(
        "pooler:\n  kind: multilayer\n  token_pooler:\n    kind: clz\n",
        3,
        "pooler.token_pooler",
        "unknown pooler kind 'clz'; did you mean 'cls'?",
        id="nested-unknown-kind",
    ),
    pytest.param(
        "scheduler:\n  kind: cosine\n  min_lr_ratio: 1.5\n",
        3,
        "scheduler.min_lr_ratio",
        "less than or equal to 1",
        id="floor-above-1",
    ),
    pytest.param(
        "scheduler:\n  kind: linear\n  warmup_steps: 10\n  warmup_epochs: 1\n",
        1,
        "scheduler",
        "give warmup in one unit only, got warmup_steps and warmup_epochs",
        id="two-warmups",
    ),
]


@pytest.mark.parametrize(("text", "line", "path", "fragment"), BAD_VALUES)
def test_bad_values_name_file_line_and_field_path(
    text: str, line: int, path: str, fragment: str, tmp_path: Path
) -> None:
    file = write(tmp_path, "bad.yaml", text)
    message = config_error(file)
    assert message.startswith(f"{file}:{line}: {path}: "), message
    assert fragment in message
    assert "{" not in message, f"unformatted template in {message!r}"
    assert len(message.splitlines()) == 1


@given(
    dropout=st.floats(max_value=-1e-12, allow_nan=False, allow_infinity=False),
    lr=st.floats(max_value=0.0, allow_nan=False, allow_infinity=False),
)
def test_drawn_out_of_range_values_are_each_reported(dropout: float, lr: float) -> None:
    message = config_error({"head": {"kind": "linear", "dropout": dropout}, "optimizer": {"lr_head": lr}})
    lines = message.splitlines()
    assert len(lines) == 2
    assert any(line.startswith("config: head.dropout: ") for line in lines)
    assert any(line.startswith("config: optimizer.lr_head: ") for line in lines)


def test_every_problem_gets_its_own_located_line(tmp_path: Path) -> None:
    text = (
        "{\n"
        '  "pooler": {"kind": "masked_mean", "layerz": 1},\n'
        '  "head": {"kind": "linear", "dropout": -1},\n'
        '  "scheduler": {"kind": "cosin"}\n'
        "}\n"
    )
    file = write(tmp_path, "bad.json", text)
    lines = config_error(file).splitlines()
    assert len(lines) == 3
    located = {tuple(line.split(": ")[:2]) for line in lines}
    assert located == {
        (f"{file}:2", "pooler.layerz"),
        (f"{file}:3", "head.dropout"),
        (f"{file}:4", "scheduler.kind"),
    }


@pytest.mark.parametrize(
    ("name", "text", "line"),
    [
        ("bad.yaml", "head:\n  kind: linear\n   dropout: 0.1\n", 3),
        ("bad.yaml", "head: {kind: linear\noptimizer: {lr_head: 1}\n", 2),
        ("bad.yaml", "pooler:\n  kind: cls\n  layer: [1, 2\n", 4),
        ("bad.json", '{\n  "head": {"kind": "linear"},,\n}\n', 2),
    ],
)
def test_malformed_files_name_the_line(name: str, text: str, line: int, tmp_path: Path) -> None:
    file = write(tmp_path, name, text)
    message = config_error(file)
    kind = "JSON" if name.endswith(".json") else "YAML"
    assert message.startswith(f"{file}:{line}: not valid {kind}"), message
    assert len(message.splitlines()) == 1


@pytest.mark.parametrize(("text", "type_name"), [("- 1\n- 2\n", "list"), ("hello\n", "str"), ("3\n", "int")])
def test_non_mapping_top_level_is_rejected(text: str, type_name: str, tmp_path: Path) -> None:
    file = write(tmp_path, "list.yaml", text)
    assert config_error(file) == f"{file}:1: a config must be a mapping, got {type_name}"


def test_non_mapping_json_is_rejected(tmp_path: Path) -> None:
    file = write(tmp_path, "list.json", "[1, 2]\n")
    assert "a config must be a mapping" in config_error(file)


@pytest.mark.parametrize("suffix", [".txt", ".toml", ""])
def test_other_suffixes_are_rejected(suffix: str, tmp_path: Path) -> None:
    file = write(tmp_path, f"config{suffix}", "{}\n")
    assert config_error(file) == f"{file}: config files must end in .json, .yaml or .yml"


def test_missing_file_is_named(tmp_path: Path) -> None:
    file = tmp_path / "nope.yaml"
    assert config_error(file) == f"{file}: no such file"
    assert config_error(str(file)) == f"{file}: no such file"


@pytest.mark.parametrize(
    "template",
    [
        'x: !!python/object/apply:os.system ["touch {marker}"]\n',
        'head: !!python/object/apply:os.system ["touch {marker}"]\n',
        'head:\n  kind: !!python/object/apply:os.system ["touch {marker}"]\n',
        'x: !!python/object/new:os.system ["touch {marker}"]\n',
        "x: !!python/name:os.system\n",
        '!!python/object/apply:subprocess.check_call [["touch", "{marker}"]]\n',
    ],
)
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_python_yaml_tags_are_refused_and_never_run(template: str, suffix: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    file = write(tmp_path, f"evil{suffix}", template.replace("{marker}", str(marker)))
    message = config_error(file)
    assert message.startswith(f"{file}:"), message
    # YAML names the refused tag; JSON files are read by the json module, which has no tags
    assert ("python/" in message) if suffix == ".yaml" else ("not valid JSON" in message)
    assert not marker.exists(), "a YAML tag executed code"


# -- JSON schema --------------------------------------------------------------------------------
def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def _kind_consts(schema: dict[str, Any], node: dict[str, Any]) -> set[str]:
    """The ``kind`` const values of every alternative a property accepts."""
    node = _resolve(schema, node)
    alternatives = node.get("oneOf") or node.get("anyOf") or [node]
    kinds: set[str] = set()
    for alt in alternatives:
        kind = _resolve(schema, alt).get("properties", {}).get("kind", {})
        if "const" in kind:
            kinds.add(kind["const"])
        kinds.update(kind.get("enum", []))
    return kinds


@pytest.mark.parametrize("field", list(FAMILY_FIELDS))
def test_json_schema_lists_every_registered_kind(field: str) -> None:
    schema = json_schema()
    json.dumps(schema)  # serialisable
    prop = schema["properties"][field]
    kinds = set(FAMILY_FIELDS[field].kinds())
    assert _kind_consts(schema, prop) == kinds
    if len(kinds) > 1:
        assert set(prop["discriminator"]["mapping"]) == kinds
    assert schema["additionalProperties"] is False


def test_json_schema_of_multilayer_token_pooler_lists_the_token_pooler_kinds() -> None:
    schema = json_schema()
    multilayer = _resolve(schema, {"$ref": "#/$defs/" + POOLERS.get("multilayer").__name__})
    token_pooler = multilayer["properties"]["token_pooler"]
    assert _kind_consts(schema, token_pooler) == set(token_pooler_kinds())


# -- plugins registered at runtime --------------------------------------------------------------
def _define_toy_pool() -> type[TokenPoolerSpec]:
    class ToyPoolSpec(TokenPoolerSpec):
        """A toy token pooler with one extra field."""

        kind: Literal["toy_pool"] = "toy_pool"
        temperature: float = 1.0

        def build(self, ctx: BuildContext) -> MaskedMean:
            return MaskedMean()

    return ToyPoolSpec


TOY_YAML = "pooler:\n  kind: toy_pool\n  temperature: 2.5\n  layer: 3\nhead:\n  kind: mlp\n"


def test_runtime_plugin_validates_dumps_and_round_trips(isolated_registry: Any, tmp_path: Path) -> None:
    toy = isolated_registry["poolers"].register(_define_toy_pool())
    entry = POOLERS.entry("toy_pool")
    assert entry.obj is toy
    assert not entry.builtin

    config = load_config(write(tmp_path, "toy.yaml", TOY_YAML))
    assert type(config.pooler) is toy
    assert config.pooler.temperature == 2.5  # type: ignore[attr-defined]
    assert config.pooler.layer == 3  # type: ignore[attr-defined]
    for fmt in ("json", "yaml"):
        text = dump_config(config, fmt)
        loaded = json.loads(text) if fmt == "json" else yaml.safe_load(text)
        assert loaded["pooler"] == {"kind": "toy_pool", "layer": 3, "temperature": 2.5}
    assert_round_trips(config, tmp_path)

    nested = load_config(
        {"pooler": {"kind": "multilayer", "token_pooler": {"kind": "toy_pool", "temperature": 0.5}}}
    )
    assert type(nested.pooler.token_pooler) is toy  # type: ignore[attr-defined]
    assert nested.model_dump(mode="json")["pooler"]["token_pooler"]["temperature"] == 0.5
    assert_round_trips(nested, tmp_path)

    message = config_error({"pooler": {"kind": "toy_pool", "temprature": 1.0}})
    assert "pooler.temprature" in message
    assert "did you mean 'temperature'?" in message

    schema = json_schema()
    assert "toy_pool" in _kind_consts(schema, schema["properties"]["pooler"])
    toy_schema = schema["$defs"][toy.__name__]
    assert toy_schema["properties"]["temperature"]["default"] == 1.0


def test_runtime_plugin_is_gone_after_isolation() -> None:
    model_before = config_model()
    with probekit.isolated_registries() as registries:
        registries["poolers"].register(_define_toy_pool())
        assert load_config({"pooler": {"kind": "toy_pool"}}).pooler.kind == "toy_pool"
        assert config_model() is not model_before
    assert "toy_pool" not in POOLERS
    message = config_error({"pooler": {"kind": "toy_pool"}})
    assert "pooler.kind: unknown pooler kind 'toy_pool'" in message
    assert "toy_pool" not in _kind_consts(json_schema(), json_schema()["properties"]["pooler"])
    with pytest.raises(ValidationError):
        config_model().model_validate({"pooler": {"kind": "toy_pool"}})
    with pytest.raises(ConfigError, match=re.escape("pooler.token_pooler: unknown pooler kind 'toy_pool'")):
        load_config({"pooler": {"kind": "multilayer", "token_pooler": {"kind": "toy_pool"}}})


def test_fixture_registration_does_not_leak() -> None:
    """Runs after the fixture test above (file order): its plugin must be gone."""
    assert "toy_pool" not in POOLERS
    assert "toy_pool" not in json.dumps(json_schema())
    with pytest.raises(ConfigError, match="unknown pooler kind 'toy_pool'"):
        load_config({"pooler": {"kind": "toy_pool"}})


def test_set_same_kind_keeps_the_block_and_nested_kinds_can_follow() -> None:
    base = probekit.preset("safety8k").model_dump(mode="json")
    data = probekit.apply_overrides(
        base, ["pooler.kind=multilayer", "pooler.token_pooler.kind=max", "pooler.layers=[-2,-1]"]
    )
    config = probekit.load_config(data)
    assert config.pooler.token_pooler.kind == "max"
    assert config.pooler.layers == (-2, -1)
    assert config.pooler.combine == "mean"  # unchanged fields of an unchanged kind survive
    replaced = probekit.apply_overrides(base, ["pooler.kind=max"])
    assert replaced["pooler"] == {"kind": "max"}  # a new kind starts from its own defaults


@pytest.mark.parametrize("kind", [5, None, ["masked_mean"], {"a": 1}, True])
def test_a_kind_that_is_not_a_string_is_a_config_error(kind: Any) -> None:
    """Found by tests/test_fuzz.py: a non-string kind inside multilayer's token_pooler reached
    did-you-mean (TypeError), and an unhashable one the registry lookup."""
    with pytest.raises(ConfigError, match=r"pooler\.token_pooler"):
        load_config({"pooler": {"kind": "multilayer", "token_pooler": {"kind": kind}}})
    with pytest.raises(ConfigError, match="head"):
        load_config({"head": {"kind": kind}})
