"""The ``attention`` pooler: the probekit pooler contract, exact values, learning, discovery."""

from __future__ import annotations

import importlib.metadata
import itertools
from typing import Literal

import pytest
import torch
from probekit_attention_pool import AttentionPool, AttentionPoolSpec
from pydantic import ValidationError

import probekit
from probekit.errors import ConfigError
from probekit.poolers import MaskedMean
from probekit.registry import POOLERS
from probekit.spec import BuildContext
from probekit.testing import (
    PoolerCase,
    check_all_masked,
    check_left_right_padding,
    check_masked_gradient,
    check_output_shape,
    check_padding_invariance,
    check_permutation_invariance,
    check_pooler,
    random_case,
)

DIST = "probekit-attention-pool"
FILLS: tuple[Literal["random", "inf", "-inf", "nan"], ...] = ("random", "inf", "-inf", "nan")


def build(hidden_size: int, **fields: object) -> AttentionPool:
    pooler = AttentionPoolSpec.model_validate(fields).build(
        BuildContext(hidden_size=hidden_size, num_layers=2)
    )
    return pooler.double()


def padded(case: PoolerCase, fill: float = float("nan")) -> torch.Tensor:
    """The case's hidden states with ``fill`` in every padding position."""
    return torch.where(case.mask().bool().unsqueeze(-1), case.hidden[0], fill)


# -- the contract ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec",
    [AttentionPoolSpec(), AttentionPoolSpec(temperature=0.25), AttentionPoolSpec(temperature=4.0)],
    ids=["default", "sharp", "flat"],
)
def test_keeps_the_pooler_contract(spec: AttentionPoolSpec) -> None:
    check_pooler(spec, all_masked="zeros")


@pytest.mark.parametrize(
    "spec", [AttentionPoolSpec(heads=2), AttentionPoolSpec(heads=3, temperature=0.5)], ids=["2", "3"]
)
def test_keeps_the_pooler_contract_with_several_heads(spec: AttentionPoolSpec) -> None:
    """check_pooler's checks on its kind of random cases, with widths that ``heads`` divides.

    check_pooler itself draws hidden widths 1-12, most of which 2 or 3 heads cannot split.
    """
    gen = torch.Generator().manual_seed(0)

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (), generator=gen))

    fills = itertools.cycle(FILLS)
    for seed in range(20):
        batch, tokens = draw(1, 4), draw(1, 9)
        lengths = [draw(1, tokens) for _ in range(batch)]
        case = random_case(seed, batch, tokens, spec.heads * draw(1, 4), 1, lengths)
        check_output_shape(spec, case)
        check_padding_invariance(spec, case, draw(0, 4), next(fills))
        check_left_right_padding(spec, case)
        check_permutation_invariance(spec, case)
        check_masked_gradient(spec, case)
        check_all_masked(spec, case, "zeros")


# -- exact values ----------------------------------------------------------------------------
@pytest.mark.parametrize("heads", [1, 2, 4])
def test_a_zero_query_gives_the_masked_mean(heads: int) -> None:
    pooler = build(8, heads=heads, temperature=0.5)
    with torch.no_grad():
        pooler.query.zero_()
    case = random_case(1, 4, 7, 8, 1, [7, 3, 1, 5])
    expected = MaskedMean()(case.hidden[0], case.mask())
    torch.testing.assert_close(pooler(padded(case), case.mask()), expected, rtol=0, atol=1e-12)


def test_attention_weights_over_valid_tokens_sum_to_one() -> None:
    pooler = build(6, heads=3)
    case = random_case(2, 4, 5, 6, 1, [5, 2, 0, 1])
    weights = pooler.attention(padded(case), case.mask())
    assert weights.shape == (4, 5, 3)
    assert torch.isfinite(weights).all()
    assert (weights[~case.mask().bool()] == 0).all()  # padding gets no weight at all
    totals = weights.sum(dim=1)
    torch.testing.assert_close(totals[[0, 1, 3]], torch.ones(3, 3, dtype=torch.float64))
    assert (totals[2] == 0).all()  # a row without valid tokens attends to nothing
    assert (weights[3, 0] == 1).all()  # one valid token takes all the weight


def test_output_is_the_attention_weighted_sum_per_head() -> None:
    pooler = build(6, heads=2, temperature=0.7)
    case = random_case(3, 3, 4, 6, 1, [4, 2, 3])
    hidden = case.hidden[0]
    scores = torch.einsum("bthd,hd->bth", hidden.reshape(3, 4, 2, 3), pooler.query)
    scores = (scores / (3**0.5 * 0.7)).masked_fill(~case.mask().bool().unsqueeze(-1), -torch.inf)
    expected = torch.einsum("bth,bthd->bhd", scores.softmax(dim=1), hidden.reshape(3, 4, 2, 3))
    torch.testing.assert_close(pooler(padded(case), case.mask()), expected.flatten(1))


