"""Learning-rate schedules: properties of every registered scheduler kind, drawn with hypothesis.

Each test is parametrised over ``SCHEDULERS.kinds()``; an example spec per kind draws its warmup
(none, steps, a fraction or epochs) and ``min_lr_ratio`` where the spec has one.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from torch.optim.lr_scheduler import LambdaLR

import probekit
from probekit import SCHEDULERS
from probekit.errors import ConfigError
from probekit.spec import SchedulerSpec

KINDS = SCHEDULERS.kinds()
WARMUP_FIELDS = ("warmup_steps", "warmup_fraction", "warmup_epochs")
# Steps checked past the end of a run (they must stay at the floor).
PAST_END = 12

total_steps_st = st.integers(1, 500)
steps_per_epoch_st = st.integers(1, 200)
ratios = st.floats(0.0, 1.0, allow_nan=False)


def _spec_cls(kind: str) -> type[SchedulerSpec]:
    return SCHEDULERS.get(kind)


def _has_floor_ratio(kind: str) -> bool:
    return "min_lr_ratio" in _spec_cls(kind).model_fields


@st.composite
def warmups(draw: Any, unit: str | None = None) -> dict[str, Any]:
    """Warmup in at most one unit: nothing, steps, a fraction of the run, or epochs."""
    if unit is None:
        unit = draw(st.sampled_from(["none", *WARMUP_FIELDS]))
    if unit == "warmup_steps":
        return {"warmup_steps": draw(st.integers(0, 600))}
    if unit == "warmup_fraction":
        return {"warmup_fraction": draw(ratios)}
    if unit == "warmup_epochs":
        return {"warmup_epochs": draw(st.floats(0.0, 4.0, allow_nan=False))}
    return {}


@st.composite
def scheduler_specs(draw: Any, kind: str) -> SchedulerSpec:
    """An example spec of ``kind`` with drawn warmup and floor."""
    fields = draw(warmups())
    if _has_floor_ratio(kind):
        fields["min_lr_ratio"] = draw(ratios)
    return _spec_cls(kind)(**fields)


def _multipliers(spec: SchedulerSpec, total: int, spe: int) -> list[float]:
    fn = spec.lr_lambda(total, spe)
    return [fn(step) for step in range(total + PAST_END)]


def test_builtin_schedulers_are_registered() -> None:
    assert {"constant", "cosine", "linear"} <= set(KINDS)


@pytest.mark.parametrize("kind", KINDS)
@given(data=st.data(), total=total_steps_st, spe=steps_per_epoch_st)
def test_multipliers_are_bounded_by_the_base_lr(kind: str, data: Any, total: int, spe: int) -> None:
    spec = data.draw(scheduler_specs(kind))
    for step, m in enumerate(_multipliers(spec, total, spe)):
        assert 0.0 <= m <= 1.0, f"step {step}: multiplier {m} outside [0, 1] for {spec!r}"


@pytest.mark.parametrize("kind", KINDS)
@given(data=st.data(), total=total_steps_st, spe=steps_per_epoch_st)
def test_warmup_rises_linearly_to_the_base_lr(kind: str, data: Any, total: int, spe: int) -> None:
    spec = data.draw(scheduler_specs(kind))
    warmup = spec.warmup_length(total, spe)
    assert 0 <= warmup <= total
    ms = _multipliers(spec, total, spe)
    if warmup == 0:
        return
    assert ms[0] == pytest.approx(1.0 / warmup)
    assert ms[0] > 0.0
    for step in range(1, warmup):
        assert ms[step] > ms[step - 1], f"warmup not strictly increasing at step {step}: {spec!r}"
        assert ms[step] == pytest.approx((step + 1) / warmup)
    assert ms[warmup - 1] == 1.0


@pytest.mark.parametrize("kind", KINDS)
@given(data=st.data(), total=total_steps_st, spe=steps_per_epoch_st)
def test_multipliers_never_rise_after_warmup(kind: str, data: Any, total: int, spe: int) -> None:
    spec = data.draw(scheduler_specs(kind))
    warmup = spec.warmup_length(total, spe)
    ms = _multipliers(spec, total, spe)
    for step in range(warmup + 1, len(ms)):
        assert ms[step] <= ms[step - 1], f"rises at step {step} after warmup {warmup}: {spec!r}"


@pytest.mark.parametrize("kind", KINDS)
@given(data=st.data(), total=total_steps_st, spe=steps_per_epoch_st)
def test_final_step_and_beyond_sit_exactly_at_the_floor(kind: str, data: Any, total: int, spe: int) -> None:
    spec = data.draw(scheduler_specs(kind))
    floor = spec.decay(1.0)
    warmup = spec.warmup_length(total, spe)
    fn = spec.lr_lambda(total, spe)
    if warmup < total:
        assert fn(total - 1) == floor, f"final step {total - 1} is {fn(total - 1)}, floor {floor}: {spec!r}"
    else:
        # Warmup spans the whole run: its last step is the end of warmup (the base lr).
        assert fn(total - 1) == 1.0
    for step in range(total, total + PAST_END):
        assert fn(step) == floor, f"step {step} past the end left the floor: {spec!r}"


@pytest.mark.parametrize("kind", KINDS)
@given(data=st.data())
def test_floor_is_min_lr_ratio_or_base_lr(kind: str, data: Any) -> None:
    spec = data.draw(scheduler_specs(kind))
    floor = spec.decay(1.0)
    if _has_floor_ratio(kind):
        assert floor == spec.min_lr_ratio  # type: ignore[attr-defined]
    elif kind == "constant":
        assert floor == 1.0
    else:
        assert 0.0 <= floor <= 1.0


@pytest.mark.parametrize("kind", [k for k in KINDS if _has_floor_ratio(k)])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 1.0])
def test_common_floor_ratios_are_reached_exactly(kind: str, ratio: float) -> None:
    spec = _spec_cls(kind)(min_lr_ratio=ratio, warmup_steps=3)
    fn = spec.lr_lambda(20)
    assert fn(19) == ratio
    assert fn(25) == ratio


def test_constant_holds_the_base_lr_after_warmup() -> None:
    spec = SCHEDULERS.get("constant")(warmup_steps=4)
    assert [spec.lr_lambda(10)(s) for s in range(12)] == [0.25, 0.5, 0.75] + [1.0] * 9


@pytest.mark.parametrize("kind", KINDS)
@given(
    data=st.data(),
    total=total_steps_st,
    spe=steps_per_epoch_st,
    epochs=st.integers(0, 4),
)
def test_warmup_in_epochs_equals_warmup_in_steps(
    kind: str, data: Any, total: int, spe: int, epochs: int
) -> None:
    extra = {"min_lr_ratio": data.draw(ratios)} if _has_floor_ratio(kind) else {}
    cls = _spec_cls(kind)
    by_epochs = cls(warmup_epochs=float(epochs), **extra)
    by_steps = cls(warmup_steps=epochs * spe, **extra)
    assert by_epochs.warmup_length(total, spe) == by_steps.warmup_length(total, spe)
    assert _multipliers(by_epochs, total, spe) == _multipliers(by_steps, total, spe)


@pytest.mark.parametrize("kind", KINDS)
@given(data=st.data(), total=total_steps_st, spe=steps_per_epoch_st)
def test_fractional_epochs_are_whole_steps(kind: str, data: Any, total: int, spe: int) -> None:
    """``k / spe`` epochs are ``k`` steps (no float drift from the division)."""
    k = data.draw(st.integers(0, 3 * spe))
    cls = _spec_cls(kind)
    by_epochs = cls(warmup_epochs=k / spe)
    by_steps = cls(warmup_steps=k)
    assert by_epochs.warmup_length(total, spe) == min(k, total)
    assert _multipliers(by_epochs, total, spe) == _multipliers(by_steps, total, spe)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("units", [*itertools.combinations(WARMUP_FIELDS, 2), WARMUP_FIELDS])
@given(data=st.data())
def test_two_warmup_units_are_a_validation_error(kind: str, units: tuple[str, ...], data: Any) -> None:
    fields: dict[str, Any] = {}
    for unit in units:
        fields.update(data.draw(warmups(unit)))
    with pytest.raises(ValidationError, match="one unit only"):
        _spec_cls(kind)(**fields)
    with pytest.raises(ConfigError) as info:
        probekit.load_config({"scheduler": {"kind": kind, **fields}})
    message = str(info.value)
    assert "scheduler" in message
    assert "give warmup in one unit only" in message
    for unit in units:
        assert unit in message


@pytest.mark.parametrize("kind", KINDS)
def test_zero_total_steps_is_rejected(kind: str) -> None:
    with pytest.raises(ValueError, match="total_steps"):
        _spec_cls(kind)().lr_lambda(0)


@pytest.mark.parametrize("kind", KINDS)
@given(
    data=st.data(),
    total=st.integers(1, 120),
    spe=st.integers(1, 50),
    lrs=st.tuples(st.floats(1e-6, 1.0), st.floats(1e-6, 1.0)).filter(lambda t: t[0] != t[1]),
)
def test_build_gives_a_lambda_lr_following_the_multipliers(
    kind: str, data: Any, total: int, spe: int, lrs: tuple[float, float]
) -> None:
    spec = data.draw(scheduler_specs(kind))
    head = torch.nn.Parameter(torch.zeros(2))
    body = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([{"params": [head], "lr": lrs[0]}, {"params": [body], "lr": lrs[1]}])
    scheduler = spec.build(optimizer, total, spe)
    assert isinstance(scheduler, LambdaLR)
    fn = spec.lr_lambda(total, spe)

    def check(step: int) -> None:
        for group, base in zip(optimizer.param_groups, lrs, strict=True):
            expected = base * fn(step)
            assert math.isclose(group["lr"], expected, rel_tol=1e-12, abs_tol=0.0), (
                f"step {step}: lr {group['lr']} != {base} * {fn(step)} for {spec!r}"
            )

    check(0)
    for step in range(1, total + 3):
        optimizer.step()
        scheduler.step()
        check(step)
    # The base learning rates are untouched.
    assert [g["initial_lr"] for g in optimizer.param_groups] == list(lrs)
