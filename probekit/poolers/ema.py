"""``ema``: an exponential moving average of the hidden states over the real tokens.

``e_1 = x_1``, ``e_i = alpha * x_i + (1 - alpha) * e_(i-1)`` over the real tokens in order
(padding is skipped); the pooled vector is ``e`` at the last real token. Recent tokens weigh
most, so as a streaming probe it follows where a text is going without forgetting where it came
from (probelab's EMA aggregation, here over features; the head then scores the average).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from probekit.poolers.base import Pooler, as_bool_mask
from probekit.registry import POOLERS
from probekit.spec import BuildContext, TokenPoolerSpec


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
        return self.running(hidden, mask)[:, -1]

    def output_dim(self, hidden_size: int) -> int:
        return hidden_size


@POOLERS.register
class EmaSpec(TokenPoolerSpec):
    """Exponential moving average of one layer's hidden states over the real tokens."""

    kind: Literal["ema"] = "ema"
    alpha: float = Field(
        default=0.1, gt=0.0, le=1.0, description="Weight of each new token, in (0, 1]; 1 is the last token."
    )

    def build(self, ctx: BuildContext) -> Ema:
        return Ema(self.alpha)
