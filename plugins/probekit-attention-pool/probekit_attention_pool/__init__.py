"""``attention``: a learned query per head attends over the valid tokens of one layer.

The hidden states ``(b, t, h)`` are split into ``heads`` heads of width ``h / heads``. Head ``k``
scores each valid token by ``<hidden_k, query_k> / (sqrt(h / heads) * temperature)``, takes a
softmax over the valid tokens of the row, and returns the weighted sum of their hidden states;
the heads are concatenated back to width ``h``.

Padding is removed with ``torch.where`` (never by multiplying with the mask): its values are
replaced by zeros before anything reads them and its scores by ``-inf`` before the softmax, so
nothing it holds (``inf`` and ``nan`` included) reaches the output or the gradients. Rows with
no valid token pool to zeros. Without position information the pooler ignores token order.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from probekit.errors import ConfigError
from probekit.poolers.base import Pooler, as_bool_mask
from probekit.spec import BuildContext, TokenPoolerSpec

__all__ = ["AttentionPool", "AttentionPoolSpec"]
__version__ = "0.1.0"

INIT_STD = 0.02
"""Standard deviation of the initial queries: small, so a fresh pooler starts near a masked mean."""


class AttentionPool(Pooler):
    """Multi-head attention pooling with one learned query per head; all-masked rows give zeros."""

    def __init__(self, hidden_size: int, heads: int = 1, temperature: float = 1.0) -> None:
        super().__init__()
        if heads < 1 or hidden_size % heads:
            raise ValueError(f"heads ({heads}) must be >= 1 and divide the hidden size ({hidden_size})")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.hidden_size = hidden_size
        self.heads = heads
        self.head_dim = hidden_size // heads
        self.temperature = temperature
        self.query = nn.Parameter(INIT_STD * torch.randn(heads, self.head_dim))

    def _split(self, hidden: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Valid-token mask ``(b, t)`` and per-head values ``(b, t, heads, head_dim)``, padding zeroed."""
        keep = as_bool_mask(mask, hidden)
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"expected hidden states of width {self.hidden_size}, got {hidden.shape[-1]}")
        zero = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
        values = torch.where(keep.unsqueeze(-1), hidden, zero)
        return keep, values.reshape(*values.shape[:-1], self.heads, self.head_dim)

    def _weights(self, keep: Tensor, values: Tensor) -> Tensor:
        query = self.query.to(values.dtype)
        scores = torch.einsum("bthd,hd->bth", values, query) / (math.sqrt(self.head_dim) * self.temperature)
        valid = keep.unsqueeze(-1)  # (b, t, 1), broadcast over heads
        scores = torch.where(valid, scores, -torch.inf)
        # A row without valid tokens would be a softmax of -inf only (nan): give it finite
        # scores; its weights are zeroed just below.
        scores = torch.where(valid.any(dim=1, keepdim=True), scores, torch.zeros_like(scores))
        weights = torch.softmax(scores, dim=1)
        return torch.where(valid, weights, torch.zeros_like(weights))

    def attention(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """Attention weights ``(b, t, heads)``.

        Zero at masked positions; for each head they sum to 1 over a row's valid tokens (0 for a
        row without any).
        """
        return self._weights(*self._split(hidden, mask))

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        keep, values = self._split(hidden, mask)
        pooled = torch.einsum("bth,bthd->bhd", self._weights(keep, values), values)
        return pooled.flatten(1)

    def output_dim(self, hidden_size: int) -> int:
        return hidden_size


class AttentionPoolSpec(TokenPoolerSpec):
    """Learned attention pooling over the tokens of one layer (one query per head)."""

    kind: Literal["attention"] = "attention"
    heads: int = Field(default=1, ge=1, description="Attention heads; must divide the hidden size.")
    temperature: float = Field(
        default=1.0,
        gt=0.0,
        allow_inf_nan=False,
        description="Softmax temperature: above 1 flattens the weights, below 1 sharpens them.",
    )

    permutation_invariant: ClassVar[bool] = True

    def build(self, ctx: BuildContext) -> AttentionPool:
        if ctx.hidden_size % self.heads:
            divisors = [d for d in range(1, min(ctx.hidden_size, 64) + 1) if ctx.hidden_size % d == 0]
            raise ConfigError(
                f"pooler.heads={self.heads} (pooler.token_pooler.heads inside multilayer) does not "
                f"divide the hidden size {ctx.hidden_size} that the attention pooler reads; choose "
                f"among {', '.join(map(str, divisors))}"
            )
        return AttentionPool(ctx.hidden_size, self.heads, self.temperature)
