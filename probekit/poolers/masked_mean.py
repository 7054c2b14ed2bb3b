"""``masked_mean``: the average of the hidden states of the real (unmasked) tokens."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from einops import reduce
from torch import Tensor

from probekit.poolers.base import Pooler, as_bool_mask, running_count
from probekit.registry import POOLERS
from probekit.spec import BuildContext, TokenPoolerSpec


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


@POOLERS.register
class MaskedMeanSpec(TokenPoolerSpec):
    """Masked mean over the tokens of one layer."""

    kind: Literal["masked_mean"] = "masked_mean"
    permutation_invariant: ClassVar[bool] = True

    def build(self, ctx: BuildContext) -> MaskedMean:
        return MaskedMean()
