"""Contract checks for poolers, for probekit's own tests and for plugin authors.

A plugin author runs every check on their pooler in one test:

```python
from probekit.testing import check_pooler

def test_my_pooler_keeps_the_contract():
    check_pooler(MyPoolerSpec())
```

Each ``check_*`` function takes a spec and one `PoolerCase` and raises ``AssertionError``
naming the pooler and the broken promise. `check_pooler` runs them all on many random
cases; ``probekit.testing.strategies`` has hypothesis strategies that draw cases.

The contract: the output is ``(batch, output_dim(hidden))`` and finite; padding (masked
positions), of any amount and any value, ``inf`` and ``nan`` included, changes nothing; left and
right padding agree; permutation-invariant poolers ignore the order of valid tokens; masked
positions get exactly zero gradient; rows with no valid token give a finite output that does not
depend on that row's hidden states (built-ins give zeros); ``running`` pools every prefix as
``forward`` would (the default does so by construction; a pooler that overrides it for speed must
agree).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from probekit.poolers.base import Pooler
from probekit.spec import BuildContext, PoolerSpec

__all__ = [
    "PoolerCase",
    "build_pooler",
    "check_all_masked",
    "check_left_right_padding",
    "check_masked_gradient",
    "check_output_shape",
    "check_padding_invariance",
    "check_permutation_invariance",
    "check_pooler",
    "check_running",
    "random_case",
]

DTYPE = torch.float64
TOLERANCE = {"rtol": 1e-7, "atol": 1e-9}


@dataclass(frozen=True)
class PoolerCase:
    """Hidden states of ``num_layers`` layers, right-padded: row ``i`` has ``lengths[i]`` valid tokens."""

    hidden: tuple[Tensor, ...]
    lengths: tuple[int, ...]
    seed: int = 0

    @property
    def batch(self) -> int:
        return self.hidden[0].shape[0]

    @property
    def tokens(self) -> int:
        return self.hidden[0].shape[1]

    @property
    def hidden_size(self) -> int:
        return self.hidden[0].shape[2]

    def mask(self) -> Tensor:
        positions = torch.arange(self.tokens)
        return (positions.unsqueeze(0) < torch.tensor(self.lengths).unsqueeze(1)).long()


def random_case(
    seed: int, batch: int, tokens: int, hidden_size: int, num_layers: int, lengths: Sequence[int]
) -> PoolerCase:
    """A case drawn from a seeded generator; padding positions hold zeros."""
    if len(lengths) != batch or any(not 0 <= n <= tokens for n in lengths):
        raise ValueError("lengths must give 0..tokens valid tokens for each row")
    gen = torch.Generator().manual_seed(seed)
    keep = (torch.arange(tokens).unsqueeze(0) < torch.tensor(list(lengths)).unsqueeze(1)).unsqueeze(-1)
    layers = tuple(
        torch.where(keep, torch.randn(batch, tokens, hidden_size, generator=gen, dtype=DTYPE), 0.0)
        for _ in range(num_layers)
    )
    return PoolerCase(layers, tuple(lengths), seed)


def build_pooler(spec: PoolerSpec, hidden_size: int, seed: int = 0) -> Pooler:
    """Build ``spec`` in float64, eval mode, with seeded (and perturbed) parameters."""
    torch.manual_seed(seed)
    pooler = spec.build(BuildContext(hidden_size=hidden_size, num_layers=12)).to(DTYPE).eval()
    with torch.no_grad():
        for param in pooler.parameters():  # move off symmetric inits so weights matter
            param.add_(0.1 * torch.randn_like(param))
    return pooler


def _num_layers(spec: PoolerSpec) -> int:
    return len(spec.layer_indices()) if spec.multi_layer else 1


def _run(spec: PoolerSpec, pooler: Pooler, hidden: Sequence[Tensor], mask: Tensor) -> Tensor:
    if spec.multi_layer:
        return pooler(tuple(hidden), mask)  # type: ignore[no-any-return]
    return pooler(hidden[0], mask)  # type: ignore[no-any-return]


def _name(spec: PoolerSpec) -> str:
    return f"pooler {spec.kind!r} ({type(spec).__module__}.{type(spec).__qualname__})"


def _assert_close(spec: PoolerSpec, what: str, actual: Tensor, expected: Tensor) -> None:
    if actual.shape != expected.shape or not torch.allclose(actual, expected, equal_nan=False, **TOLERANCE):
        gap = (actual - expected).abs().max().item() if actual.shape == expected.shape else "shape"
        raise AssertionError(f"{_name(spec)}: {what} (largest difference {gap})")


def check_output_shape(spec: PoolerSpec, case: PoolerCase) -> None:
    """Output is ``(batch, output_dim(hidden))`` and finite."""
    pooler = build_pooler(spec, case.hidden_size, case.seed)
    out = _run(spec, pooler, case.hidden, case.mask())
    expected = (case.batch, pooler.output_dim(case.hidden_size))
    if tuple(out.shape) != expected:
        raise AssertionError(f"{_name(spec)}: output shape {tuple(out.shape)}, expected {expected}")
    if not torch.isfinite(out).all():
        raise AssertionError(f"{_name(spec)}: non-finite output for finite hidden states")


def _fill(shape: tuple[int, ...], fill: str, gen: torch.Generator) -> Tensor:
    if fill == "random":
        return 1e4 * torch.randn(*shape, generator=gen, dtype=DTYPE)
    return torch.full(shape, float(fill), dtype=DTYPE)


def check_padding_invariance(
    spec: PoolerSpec,
    case: PoolerCase,
    extra: int = 3,
    fill: Literal["random", "inf", "-inf", "nan"] = "random",
) -> None:
    """Writing anything into padding, and adding ``extra`` more padded positions, changes nothing."""
    pooler = build_pooler(spec, case.hidden_size, case.seed)
    base = _run(spec, pooler, case.hidden, case.mask())
    gen = torch.Generator().manual_seed(case.seed + 1)
    padded_mask = torch.cat([case.mask(), torch.zeros(case.batch, extra, dtype=torch.long)], dim=1)
    keep = padded_mask.bool().unsqueeze(-1)
    padded = []
    for h in case.hidden:
        grown = torch.cat([h, torch.zeros(case.batch, extra, case.hidden_size, dtype=DTYPE)], dim=1)
        padded.append(torch.where(keep, grown, _fill(tuple(grown.shape), fill, gen)))
    out = _run(spec, pooler, padded, padded_mask)
    _assert_close(spec, f"output changed when padding held {fill!r} values (+{extra} positions)", out, base)


def _left_align(case: PoolerCase, tensor: Tensor) -> Tensor:
    """Move each row's valid tokens to the end (left padding)."""
    rows = [torch.roll(tensor[i], shifts=case.tokens - n, dims=0) for i, n in enumerate(case.lengths)]
    return torch.stack(rows)


