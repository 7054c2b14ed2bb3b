"""The pooler contract, property-tested over every registered pooler kind (plugins included).

Also shows that each contract check fails on a pooler that breaks it, so the checks can catch
what they claim to catch.
"""

from __future__ import annotations

import itertools
from typing import Any, Literal

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

import probekit
from probekit.poolers import (
    ClsSpec,
    EmaSpec,
    LastTokenSpec,
    MaskedMeanSpec,
    MaxSpec,
    MultiLayerSpec,
    RollingMaxSpec,
)
from probekit.poolers.base import Pooler
from probekit.poolers.masked_mean import MaskedMean
from probekit.registry import POOLERS
from probekit.spec import BuildContext, PoolerSpec, TokenPoolerSpec
from probekit.testing import (
    PoolerCase,
    check_all_masked,
    check_left_right_padding,
    check_masked_gradient,
    check_output_shape,
    check_padding_invariance,
    check_permutation_invariance,
    check_pooler,
    check_running,
    random_case,
)
from probekit.testing.strategies import padding_fills, pooler_cases

probekit.discover()  # installed plugin poolers are held to the same contract

TOKEN_KINDS = [k for k in POOLERS.kinds() if issubclass(POOLERS.get(k), TokenPoolerSpec)]


def example_specs(kind: str) -> list[PoolerSpec]:
    """Configurations of ``kind`` worth testing: every multilayer mode, defaults elsewhere."""
    if kind == "multilayer":
        return [
            MultiLayerSpec(layers=layers, combine=combine, combine_at=at, token_pooler=POOLERS.get(inner)())
            for (combine, at, inner), layers in zip(
                itertools.product(["mean", "concat", "scalar_mix"], ["tokens", "pooled"], TOKEN_KINDS),
                itertools.cycle([(-3, -2, -1), (0, 2), (-1,)]),
            )
        ]
    if kind == "ema":
        return [EmaSpec(), EmaSpec(alpha=0.5), EmaSpec(alpha=1.0)]
    if kind == "rolling_max":
        return [RollingMaxSpec(window=1), RollingMaxSpec(window=3)]
    return [POOLERS.get(kind)()]


SPECS = [spec for kind in POOLERS.kinds() for spec in example_specs(kind)]
IDS = [f"{s.kind}-{i}" for i, s in enumerate(SPECS)]
BUILTIN = {"masked_mean", "cls", "last_token", "max", "multilayer", "ema", "rolling_max"}


def cases(spec: PoolerSpec, min_length: int = 1) -> Any:
    layers = len(spec.layer_indices()) if spec.multi_layer else 1
    return pooler_cases(num_layers=layers, min_length=min_length)


def test_every_builtin_kind_is_covered() -> None:
    """Every registered kind has example specs (a kind without any would be skipped silently by
    the contract tests below), and every built-in kind is registered."""
    assert set(POOLERS.kinds()) >= BUILTIN
    for kind in POOLERS.kinds():
        assert example_specs(kind), f"no example spec for pooler kind {kind!r}"


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@settings(max_examples=15)
@given(data=st.data())
def test_output_shape(spec: PoolerSpec, data: st.DataObject) -> None:
    check_output_shape(spec, data.draw(cases(spec)))


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@settings(max_examples=15)
@given(data=st.data(), extra=st.integers(0, 5), fill=padding_fills)
def test_padding_of_any_value_and_amount_changes_nothing(
    spec: PoolerSpec, data: st.DataObject, extra: int, fill: Literal["random", "inf", "-inf", "nan"]
) -> None:
    check_padding_invariance(spec, data.draw(cases(spec)), extra, fill)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@settings(max_examples=15)
@given(data=st.data())
def test_left_and_right_padding_agree(spec: PoolerSpec, data: st.DataObject) -> None:
    check_left_right_padding(spec, data.draw(cases(spec)))


