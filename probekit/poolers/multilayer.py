"""``multilayer``: combine the hidden states of several layers, before or after a token pooler.

``combine_at="tokens"`` mixes the layers token by token and pools the mix once;
``combine_at="pooled"`` pools every layer with the same token pooler and mixes the pooled vectors.
``combine`` is ``mean``, ``concat`` (widths add up) or ``scalar_mix`` (learned softmax weights
times a learned scale, as in ELMo).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, SerializeAsAny, field_validator
from pydantic_core import PydanticCustomError

from probekit._lazy import lazy_attributes
from probekit.errors import ProbekitError
from probekit.poolers.masked_mean import MaskedMeanSpec
from probekit.registry import POOLERS
from probekit.spec import MAX_LAYER_INDEX, BuildContext, PoolerSpec, TokenPoolerSpec

if TYPE_CHECKING:
    from probekit.poolers.modules import MultiLayerPooler as MultiLayerPooler


Combine = Literal["mean", "concat", "scalar_mix"]


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
        from probekit.poolers.modules import MultiLayerPooler

        width = ctx.hidden_size * (len(self.layers) if self.combine == "concat" else 1)
        inner_ctx = ctx if self.combine_at == "pooled" else dataclasses.replace(ctx, hidden_size=width)
        return MultiLayerPooler(
            len(self.layers), self.combine, self.combine_at, self.token_pooler.build(inner_ctx)
        )


__getattr__ = lazy_attributes(__name__, {"MultiLayerPooler": "probekit.poolers.modules"})
"""``MultiLayerPooler``, the torch module this spec builds, imported on first use: importing the spec (to
validate a config) imports no torch."""