def check_left_right_padding(spec: PoolerSpec, case: PoolerCase) -> None:
    """The same rows padded on the left give the same output as padded on the right."""
    pooler = build_pooler(spec, case.hidden_size, case.seed)
    right = _run(spec, pooler, case.hidden, case.mask())
    left = _run(spec, pooler, [_left_align(case, h) for h in case.hidden], _left_align(case, case.mask()))
    _assert_close(spec, "left padding and right padding disagree", left, right)


def check_permutation_invariance(spec: PoolerSpec, case: PoolerCase) -> None:
    """For permutation-invariant poolers, shuffling valid tokens changes nothing (else: no check)."""
    if not spec.is_permutation_invariant():
        return
    pooler = build_pooler(spec, case.hidden_size, case.seed)
    base = _run(spec, pooler, case.hidden, case.mask())
    gen = torch.Generator().manual_seed(case.seed + 2)
    orders = []
    for n in case.lengths:
        order = torch.arange(case.tokens)
        order[:n] = torch.randperm(n, generator=gen)
        orders.append(order)
    index = torch.stack(orders)
    shuffled = [torch.stack([h[i, index[i]] for i in range(case.batch)]) for h in case.hidden]
    out = _run(spec, pooler, shuffled, case.mask())
    _assert_close(spec, "output changed when valid tokens were permuted", out, base)


def check_masked_gradient(spec: PoolerSpec, case: PoolerCase) -> None:
    """Masked positions get exactly zero gradient; valid positions get finite gradient."""
    pooler = build_pooler(spec, case.hidden_size, case.seed)
    gen = torch.Generator().manual_seed(case.seed + 3)
    garbage = _fill((case.batch, case.tokens, case.hidden_size), "random", gen)
    keep = case.mask().bool().unsqueeze(-1)
    hidden = [torch.where(keep, h, garbage).requires_grad_(True) for h in case.hidden]
    out = _run(spec, pooler, hidden, case.mask())
    weights = torch.randn(out.shape, generator=gen, dtype=DTYPE)
    grads = torch.autograd.grad((out * weights).sum(), hidden, allow_unused=True)
    for layer, (h, grad) in enumerate(zip(hidden, grads, strict=True)):
        grad = grad if grad is not None else torch.zeros_like(h)
        if not torch.isfinite(grad).all():
            raise AssertionError(f"{_name(spec)}: non-finite gradient (layer {layer})")
        leaked = grad.masked_select(~keep.expand_as(grad))
        worst = leaked.abs().max().item() if leaked.numel() else 0.0
        if worst != 0.0:
            raise AssertionError(f"{_name(spec)}: masked positions got gradient {worst:.3g} (layer {layer})")


