"""Freezing policies: every registered kind resolves to a plan that requires_grad follows exactly."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from torch import nn

import probekit
from probekit.backbone import locate
from probekit.errors import BackboneError, ConfigError
from probekit.freezers import BottomFreezeSpec, FreezeAllSpec, FreezePlan, NoFreezeSpec, RegexFreezeSpec
from probekit.heads import LinearHeadSpec
from probekit.poolers import MaskedMeanSpec
from probekit.probe import Probe
from probekit.spec import FreezerSpec
from tests.backbones import FAMILIES, make_backbone

FREEZER_FAMILIES = ("bert", "deberta-v2", "distilbert", "gpt2", "llama", "gemma")

# What is drawn: (family, num_layers, seed) -> a fresh backbone, then a spec for it.
backbone_shapes = st.tuples(st.sampled_from(FREEZER_FAMILIES), st.integers(1, 6))


def _names(backbone: nn.Module) -> list[str]:
    return [n for n, _ in backbone.named_parameters()]


@st.composite
def _bottom_count(draw: st.DrawFn, backbone: nn.Module) -> FreezerSpec:
    n = locate(backbone).num_blocks
    return BottomFreezeSpec(count=draw(st.integers(0, n)), freeze_embeddings=draw(st.booleans()))


@st.composite
def _bottom_fraction(draw: st.DrawFn, backbone: nn.Module) -> FreezerSpec:
    fraction = draw(st.floats(0.0, 1.0, allow_nan=False))
    return BottomFreezeSpec(fraction=fraction, freeze_embeddings=draw(st.booleans()))


@st.composite
def _regex(draw: st.DrawFn, backbone: nn.Module) -> FreezerSpec:
    names = _names(backbone)
    exact = draw(st.lists(st.sampled_from(names), min_size=1, max_size=4, unique=True))
    patterns = [re.escape(n) + "$" for n in exact]
    patterns += draw(
        st.lists(st.sampled_from([r"bias$", r"\.0\.", r"weight", r"^embed", r"norm"]), max_size=2)
    )
    # every pattern must match something in this backbone
    patterns = [p for p in patterns if any(re.search(p, n) for n in names)]
    return RegexFreezeSpec(patterns=tuple(patterns))


# kind -> strategies drawing an example spec for a given backbone
EXAMPLES: dict[str, list[Callable[[nn.Module], st.SearchStrategy[FreezerSpec]]]] = {
    "none": [lambda _b: st.just(NoFreezeSpec())],
    "all": [lambda _b: st.just(FreezeAllSpec())],
    "bottom": [_bottom_count, _bottom_fraction],
    "regex": [_regex],
}


def test_every_registered_freezer_has_examples() -> None:
    """A new freezer kind must come with examples here (the property tests iterate the registry)."""
    assert set(probekit.FREEZERS.kinds()) == set(EXAMPLES)
    backbone = make_backbone("bert", 2, 16)
    for kind in probekit.FREEZERS.kinds():
        assert _fixed_example(kind, backbone).kind == kind


def _expected_frozen(spec: FreezerSpec, backbone: nn.Module) -> set[str]:
    """The frozen names each built-in kind promises, computed independently of the plan."""
    layout = locate(backbone)
    names = _names(backbone)
    blocks = layout.blocks(backbone)
    in_block = {
        f"{layout.blocks_path}.{b}.{n}": b
        for b, block in enumerate(blocks)
        for n, _ in block.named_parameters()
    }
    if isinstance(spec, NoFreezeSpec):
        return set()
    if isinstance(spec, FreezeAllSpec):
        return set(names)
    if isinstance(spec, BottomFreezeSpec):
        k = spec.num_frozen(layout.num_blocks)
        return {
            n
            for n in names
            if (n in in_block and in_block[n] < k) or (spec.freeze_embeddings and layout.is_embedding(n))
        }
    if isinstance(spec, RegexFreezeSpec):
        return {n for n in names if any(re.search(p, n) for p in spec.patterns)}
    raise AssertionError(f"no expectation for freezer kind {spec.kind!r}")


def _check_plan_is_applied(probe: Probe) -> None:
    plan = probe.plan
    backbone = probe.backbone
    names = _names(backbone)
    frozen = {n for n, p in backbone.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert frozen == plan.frozen
    assert trainable == plan.trainable
    assert plan.frozen.isdisjoint(plan.trainable)
    assert plan.frozen | plan.trainable == set(names)
    layout = probe.layout
    assert plan.num_blocks == layout.num_blocks
    assert set(plan.frozen_blocks).isdisjoint(plan.trainable_blocks)
    assert sorted((*plan.frozen_blocks, *plan.trainable_blocks)) == list(range(layout.num_blocks))
    assert list(plan.frozen_blocks) == sorted(plan.frozen_blocks)
    assert list(plan.trainable_blocks) == sorted(plan.trainable_blocks)
    blocks = layout.blocks(backbone)
    for b, block in enumerate(blocks):
        block_names = {f"{layout.blocks_path}.{b}.{n}" for n, _ in block.named_parameters()}
        assert (b in plan.frozen_blocks) == block_names.issubset(plan.frozen), b
    embeddings = [n for n in names if layout.is_embedding(n)]
    assert plan.embeddings_frozen == (bool(embeddings) and set(embeddings) <= plan.frozen)
    # the pooler and head always train
    assert all(p.requires_grad for p in probe.head.parameters())


@pytest.mark.parametrize("kind", probekit.FREEZERS.kinds())
@settings(max_examples=10)
@given(shape=backbone_shapes, data=st.data())
def test_plan_matches_requires_grad(kind: str, shape: tuple[str, int], data: st.DataObject) -> None:
    family, num_layers = shape
    backbone = make_backbone(family, num_layers, 16)
    strategy = data.draw(st.sampled_from(EXAMPLES[kind]))
    spec = data.draw(strategy(backbone))
    assert spec.kind == kind
    probe = Probe(backbone, MaskedMeanSpec(), LinearHeadSpec(), spec)
    _check_plan_is_applied(probe)
    assert probe.plan.frozen == _expected_frozen(spec, backbone)


@pytest.mark.parametrize("kind", probekit.FREEZERS.kinds())
@pytest.mark.parametrize("family", FAMILIES)
def test_every_kind_on_every_family(backbone_factory: Callable[..., Any], kind: str, family: str) -> None:
    backbone = backbone_factory(family, 3, 16, fresh=True)
    spec = _fixed_example(kind, backbone)
    probe = probekit.build({"freezer": spec.model_dump()}, backbone)
    assert probe.freezer_spec == spec
    _check_plan_is_applied(probe)
    assert probe.plan.frozen == _expected_frozen(spec, backbone)


def _fixed_example(kind: str, backbone: nn.Module) -> FreezerSpec:
    blocks = re.escape(locate(backbone).blocks_path)
    last = re.escape([n for n in _names(backbone) if n.startswith(locate(backbone).blocks_path)][-1])
    return {
        "none": NoFreezeSpec(),
        "all": FreezeAllSpec(),
        "bottom": BottomFreezeSpec(count=2),
        "regex": RegexFreezeSpec(patterns=(rf"^{blocks}\.0\.", rf"^{last}$")),
    }[kind]


def test_no_freezer_means_nothing_frozen(backbone_factory: Callable[..., Any]) -> None:
    backbone = backbone_factory("llama", 3, 16, fresh=True)
    for p in backbone.parameters():
        p.requires_grad_(False)
    probe = Probe(backbone, MaskedMeanSpec(), LinearHeadSpec())
    assert probe.plan.frozen == frozenset()
    assert probe.plan.frozen_blocks == ()
    assert probe.plan.trainable_blocks == (0, 1, 2)
    assert not probe.plan.embeddings_frozen
    assert all(p.requires_grad for p in backbone.parameters())


def test_all_freezes_every_backbone_parameter(backbone_factory: Callable[..., Any]) -> None:
    backbone = backbone_factory("gpt2", 3, 16, fresh=True)
    probe = Probe(backbone, MaskedMeanSpec(), LinearHeadSpec(), FreezeAllSpec())
    assert probe.plan.trainable == frozenset()
    assert probe.plan.frozen_blocks == (0, 1, 2)
    assert probe.plan.trainable_blocks == ()
    assert probe.plan.embeddings_frozen
    assert not any(p.requires_grad for p in backbone.parameters())
    assert all(p.requires_grad for p in probe.head.parameters())


# -- bottom ----------------------------------------------------------------------------------------
@settings(max_examples=10)
@given(family=st.sampled_from(FREEZER_FAMILIES), num_layers=st.integers(1, 6), data=st.data())
def test_bottom_count_freezes_the_lowest_blocks_and_embeddings(
    family: str, num_layers: int, data: st.DataObject
) -> None:
    backbone = make_backbone(family, num_layers, 16)
    n = data.draw(st.integers(0, num_layers), label="count")
    probe = Probe(backbone, MaskedMeanSpec(), LinearHeadSpec(), BottomFreezeSpec(count=n))
    plan = probe.plan
    layout = probe.layout
    assert plan.frozen_blocks == tuple(range(n))
    assert plan.trainable_blocks == tuple(range(n, num_layers))
    assert plan.embeddings_frozen
    for name, param in backbone.named_parameters():
        block = layout.block_of(name)
        should_freeze = layout.is_embedding(name) or (block is not None and block < n)
        assert param.requires_grad == (not should_freeze), name
    # parameters outside blocks and embeddings (final norms) keep training
    others = [n_ for n_ in _names(backbone) if layout.block_of(n_) is None and not layout.is_embedding(n_)]
    assert all(n_ in plan.trainable for n_ in others)


def test_bottom_can_leave_embeddings_trainable(backbone_factory: Callable[..., Any]) -> None:
    backbone = backbone_factory("bert", 4, 16, fresh=True)
    probe = Probe(
        backbone, MaskedMeanSpec(), LinearHeadSpec(), BottomFreezeSpec(count=2, freeze_embeddings=False)
    )
    assert not probe.plan.embeddings_frozen
    assert backbone.embeddings.word_embeddings.weight.requires_grad
    assert not backbone.encoder.layer[1].output.dense.weight.requires_grad
    assert backbone.encoder.layer[2].output.dense.weight.requires_grad


@pytest.mark.parametrize(
    ("fraction", "num_blocks", "expected"),
    [
        (0.625, 32, 20),
        (0.625, 6, 4),
        (0.625, 24, 15),
        (0.5, 5, 3),  # 2.5 rounds up
        (0.5, 3, 2),  # 1.5 rounds up
        (0.25, 6, 2),  # 1.5 rounds up
        (0.125, 4, 1),  # 0.5 rounds up
        (0.375, 4, 2),  # 1.5 rounds up
        (0.0, 12, 0),
        (1.0, 12, 12),
        (0.4, 6, 2),  # 2.4 rounds down
        (0.6, 6, 4),  # 3.6 rounds up
    ],
)
def test_bottom_fraction_rounds_half_up(fraction: float, num_blocks: int, expected: int) -> None:
    assert BottomFreezeSpec(fraction=fraction).num_frozen(num_blocks) == expected


@settings(max_examples=50)
@given(percent=st.integers(0, 100), num_blocks=st.integers(1, 128))
@example(percent=58, num_blocks=25)  # 0.58 * 25 = 14.5 -> 15
@example(percent=29, num_blocks=50)  # 14.5 -> 15
@example(percent=70, num_blocks=45)  # 31.5 -> 32
def test_bottom_fraction_rounds_half_up_for_decimal_fractions(percent: int, num_blocks: int) -> None:
    """``fraction`` written with two decimals: the share of blocks rounds half up exactly."""
    fraction = percent / 100
    expected = (2 * percent * num_blocks + 100) // 200  # floor(percent * n / 100 + 1/2), in integers
    assert BottomFreezeSpec(fraction=fraction).num_frozen(num_blocks) == expected


def test_bottom_fraction_on_a_backbone(backbone_factory: Callable[..., Any]) -> None:
    backbone = backbone_factory("distilbert", 6, 16, fresh=True)
    probe = Probe(backbone, MaskedMeanSpec(), LinearHeadSpec(), BottomFreezeSpec(fraction=0.625))
    assert probe.plan.frozen_blocks == (0, 1, 2, 3)
    assert probe.plan.trainable_blocks == (4, 5)


@settings(max_examples=10)
@given(num_layers=st.integers(1, 6), extra=st.integers(1, 10), family=st.sampled_from(FREEZER_FAMILIES))
def test_bottom_count_above_depth_raises(num_layers: int, extra: int, family: str) -> None:
    backbone = make_backbone(family, num_layers, 16)
    count = num_layers + extra
    spec = BottomFreezeSpec(count=count)
    with pytest.raises(BackboneError) as info:
        Probe(backbone, MaskedMeanSpec(), LinearHeadSpec(), spec)
    assert f"freezer.count={count}" in str(info.value)
    assert f"only {num_layers} blocks" in str(info.value)
    assert all(p.requires_grad for p in backbone.parameters())  # nothing was applied


@pytest.mark.parametrize("fields", [{"count": 2, "fraction": 0.5}, {}, {"freeze_embeddings": False}])
def test_bottom_needs_exactly_one_of_count_and_fraction(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="exactly one of count or fraction"):
        BottomFreezeSpec(**fields)
    with pytest.raises(ConfigError, match=r"freezer: .*exactly one of count or fraction"):
        probekit.load_config({"freezer": {"kind": "bottom", **fields}})


@pytest.mark.parametrize("fields", [{"count": -1}, {"fraction": 1.5}, {"fraction": -0.1}])
def test_bottom_rejects_out_of_range_values(fields: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"freezer\.(count|fraction)"):
        probekit.load_config({"freezer": {"kind": "bottom", **fields}})


# -- regex -----------------------------------------------------------------------------------------
@settings(max_examples=10)
@given(family=st.sampled_from(FREEZER_FAMILIES), data=st.data())
def test_regex_freezes_exactly_the_matched_names(family: str, data: st.DataObject) -> None:
    backbone = make_backbone(family, 3, 16)
    names = _names(backbone)
    chosen = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=6, unique=True))
    spec = RegexFreezeSpec(patterns=tuple("^" + re.escape(n) + "$" for n in chosen))
    probe = Probe(backbone, MaskedMeanSpec(), LinearHeadSpec(), spec)
    assert probe.plan.frozen == set(chosen)
    assert {n for n, p in backbone.named_parameters() if not p.requires_grad} == set(chosen)


def test_regex_uses_search_semantics(backbone_factory: Callable[..., Any]) -> None:
    backbone = backbone_factory("llama", 3, 16, fresh=True)
    probe = Probe(
        backbone, MaskedMeanSpec(), LinearHeadSpec(), RegexFreezeSpec(patterns=("layers\\.1\\.", "norm"))
    )
    names = _names(backbone)
    expected = {n for n in names if "layers.1." in n or "norm" in n}
    assert probe.plan.frozen == expected
    assert "norm.weight" in expected
    assert "layers.0.input_layernorm.weight" in expected
    assert "layers.0.self_attn.q_proj.weight" not in expected
    # block 1 is wholly frozen; blocks 0 and 2 keep trainable projections
    assert probe.plan.frozen_blocks == (1,)
    assert probe.plan.trainable_blocks == (0, 2)
    assert not probe.plan.embeddings_frozen


@pytest.mark.parametrize("index", [0, 1, 2])
def test_regex_pattern_matching_nothing_raises(backbone_factory: Callable[..., Any], index: int) -> None:
    backbone = backbone_factory("bert", 3, 16, fresh=True)
    patterns = ["bias$", "embeddings", "LayerNorm"]
    patterns[index] = "no_such_parameter_xyz"
    spec = RegexFreezeSpec(patterns=tuple(patterns))
    with pytest.raises(ConfigError) as info:
        Probe(backbone, MaskedMeanSpec(), LinearHeadSpec(), spec)
    message = str(info.value)
    assert f"freezer.patterns[{index}]" in message
    assert "no_such_parameter_xyz" in message
    assert all(p.requires_grad for p in backbone.parameters())  # nothing was applied


@pytest.mark.parametrize("bad", ["(", "[a-", "*x", "a{2,1}"])
def test_invalid_regex_fails_validation(bad: str) -> None:
    with pytest.raises(ValidationError, match=r"patterns\[1\]"):
        RegexFreezeSpec(patterns=("bias", bad))
    with pytest.raises(ConfigError) as info:
        probekit.load_config({"freezer": {"kind": "regex", "patterns": ["bias", bad]}})
    assert "freezer.patterns" in str(info.value)
    assert "not a regular expression" in str(info.value)


def test_regex_needs_a_pattern() -> None:
    with pytest.raises(ValidationError):
        RegexFreezeSpec(patterns=())


# -- FreezePlan.apply ------------------------------------------------------------------------------
@settings(max_examples=10)
@given(
    family=st.sampled_from(FREEZER_FAMILIES),
    count=st.integers(0, 3),
    data=st.data(),
)
def test_apply_overrides_hand_flipped_requires_grad(family: str, count: int, data: st.DataObject) -> None:
    backbone = make_backbone(family, 3, 16)
    plan = BottomFreezeSpec(count=count).resolve(backbone)
    params = list(backbone.named_parameters())
    flips = data.draw(st.lists(st.booleans(), min_size=len(params), max_size=len(params)))
    for (_, param), flip in zip(params, flips, strict=True):
        param.requires_grad_(flip)
    plan.apply(backbone)
    assert {n for n, p in backbone.named_parameters() if not p.requires_grad} == plan.frozen
    assert {n for n, p in backbone.named_parameters() if p.requires_grad} == plan.trainable
    plan.apply(backbone)  # idempotent
    assert {n for n, p in backbone.named_parameters() if not p.requires_grad} == plan.frozen


def test_apply_rejects_a_different_backbone() -> None:
    plan = FreezeAllSpec().resolve(make_backbone("bert", 2, 16))
    with pytest.raises(ValueError, match="different backbone"):
        plan.apply(make_backbone("bert", 3, 16))


def test_from_frozen_rejects_unknown_names() -> None:
    backbone = make_backbone("gpt2", 2, 16)
    with pytest.raises(ValueError, match="not parameters"):
        FreezePlan.from_frozen(backbone, locate(backbone), ["h.7.attn.c_attn.weight"])


def test_describe_summarises_the_plan() -> None:
    backbone = make_backbone("llama", 6, 16)
    plan = BottomFreezeSpec(fraction=0.625).resolve(backbone)
    text = plan.describe()
    assert "blocks frozen 0-3, trainable 4-5 of 6" in text
    assert "embeddings frozen" in text
    assert f"{len(plan.trainable)} trainable / {len(plan.frozen)} frozen" in text
