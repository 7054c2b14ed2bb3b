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

from typing import Any

import torch
from torch import Tensor, nn


class Pooler(nn.Module):
    """Base of pooling modules: subclasses implement ``forward`` and ``output_dim``, and may
    implement ``running`` in one pass (the default pools every prefix in turn)."""

    def output_dim(self, hidden_size: int) -> int:
        """Width of the pooled vector for hidden states of width ``hidden_size``."""
        raise NotImplementedError

    def running(self, hidden: Any, mask: Tensor) -> Tensor:
        """The pooled vector of every prefix: ``(b, t, output_dim)``, position ``i`` equal to
        ``forward`` on the first ``i + 1`` positions (``hidden[:, : i + 1]``, ``mask[:, : i +
        1]``). ``hidden`` is what ``forward`` takes (a tensor, or a tuple of layers).

        On a causal backbone, where the hidden state at a token never depends on later tokens,
        this is the score the probe would give the text cut at each token, for every token in
        one forward pass (streaming per-token scores). This default calls ``forward`` once per
        position (exact for any pooler); the built-ins compute it in one pass.
        """
        layers = tuple(hidden) if isinstance(hidden, (tuple, list)) else None
        steps = []
        for end in range(1, mask.shape[1] + 1):
            part = tuple(h[:, :end] for h in layers) if layers is not None else hidden[:, :end]
            steps.append(self(part, mask[:, :end]))
        return torch.stack(steps, dim=1)


def as_bool_mask(mask: Tensor, hidden: Tensor) -> Tensor:
    """Check ``mask`` against ``hidden (b, t, h)`` and return it as a boolean ``(b, t)`` tensor."""
    if hidden.dim() != 3:
        raise ValueError(f"hidden states must be (batch, tokens, hidden), got {tuple(hidden.shape)}")
    if mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match hidden states {tuple(hidden.shape[:2])}"
        )
    return mask.to(device=hidden.device).bool()


def running_count(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """Real tokens up to and including each position: ``(b, t)``."""
    return keep.to(dtype).cumsum(dim=1)


def gather_tokens(hidden: Tensor, index: Tensor, valid: Tensor) -> Tensor:
    """``hidden[b, index[b, i]]`` for every position ``i``: ``(b, t, h)``; zeros where ``valid``
    is False."""
    rows = torch.arange(hidden.shape[0], device=hidden.device).unsqueeze(1)
    picked = hidden[rows, index.clamp(0, hidden.shape[1] - 1)]
    return torch.where(valid.unsqueeze(-1), picked, torch.zeros_like(picked))


def gather_token(hidden: Tensor, index: Tensor, valid: Tensor) -> Tensor:
    """Pick ``hidden[b, index[b]]`` per row; rows where ``valid`` is False get zeros."""
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), index.clamp(0, hidden.shape[1] - 1)]
    return torch.where(valid.unsqueeze(-1), picked, torch.zeros_like(picked))
