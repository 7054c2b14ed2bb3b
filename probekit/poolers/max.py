"""``max``: the element-wise maximum over the hidden states of the real tokens."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor

from probekit.poolers.base import Pooler, as_bool_mask
from probekit.registry import POOLERS
from probekit.spec import BuildContext, TokenPoolerSpec


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


@POOLERS.register
class MaxSpec(TokenPoolerSpec):
    """Masked max over the tokens of one layer."""

    kind: Literal["max"] = "max"
    permutation_invariant: ClassVar[bool] = True

    def build(self, ctx: BuildContext) -> MaskedMax:
        return MaskedMax()
