"""The torch modules of the built-in poolers; their specs live in ``probekit.poolers.<kind>``.

Kept apart from the specs so that validating a config (which imports every registered spec)
never imports torch: a spec imports its module when it builds it. Each module is also served by
its spec's module (``from probekit.poolers.cls import FirstToken`` keeps working).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
from einops import rearrange, reduce
from torch import Tensor, nn

from probekit.poolers.base import Pooler, as_bool_mask, gather_token, gather_tokens, running_count

if TYPE_CHECKING:
    from probekit.poolers.multilayer import Combine

__all__ = ["Ema", "FirstToken", "LastToken", "MaskedMax", "MaskedMean", "MultiLayerPooler", "RollingMax"]


class FirstToken(Pooler):
    """The first position whose mask is set, wherever padding sits; all-masked rows give zeros."""

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        keep = as_bool_mask(mask, hidden)
        positions = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
        first = torch.where(keep, positions, keep.shape[1]).amin(dim=1)
        return gather_token(hidden, first, keep.any(dim=1))

    def running(self, hidden: Tensor, mask: Tensor) -> Tensor:
        keep = as_bool_mask(mask, hidden)
        positions = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
        first = torch.where(keep, positions, keep.shape[1]).amin(dim=1, keepdim=True).expand_as(keep)
        return gather_tokens(hidden, first, first.le(positions))

    def output_dim(self, hidden_size: int) -> int:
        return hidden_size


class LastToken(Pooler):
    """The last position whose mask is set, wherever padding sits; all-masked rows give zeros."""

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        keep = as_bool_mask(mask, hidden)
        positions = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
        last = torch.where(keep, positions, -1).amax(dim=1)
        return gather_token(hidden, last, keep.any(dim=1))

    def running(self, hidden: Tensor, mask: Tensor) -> Tensor:
        keep = as_bool_mask(mask, hidden)
        positions = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
        last = torch.cummax(torch.where(keep, positions, -1), dim=1).values  # last real so far
        return gather_tokens(hidden, last, last.ge(0))

    def output_dim(self, hidden_size: int) -> int:
        return hidden_size


class MaskedMean(Pooler):
    """Mean over the tokens whose mask is set; all-masked rows give zeros."""

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        keep = as_bool_mask(mask, hidden)
        kept = torch.where(
            keep.unsqueeze(-1), hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device)
        )
        total = reduce(kept, "b t h -> b h", "sum")
        count = reduce(keep.to(hidden.dtype), "b t -> b", "sum").clamp(min=1.0)
        return total / count.unsqueeze(-1)

    def running(self, hidden: Tensor, mask: Tensor) -> Tensor:
        keep = as_bool_mask(mask, hidden)
        kept = torch.where(
            keep.unsqueeze(-1), hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device)
        )
        count = running_count(keep, hidden.dtype).clamp(min=1.0)
        return kept.cumsum(dim=1) / count.unsqueeze(-1)

    def output_dim(self, hidden_size: int) -> int:
        return hidden_size


class MaskedMax(Pooler):
    """Per-feature maximum over the tokens whose mask is set; all-masked rows give zeros."""

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        keep = as_bool_mask(mask, hidden)
        lowest = torch.full((), float("-inf"), dtype=hidden.dtype, device=hidden.device)
        values = torch.where(keep.unsqueeze(-1), hidden, lowest).amax(dim=1)
        any_real = keep.any(dim=1, keepdim=True)
        return torch.where(any_real, values, torch.zeros_like(values))

    def running(self, hidden: Tensor, mask: Tensor) -> Tensor:
        keep = as_bool_mask(mask, hidden)
        lowest = torch.full((), float("-inf"), dtype=hidden.dtype, device=hidden.device)
        values = torch.cummax(torch.where(keep.unsqueeze(-1), hidden, lowest), dim=1).values
        seen = keep.cumsum(dim=1).gt(0).unsqueeze(-1)
        return torch.where(seen, values, torch.zeros_like(values))

    def output_dim(self, hidden_size: int) -> int:
        return hidden_size


class Ema(Pooler):
    """Exponential moving average over the tokens whose mask is set; all-masked rows give zeros."""

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha

    def running(self, hidden: Tensor, mask: Tensor) -> Tensor:
        keep = as_bool_mask(mask, hidden)
        zero = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
        state = torch.zeros_like(hidden[:, 0])
        seen = torch.zeros_like(keep[:, 0])
        steps = []
        for i in range(hidden.shape[1]):
            real = keep[:, i].unsqueeze(-1)
            x = torch.where(real, hidden[:, i], zero)  # padding (even nan) never enters
            first = real & ~seen.unsqueeze(-1)
            updated = torch.where(first, x, self.alpha * x + (1 - self.alpha) * state)
            state = torch.where(real, updated, state)
            seen = seen | keep[:, i]
            steps.append(state)
        return torch.stack(steps, dim=1)

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """The last state of `running`, in closed form (no loop over tokens, so an ONNX graph
        traced from it holds for any length): with ``n`` real tokens and ``k`` the rank of a
        real token among them, the first weighs ``(1 - alpha)^(n-1)`` and the ``k``-th, ``k >=
        2``, ``alpha (1 - alpha)^(n-k)``."""
        keep = as_bool_mask(mask, hidden)
        zero = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
        rank = keep.long().cumsum(dim=1)  # k at each real token
        count = rank[:, -1:]  # n per row
        decay = torch.full((), 1.0 - self.alpha, dtype=hidden.dtype, device=hidden.device)
        power = torch.pow(decay, (count - rank).clamp(min=0).to(hidden.dtype))
        weight = torch.where(rank == 1, power, self.alpha * power)
        weight = torch.where(keep, weight, zero)
        x = torch.where(keep.unsqueeze(-1), hidden, zero)  # padding (even nan) never enters
        return (weight.unsqueeze(-1) * x).sum(dim=1)

    def output_dim(self, hidden_size: int) -> int:
        return hidden_size


class RollingMax(Pooler):
    """Max over windows of the mean of ``window`` consecutive real tokens; all-masked rows give
    zeros."""

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window

    def _window_means(self, hidden: Tensor, keep: Tensor) -> Tensor:
        """``(b, t, h)``: at each real token, the mean of the window it ends."""
        zero = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
        kept = torch.where(keep.unsqueeze(-1), hidden, zero)
        sums = kept.cumsum(dim=1)
        count = keep.long().cumsum(dim=1)  # real tokens so far
        # sums after k real tokens, for k = 0..t: the running sum at the k-th real token
        by_count = sums.new_zeros(sums.shape[0], sums.shape[1] + 1, sums.shape[2])
        index = torch.where(keep, count, 0).unsqueeze(-1).expand_as(sums)
        by_count = by_count.scatter(1, index, torch.where(keep.unsqueeze(-1), sums, zero))
        by_count[:, 0] = 0
        start = (count - self.window).clamp(min=0).unsqueeze(-1).expand_as(sums)
        before = by_count.gather(1, start)
        length = torch.minimum(count, torch.full_like(count, self.window)).clamp(min=1)
        return (sums - before) / length.unsqueeze(-1).to(hidden.dtype)

    def running(self, hidden: Tensor, mask: Tensor) -> Tensor:
        keep = as_bool_mask(mask, hidden)
        lowest = torch.full((), float("-inf"), dtype=hidden.dtype, device=hidden.device)
        means = torch.where(keep.unsqueeze(-1), self._window_means(hidden, keep), lowest)
        best = torch.cummax(means, dim=1).values
        seen = keep.cumsum(dim=1).gt(0).unsqueeze(-1)
        return torch.where(seen, best, torch.zeros_like(best))

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        keep = as_bool_mask(mask, hidden)
        lowest = torch.full((), float("-inf"), dtype=hidden.dtype, device=hidden.device)
        values = torch.where(keep.unsqueeze(-1), self._window_means(hidden, keep), lowest).amax(dim=1)
        return torch.where(keep.any(dim=1, keepdim=True), values, torch.zeros_like(values))

    def output_dim(self, hidden_size: int) -> int:
        return hidden_size


class MultiLayerPooler(Pooler):
    """Pools a tuple of ``(b, t, h)`` hidden states into one ``(b, out)`` tensor."""

    def __init__(
        self, num_layers: int, combine: Combine, combine_at: Literal["tokens", "pooled"], token_pooler: Pooler
    ) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.combine = combine
        self.combine_at = combine_at
        self.token_pooler = token_pooler
        if combine == "scalar_mix":
            self.mix_logits = nn.Parameter(torch.zeros(num_layers))
            # Shape (1,), not a 0-dim scalar: FSDP cannot shard 0-dim parameters. Checkpoints
            # written with the 0-dim shape still load (copied with broadcasting).
            self.mix_scale = nn.Parameter(torch.ones(1))

    def _mix(self, parts: Sequence[Tensor]) -> Tensor:
        stacked = torch.stack(list(parts))
        if self.combine == "concat":
            return rearrange(stacked, "k ... d -> ... (k d)")
        if self.combine == "mean":
            return stacked.mean(dim=0)
        weights = torch.softmax(self.mix_logits, dim=0).to(stacked.dtype)
        return self.mix_scale.to(stacked.dtype) * torch.einsum("k,k...->...", weights, stacked)

    def forward(self, hiddens: Sequence[Tensor], mask: Tensor) -> Tensor:
        if len(hiddens) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} layers of hidden states, got {len(hiddens)}")
        if self.combine_at == "pooled":
            return self._mix([self.token_pooler(h, mask) for h in hiddens])
        keep = as_bool_mask(mask, hiddens[0]).unsqueeze(-1)
        zero = torch.zeros((), dtype=hiddens[0].dtype, device=hiddens[0].device)
        # Padding is zeroed before mixing so that nothing it holds (even nan) reaches a weight.
        pooled: Tensor = self.token_pooler(self._mix([torch.where(keep, h, zero) for h in hiddens]), mask)
        return pooled

    def running(self, hiddens: Sequence[Tensor], mask: Tensor) -> Tensor:
        if len(hiddens) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} layers of hidden states, got {len(hiddens)}")
        if self.combine_at == "pooled":
            return self._mix([self.token_pooler.running(h, mask) for h in hiddens])
        keep = as_bool_mask(mask, hiddens[0]).unsqueeze(-1)
        zero = torch.zeros((), dtype=hiddens[0].dtype, device=hiddens[0].device)
        return self.token_pooler.running(self._mix([torch.where(keep, h, zero) for h in hiddens]), mask)

    def output_dim(self, hidden_size: int) -> int:
        k = self.num_layers if self.combine == "concat" else 1
        if self.combine_at == "tokens":
            return self.token_pooler.output_dim(hidden_size * k)
        return self.token_pooler.output_dim(hidden_size) * k