def test_heads_are_independent_poolers_over_slices_of_the_width() -> None:
    two = build(8, heads=2)
    case = random_case(4, 3, 6, 8, 1, [6, 1, 4])
    parts = []
    for k, part in enumerate(case.hidden[0].chunk(2, dim=-1)):
        one = build(4)
        with torch.no_grad():
            one.query.copy_(two.query[k : k + 1])
        parts.append(one(part, case.mask()))
    torch.testing.assert_close(two(padded(case), case.mask()), torch.cat(parts, dim=-1))


def test_temperature_divides_the_scores() -> None:
    hot = build(4, temperature=0.25)
    cold = build(4)
    with torch.no_grad():
        cold.query.copy_(hot.query / 0.25)
    case = random_case(5, 2, 5, 4, 1, [5, 3])
    torch.testing.assert_close(hot(*case.hidden, case.mask()), cold(*case.hidden, case.mask()))


# -- learning --------------------------------------------------------------------------------
def test_the_query_learns() -> None:
    pooler = build(8, heads=2)
    case = random_case(6, 3, 5, 8, 1, [5, 4, 2])
    out = pooler(padded(case), case.mask())
    (
        out * torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(0))
    ).sum().backward()
    grad = pooler.query.grad
    assert grad is not None and torch.isfinite(grad).all()
    assert (grad.abs().sum(dim=-1) > 0).all()  # every head's query gets a gradient
    before = pooler.attention(padded(case), case.mask())
    torch.optim.SGD(pooler.parameters(), lr=1.0).step()
    assert not torch.allclose(pooler.attention(padded(case), case.mask()), before)


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
def test_no_nan_anywhere_in_the_graph_even_for_rows_without_tokens() -> None:
    """Not only hidden from the output: no step of forward or backward produces a nan."""
    pooler = build(6, heads=2)
    case = random_case(7, 3, 4, 6, 1, [4, 0, 2])
    hidden = padded(case, float("inf")).requires_grad_(True)
    with torch.autograd.detect_anomaly(check_nan=True):
        pooler(hidden, case.mask()).sum().backward()
    assert hidden.grad is not None and (hidden.grad[1] == 0).all()


def test_initial_queries_are_small_and_follow_torchs_seed() -> None:
    torch.manual_seed(7)
    first = build(16, heads=4).query.detach().clone()
    torch.manual_seed(7)
    second = build(16, heads=4).query.detach()
    assert first.shape == (4, 4)
    assert torch.equal(first, second)
    assert 0 < first.abs().max() < 0.2


# -- the spec --------------------------------------------------------------------------------
def test_heads_must_divide_the_hidden_size() -> None:
    with pytest.raises(ConfigError, match=r"pooler\.heads=5 .*does not divide the hidden size 384") as info:
        AttentionPoolSpec(heads=5).build(BuildContext(hidden_size=384, num_layers=6))
    assert "1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64" in str(info.value)
    assert AttentionPoolSpec(heads=6).build(BuildContext(hidden_size=384, num_layers=6)).head_dim == 64


@pytest.mark.parametrize(
    "fields",
    [{"heads": 0}, {"temperature": 0.0}, {"temperature": -1.0}, {"temperature": "inf"}, {"query": 1}],
)
def test_invalid_fields_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        AttentionPoolSpec.model_validate(fields)


def test_spec_is_plain_data() -> None:
    spec = AttentionPoolSpec(heads=2, temperature=0.5)
    assert spec.model_dump() == {"kind": "attention", "layer": -1, "heads": 2, "temperature": 0.5}
    assert spec.is_permutation_invariant()
    assert AttentionPoolSpec.model_validate_json(spec.model_dump_json()) == spec


def test_validates_in_configs_alone_and_inside_multilayer() -> None:
    with probekit.isolated_registries():
        if "attention" not in POOLERS:
            POOLERS.register(AttentionPoolSpec)
        config = probekit.load_config({"pooler": {"kind": "attention", "heads": 2}})
        assert config.pooler == AttentionPoolSpec(heads=2)
        nested = probekit.load_config(
            {"pooler": {"kind": "multilayer", "token_pooler": {"kind": "attention", "temperature": 2.0}}}
        )
        assert nested.pooler.token_pooler == AttentionPoolSpec(temperature=2.0)  # type: ignore[attr-defined]
        assert nested.pooler.is_permutation_invariant()


def test_the_kind_is_discovered_through_its_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{DIST} is not installed (pip install -e plugins/{DIST})")
    monkeypatch.delenv("PROBEKIT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("PROBEKIT_BLOCK_PLUGINS", raising=False)
    with probekit.isolated_registries():
        probekit.discover()
        entry = POOLERS.entry("attention")
        assert entry.distribution == DIST
        assert entry.obj is AttentionPoolSpec
        assert f"{DIST} 0.1.0" in entry.source
        assert probekit.load_config({"pooler": {"kind": "attention"}}).pooler == AttentionPoolSpec()