def check_all_masked(
    spec: PoolerSpec, case: PoolerCase, expect: Literal["finite", "zeros"] = "finite"
) -> None:
    """Rows with no valid token give finite output independent of their hidden states, and
    finite gradients (a nan computed internally and masked later still poisons the backward pass).

    ``expect="zeros"`` also requires zeros (the documented behaviour of every built-in).
    """
    pooler = build_pooler(spec, case.hidden_size, case.seed)
    lengths = tuple(0 if i % 2 == 0 else n for i, n in enumerate(case.lengths))
    mask = PoolerCase(case.hidden, lengths).mask()
    empty = torch.tensor([n == 0 for n in lengths])
    outs = []
    for scale in (1.0, -3.0):
        hidden = [
            torch.where(empty[:, None, None], scale * h + 1.0, h).requires_grad_(True) for h in case.hidden
        ]
        outs.append(_run(spec, pooler, hidden, mask))
    inputs = [*hidden, *(p for p in pooler.parameters() if p.requires_grad)]
    grads = torch.autograd.grad(outs[1].sum(), inputs, allow_unused=True)
    if not all(g is None or torch.isfinite(g).all() for g in grads):
        raise AssertionError(f"{_name(spec)}: rows without valid tokens give non-finite gradients")
    outs = [out.detach() for out in outs]
    rows = outs[0][empty]
    if not torch.isfinite(rows).all():
        raise AssertionError(f"{_name(spec)}: all-masked rows give non-finite output")
    _assert_close(spec, "all-masked rows depend on their hidden states", outs[1][empty], rows)
    if expect == "zeros" and rows.numel() and rows.abs().max().item() != 0.0:
        raise AssertionError(f"{_name(spec)}: all-masked rows are not zeros")


def check_running(spec: PoolerSpec, case: PoolerCase) -> None:
    """``running`` gives, at every position, what ``forward`` gives on the prefix ending there
    (right and left padding): the promise streaming per-token scores rest on."""
    pooler = build_pooler(spec, case.hidden_size, case.seed)
    for left in (False, True):
        hidden = tuple(_left_align(case, h) for h in case.hidden) if left else case.hidden
        mask = _left_align(case, case.mask()) if left else case.mask()
        arg = tuple(hidden) if spec.multi_layer else hidden[0]
        with torch.no_grad():
            steps = pooler.running(arg, mask)
            width = pooler.output_dim(case.hidden_size)
            if tuple(steps.shape) != (case.batch, case.tokens, width):
                raise AssertionError(
                    f"{_name(spec)}: running gave shape {tuple(steps.shape)}, expected "
                    f"{(case.batch, case.tokens, width)}"
                )
            for end in range(1, case.tokens + 1):
                prefix = _run(spec, pooler, [h[:, :end] for h in hidden], mask[:, :end])
                side = "left" if left else "right"
                _assert_close(
                    spec,
                    f"running at position {end - 1} ({side} padding) is not the pooled prefix",
                    steps[:, end - 1],
                    prefix,
                )


CHECKS: tuple[Callable[[PoolerSpec, PoolerCase], None], ...] = (
    check_output_shape,
    check_padding_invariance,
    check_left_right_padding,
    check_permutation_invariance,
    check_masked_gradient,
    check_all_masked,
    check_running,
)


def check_pooler(
    spec: PoolerSpec,
    *,
    examples: int = 20,
    seed: int = 0,
    nonfinite_padding: bool = True,
    all_masked: Literal["finite", "zeros"] = "finite",
    hidden_multiple: int = 1,
) -> None:
    """Run every contract check on ``examples`` random cases (random shapes, lengths, fills).

    Args:
        spec: the pooler spec under test.
        examples: number of random cases.
        seed: seed of the case generator.
        nonfinite_padding: also fill padding with ``inf``, ``-inf`` and ``nan``.
        all_masked: ``"zeros"`` to require zeros for rows without valid tokens.
        hidden_multiple: hidden widths are drawn as multiples of this (e.g. the number of
            attention heads a pooler splits the width into).
    """
    gen = torch.Generator().manual_seed(seed)

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (), generator=gen))

    fills: list[Literal["random", "inf", "-inf", "nan"]] = ["random"]
    if nonfinite_padding:
        fills += ["inf", "-inf", "nan"]
    for i in range(examples):
        batch, tokens = draw(1, 4), draw(1, 9)
        lengths = [draw(1, tokens) for _ in range(batch)]
        width = hidden_multiple * draw(1, max(1, 12 // hidden_multiple))
        case = random_case(seed + i, batch, tokens, width, _num_layers(spec), lengths)
        for check in CHECKS:
            if check is check_all_masked:
                check_all_masked(spec, case, all_masked)
            elif check is check_padding_invariance:
                check_padding_invariance(spec, case, draw(0, 4), fills[i % len(fills)])
            else:
                check(spec, case)