@pytest.mark.parametrize("spec", [s for s in SPECS if s.is_permutation_invariant()])
@settings(max_examples=15)
@given(data=st.data())
def test_mean_and_max_ignore_token_order(spec: PoolerSpec, data: st.DataObject) -> None:
    check_permutation_invariance(spec, data.draw(cases(spec)))


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@settings(max_examples=15)
@given(data=st.data())
def test_masked_positions_get_zero_gradient(spec: PoolerSpec, data: st.DataObject) -> None:
    check_masked_gradient(spec, data.draw(cases(spec)))


@pytest.mark.parametrize("spec", [s for s in SPECS if s.kind in BUILTIN], ids=lambda s: s.kind)
@settings(max_examples=10)
@given(data=st.data())
def test_all_masked_rows_pool_to_zeros(spec: PoolerSpec, data: st.DataObject) -> None:
    check_all_masked(spec, data.draw(cases(spec)), expect="zeros")


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@settings(max_examples=10)
@given(data=st.data())
def test_running_pools_every_prefix(spec: PoolerSpec, data: st.DataObject) -> None:
    """What streaming per-token scores rest on, for every registered kind."""
    check_running(spec, data.draw(cases(spec)))


def test_permutation_invariance_is_declared_where_it_holds() -> None:
    assert MaskedMeanSpec().is_permutation_invariant() and MaxSpec().is_permutation_invariant()
    assert not ClsSpec().is_permutation_invariant() and not LastTokenSpec().is_permutation_invariant()
    assert MultiLayerSpec(token_pooler=MaxSpec()).is_permutation_invariant()
    assert not MultiLayerSpec(token_pooler=ClsSpec()).is_permutation_invariant()


# -- exact values on hand-made inputs -------------------------------------------------------
HIDDEN = torch.tensor(
    [
        [[1.0, 2.0], [3.0, -4.0], [99.0, 99.0]],
        [[-1.0, 5.0], [8.0, 8.0], [2.0, 0.0]],
    ]
)
MASK = torch.tensor([[1, 1, 0], [0, 1, 1]])  # row 0 right-padded, row 1 left-padded


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (MaskedMeanSpec(), [[2.0, -1.0], [5.0, 4.0]]),
        (MaxSpec(), [[3.0, 2.0], [8.0, 8.0]]),
        (ClsSpec(), [[1.0, 2.0], [8.0, 8.0]]),
        (LastTokenSpec(), [[3.0, -4.0], [2.0, 0.0]]),
        # e = x1, then 0.5 x + 0.5 e: row 0 (1, 2) -> (3, -4): (2, -1); row 1 (8, 8) -> (2, 0): (5, 4)
        (EmaSpec(alpha=0.5), [[2.0, -1.0], [5.0, 4.0]]),
        (EmaSpec(alpha=1.0), [[3.0, -4.0], [2.0, 0.0]]),  # alpha 1: the last token
        (RollingMaxSpec(window=1), [[3.0, 2.0], [8.0, 8.0]]),  # window 1: max
        # windows of 2: row 0 means (1, 2), (2, -1) -> max (2, 2); row 1 (8, 8), (5, 4) -> (8, 8)
        (RollingMaxSpec(window=2), [[2.0, 2.0], [8.0, 8.0]]),
    ],
    ids=lambda v: getattr(v, "kind", ""),
)
def test_token_poolers_compute_the_documented_value(spec: PoolerSpec, expected: list[list[float]]) -> None:
    pooler = spec.build(BuildContext(hidden_size=2, num_layers=1))
    assert torch.equal(pooler(HIDDEN, MASK), torch.tensor(expected))


