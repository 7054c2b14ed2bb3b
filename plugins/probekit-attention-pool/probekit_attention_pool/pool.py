"""The torch module of the ``attention`` pooler (its spec, in the package, imports no torch)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from probekit.poolers.base import Pooler, as_bool_mask

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
