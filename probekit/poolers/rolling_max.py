"""``rolling_max``: the largest rolling-window mean of the hidden states, feature by feature.

Each real token ends a window of the last ``window`` real tokens (fewer at the start of a text);
the window's mean is taken per feature, and the pooled vector is the per-feature maximum over
all windows. A short burst of signal anywhere in a long text survives the pooling, and a single
odd token does not (the rolling-mean-then-max aggregation of the Gemini misuse probes, here over
features; with ``window: 1`` it is ``max``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from probekit.poolers.base import Pooler, as_bool_mask
from probekit.registry import POOLERS
from probekit.spec import BuildContext, TokenPoolerSpec


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


@POOLERS.register
class RollingMaxSpec(TokenPoolerSpec):
    """Max over positions of a rolling-window mean of one layer's hidden states."""

    kind: Literal["rolling_max"] = "rolling_max"
    window: int = Field(default=8, ge=1, le=4096, description="Real tokens per window.")

    def build(self, ctx: BuildContext) -> RollingMax:
        return RollingMax(self.window)