def test_multilayer_modes_compute_the_documented_values() -> None:
    ctx = BuildContext(hidden_size=2, num_layers=2)
    layers = (HIDDEN, 3 * HIDDEN)
    mean = MaskedMeanSpec().build(ctx)(HIDDEN, MASK)
    tokens_mean = MultiLayerSpec(layers=(0, 1)).build(ctx)
    assert torch.allclose(tokens_mean(layers, MASK), 2 * mean)
    concat = MultiLayerSpec(layers=(0, 1), combine="concat", combine_at="pooled").build(ctx)
    assert concat.output_dim(2) == 4
    assert torch.allclose(concat(layers, MASK), torch.cat([mean, 3 * mean], dim=-1))
    mix = MultiLayerSpec(layers=(0, 1), combine="scalar_mix").build(ctx)
    with torch.no_grad():
        mix.mix_logits.copy_(torch.tensor([0.0, float(torch.log(torch.tensor(3.0)))]))  # weights 1/4, 3/4
        mix.mix_scale.fill_(2.0)
    assert torch.allclose(mix(layers, MASK), 2.0 * (0.25 * mean + 0.75 * 3 * mean))
    assert sum(p.numel() for p in mix.parameters()) == 3


def test_scalar_mix_weights_learn() -> None:
    ctx = BuildContext(hidden_size=2, num_layers=2)
    mix = MultiLayerSpec(layers=(0, 1), combine="scalar_mix").build(ctx)
    out = mix((HIDDEN, -HIDDEN), MASK)
    out.sum().backward()
    assert mix.mix_logits.grad is not None and mix.mix_logits.grad.abs().sum() > 0


def test_multilayer_rejects_a_multilayer_token_pooler_and_a_nested_layer() -> None:
    with pytest.raises(Exception, match="single-layer pooler"):
        MultiLayerSpec(token_pooler={"kind": "multilayer"})
    with pytest.raises(Exception, match="not used inside multilayer"):
        MultiLayerSpec(token_pooler={"kind": "max", "layer": 3})
    with pytest.raises(Exception, match="distinct"):
        MultiLayerSpec(layers=(-1, -1))


# -- the checks themselves catch broken poolers ----------------------------------------------
class _Broken(Pooler):
    def __init__(self, flaw: str) -> None:
        super().__init__()
        self.flaw = flaw

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        keep = mask.bool().unsqueeze(-1)
        if self.flaw == "ignores_mask":
            return hidden.mean(dim=1)
        if self.flaw == "multiplies_mask":  # 0 * nan leaks nan, and grads are only nearly masked
            return (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)
        if self.flaw == "position_weighted":  # depends on where tokens sit
            weights = torch.arange(1, hidden.shape[1] + 1, dtype=hidden.dtype).view(1, -1, 1)
            return torch.where(keep, hidden * weights, 0.0).sum(dim=1)
        if self.flaw == "wrong_width":
            return torch.where(keep, hidden, 0.0).sum(dim=1)[:, :1]
        if self.flaw == "nan_when_empty":
            return torch.where(keep, hidden, 0.0).sum(dim=1) / keep.sum(dim=1)
        if self.flaw == "leaks_first_token_when_empty":
            valid = torch.where(keep, hidden, 0.0).sum(dim=1)
            return torch.where(keep.any(dim=1), valid, hidden[:, 0])
        if self.flaw == "running_off_by_one":  # forward is fine; running lags a position
            return torch.where(keep, hidden, 0.0).sum(dim=1)
        if self.flaw == "gradient_leak":  # the last position, padding or not, nudges the output
            return torch.where(keep, hidden, 0.0).sum(dim=1) + 1e-12 * hidden[:, -1]
        raise AssertionError(self.flaw)

    def running(self, hidden: Tensor, mask: Tensor) -> Tensor:
        steps = super().running(hidden, mask)
        if self.flaw == "running_off_by_one":
            return torch.cat([torch.zeros_like(steps[:, :1]), steps[:, :-1]], dim=1)
        return steps

    def output_dim(self, hidden_size: int) -> int:
        return hidden_size


def _broken_spec(flaw: str, invariant: bool = False) -> PoolerSpec:
    class BrokenSpec(TokenPoolerSpec):
        kind: Literal["broken"] = "broken"

        def build(self, ctx: BuildContext) -> Pooler:
            return _Broken(flaw)

        def is_permutation_invariant(self) -> bool:
            return invariant

    return BrokenSpec()


