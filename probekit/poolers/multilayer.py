"""``multilayer``: combine the hidden states of several layers, before or after a token pooler.

``combine_at="tokens"`` mixes the layers token by token and pools the mix once;
``combine_at="pooled"`` pools every layer with the same token pooler and mixes the pooled vectors.
``combine`` is ``mean``, ``concat`` (widths add up) or ``scalar_mix`` (learned softmax weights
times a learned scale, as in ELMo).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import torch
from einops import rearrange
from pydantic import Field, SerializeAsAny, field_validator
from pydantic_core import PydanticCustomError
from torch import Tensor, nn

from probekit.errors import ProbekitError
from probekit.poolers.base import Pooler, as_bool_mask
from probekit.poolers.masked_mean import MaskedMeanSpec
from probekit.registry import POOLERS
from probekit.spec import MAX_LAYER_INDEX, BuildContext, PoolerSpec, TokenPoolerSpec

Combine = Literal["mean", "concat", "scalar_mix"]


class MultiLayerPooler(Pooler):
    """Pools a tuple of ``(b, t, h)`` hidden states into one ``(b, out)`` tensor."""

    def __init__(
        self, num_layers: int, combine: Combine, combine_at: Literal["tokens", "pooled"], token_pooler: Pooler
    ) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.combine = combine
        self.combine_at = combine_at
        self.token_pooler = token_pooler
        if combine == "scalar_mix":
            self.mix_logits = nn.Parameter(torch.zeros(num_layers))
            # Shape (1,), not a 0-dim scalar: FSDP cannot shard 0-dim parameters. Checkpoints
            # written with the 0-dim shape still load (copied with broadcasting).
            self.mix_scale = nn.Parameter(torch.ones(1))

    def _mix(self, parts: Sequence[Tensor]) -> Tensor:
        stacked = torch.stack(list(parts))
        if self.combine == "concat":
            return rearrange(stacked, "k ... d -> ... (k d)")
        if self.combine == "mean":
            return stacked.mean(dim=0)
        weights = torch.softmax(self.mix_logits, dim=0).to(stacked.dtype)
        return self.mix_scale.to(stacked.dtype) * torch.einsum("k,k...->...", weights, stacked)

    def forward(self, hiddens: Sequence[Tensor], mask: Tensor) -> Tensor:
        if len(hiddens) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} layers of hidden states, got {len(hiddens)}")
        if self.combine_at == "pooled":
            return self._mix([self.token_pooler(h, mask) for h in hiddens])
        keep = as_bool_mask(mask, hiddens[0]).unsqueeze(-1)
        zero = torch.zeros((), dtype=hiddens[0].dtype, device=hiddens[0].device)
        # Padding is zeroed before mixing so that nothing it holds (even nan) reaches a weight.
        pooled: Tensor = self.token_pooler(self._mix([torch.where(keep, h, zero) for h in hiddens]), mask)
        return pooled

    def running(self, hiddens: Sequence[Tensor], mask: Tensor) -> Tensor:
        if len(hiddens) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} layers of hidden states, got {len(hiddens)}")
        if self.combine_at == "pooled":
            return self._mix([self.token_pooler.running(h, mask) for h in hiddens])
        keep = as_bool_mask(mask, hiddens[0]).unsqueeze(-1)
        zero = torch.zeros((), dtype=hiddens[0].dtype, device=hiddens[0].device)
        return self.token_pooler.running(self._mix([torch.where(keep, h, zero) for h in hiddens]), mask)

    def output_dim(self, hidden_size: int) -> int:
        k = self.num_layers if self.combine == "concat" else 1
        if self.combine_at == "tokens":
            return self.token_pooler.output_dim(hidden_size * k)
        return self.token_pooler.output_dim(hidden_size) * k


@POOLERS.register
class MultiLayerSpec(PoolerSpec):
    """Pool several layers (default: the last three) and combine them."""

    kind: Literal["multilayer"] = "multilayer"
    layers: tuple[Annotated[int, Field(ge=-MAX_LAYER_INDEX, le=MAX_LAYER_INDEX)], ...] = Field(
        default=(-3, -2, -1),
        min_length=1,
        max_length=MAX_LAYER_INDEX,
        description="Hidden-state indices to read (0 = embeddings, -1 = last).",
    )
    combine: Combine = "mean"
    combine_at: Literal["tokens", "pooled"] = "tokens"
    token_pooler: SerializeAsAny[TokenPoolerSpec] = Field(
        default_factory=MaskedMeanSpec,
        description="Any registered single-layer pooler spec (built-in or plugin), by its kind.",
    )

    multi_layer = True

    @field_validator("layers")
    @classmethod
    def _distinct(cls, layers: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers must be distinct, got {list(layers)}")
        return layers

    @field_validator("token_pooler", mode="before")
    @classmethod
    def _token_pooler_from_registry(cls, value: Any) -> Any:
        if isinstance(value, PoolerSpec):
            value = value.model_dump()
        if not isinstance(value, dict):
            return value
        kind = value.get("kind", "masked_mean")
        if not isinstance(kind, str):
            raise PydanticCustomError(
                "kind_type", "kind must be a string naming a pooler, got {kind}", {"kind": repr(kind)}
            )
        try:
            spec_cls = POOLERS.get(kind)
        except ProbekitError as exc:
            raise PydanticCustomError("unknown_kind", str(exc)) from None
        if not issubclass(spec_cls, TokenPoolerSpec):
            raise PydanticCustomError(
                "not_token_pooler",
                "token_pooler must be a single-layer pooler; '{kind}' reads several layers",
                {"kind": kind},
            )
        if value.get("layer", -1) != -1:
            raise PydanticCustomError(
                "layer_in_multilayer",
                "token_pooler.layer is not used inside multilayer; choose layers with `layers`",
            )
        return spec_cls.model_validate(value)

    def layer_indices(self) -> tuple[int, ...]:
        return self.layers

    def is_permutation_invariant(self) -> bool:
        return self.token_pooler.is_permutation_invariant()

    def build(self, ctx: BuildContext) -> MultiLayerPooler:
        width = ctx.hidden_size * (len(self.layers) if self.combine == "concat" else 1)
        inner_ctx = ctx if self.combine_at == "pooled" else dataclasses.replace(ctx, hidden_size=width)
        return MultiLayerPooler(
            len(self.layers), self.combine, self.combine_at, self.token_pooler.build(inner_ctx)
        )
