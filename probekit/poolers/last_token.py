"""``last_token``: the hidden state of the last real token (decoders under left or right padding)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from probekit.poolers.base import Pooler, as_bool_mask, gather_token, gather_tokens
from probekit.registry import POOLERS
from probekit.spec import BuildContext, TokenPoolerSpec


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


@POOLERS.register
class LastTokenSpec(TokenPoolerSpec):
    """Last real token of one layer (the summary position of a causal decoder)."""

    kind: Literal["last_token"] = "last_token"

    def build(self, ctx: BuildContext) -> LastToken:
        return LastToken()