CASE: PoolerCase = random_case(seed=3, batch=3, tokens=5, hidden_size=4, num_layers=1, lengths=[2, 5, 3])


@pytest.mark.parametrize(
    ("flaw", "check", "kwargs"),
    [
        ("wrong_width", check_output_shape, {}),
        ("ignores_mask", check_padding_invariance, {"fill": "random"}),
        ("multiplies_mask", check_padding_invariance, {"fill": "nan"}),
        ("position_weighted", check_left_right_padding, {}),
        ("gradient_leak", check_masked_gradient, {}),
        ("nan_when_empty", check_all_masked, {}),
        ("leaks_first_token_when_empty", check_all_masked, {}),
        ("running_off_by_one", check_running, {}),
    ],
)
def test_each_check_fails_on_a_pooler_that_breaks_it(flaw: str, check: Any, kwargs: dict[str, Any]) -> None:
    with pytest.raises(AssertionError, match="pooler 'broken'"):
        check(_broken_spec(flaw), CASE, **kwargs)


def test_permutation_check_fails_on_an_order_dependent_pooler_claiming_invariance() -> None:
    with pytest.raises(AssertionError, match="permuted"):
        check_permutation_invariance(_broken_spec("position_weighted", invariant=True), CASE)


def test_check_pooler_runs_every_check_and_passes_builtins() -> None:
    for spec in (MaskedMeanSpec(), MultiLayerSpec(combine="scalar_mix", token_pooler=LastTokenSpec())):
        check_pooler(spec, examples=5, all_masked="zeros")
    with pytest.raises(AssertionError):
        check_pooler(_broken_spec("ignores_mask"), examples=5)


class _SoftmaxNoGuard(Pooler):
    """Attention-like pooling without an empty-row guard: a row with no valid token computes nan
    weights, and although a final `where` cleans the output, the gradient stays nan."""

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        keep = mask.bool()
        scores = torch.where(keep, hidden.sum(dim=-1), float("-inf"))
        weights = torch.softmax(scores, dim=1)  # nan where every score is -inf
        values = hidden * keep.unsqueeze(-1)
        pooled = (weights.unsqueeze(-1) * values).sum(dim=1)
        return torch.where(keep.any(dim=1, keepdim=True), pooled, 0.0)  # output is clean, grads are not

    def output_dim(self, hidden_size: int) -> int:
        return hidden_size


def test_all_masked_check_catches_nan_gradients_hidden_behind_a_where() -> None:
    class NoGuardSpec(TokenPoolerSpec):
        kind: Literal["no_guard"] = "no_guard"

        def build(self, ctx: BuildContext) -> Pooler:
            return _SoftmaxNoGuard()

    with pytest.raises(AssertionError, match="non-finite gradients"):
        check_all_masked(NoGuardSpec(), CASE)


def test_check_pooler_can_draw_widths_divisible_by_heads() -> None:
    widths = []

    class WidthSpy(TokenPoolerSpec):
        kind: Literal["width_spy"] = "width_spy"

        def build(self, ctx: BuildContext) -> Pooler:
            widths.append(ctx.hidden_size)
            return MaskedMean()

    check_pooler(WidthSpy(), examples=6, hidden_multiple=4)
    assert widths and all(w % 4 == 0 for w in widths)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 4),
    tokens=st.integers(1, 9),
    alpha=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**16),
)
def test_ema_closed_form_equals_its_running_state(rows: int, tokens: int, alpha: float, seed: int) -> None:
    """`Ema.forward` (closed form, exportable) is the last state of the token-by-token recurrence."""
    from probekit.poolers.modules import Ema

    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, tokens, 5, generator=gen, dtype=torch.float64)
    mask = (torch.rand(rows, tokens, generator=gen) < 0.7).long()
    pooler = Ema(alpha)
    torch.testing.assert_close(
        pooler(hidden, mask), pooler.running(hidden, mask)[:, -1], rtol=1e-9, atol=1e-12
    )
