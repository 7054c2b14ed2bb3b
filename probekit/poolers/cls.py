"""``cls``: the hidden state of the first real token (correct under left padding)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from probekit.poolers.base import Pooler, as_bool_mask, gather_token, gather_tokens
from probekit.registry import POOLERS
from probekit.spec import BuildContext, TokenPoolerSpec


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


@POOLERS.register
class ClsSpec(TokenPoolerSpec):
    """First real token of one layer (BERT's [CLS] under right or left padding)."""

    kind: Literal["cls"] = "cls"

    def build(self, ctx: BuildContext) -> FirstToken:
        return FirstToken()
