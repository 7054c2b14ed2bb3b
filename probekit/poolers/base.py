"""The pooler contract and the masking helpers the built-in poolers share.

A token pooler maps ``hidden (b, t, h)`` and ``mask (b, t)`` to ``(b, output_dim(h))``; a
multi-layer pooler takes a tuple of such ``hidden`` tensors. Masked (padding) positions never
influence the output, whatever they hold (including ``inf`` and ``nan``), and receive exactly
zero gradient.

Rows whose mask is all zeros pool to a zero vector in every built-in pooler:

| pooler | all-masked row |
| --- | --- |
| ``masked_mean`` | zeros |
| ``max`` | zeros |
| ``cls`` | zeros |
| ``last_token`` | zeros |
| ``multilayer`` | the combination of its token pooler's zeros: zeros |
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Pooler(nn.Module):
    """Base of pooling modules: subclasses implement ``forward`` and ``output_dim``."""

    def output_dim(self, hidden_size: int) -> int:
        """Width of the pooled vector for hidden states of width ``hidden_size``."""
        raise NotImplementedError


def as_bool_mask(mask: Tensor, hidden: Tensor) -> Tensor:
    """Check ``mask`` against ``hidden (b, t, h)`` and return it as a boolean ``(b, t)`` tensor."""
    if hidden.dim() != 3:
        raise ValueError(f"hidden states must be (batch, tokens, hidden), got {tuple(hidden.shape)}")
    if mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match hidden states {tuple(hidden.shape[:2])}"
        )
    return mask.to(device=hidden.device).bool()


def gather_token(hidden: Tensor, index: Tensor, valid: Tensor) -> Tensor:
    """Pick ``hidden[b, index[b]]`` per row; rows where ``valid`` is False get zeros."""
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), index.clamp(0, hidden.shape[1] - 1)]
    return torch.where(valid.unsqueeze(-1), picked, torch.zeros_like(picked))
