"""``bottom``: freeze the lowest blocks (a count or a fraction of the depth), with the embeddings."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from probekit.errors import BackboneError
from probekit.freezers.plan import FreezePlan
from probekit.registry import FREEZERS
from probekit.spec import MAX_LAYER_INDEX, FreezerSpec

if TYPE_CHECKING:
    from torch import nn


@FREEZERS.register
class BottomFreezeSpec(FreezerSpec):
    """Freeze blocks ``0..n-1``; ``n`` is ``count``, or ``fraction`` of the blocks rounded half up.

    safety8k uses ``fraction=0.625``: 20 of 32 blocks, 4 of 6, 15 of 24.
    """

    kind: Literal["bottom"] = "bottom"
    count: int | None = Field(
        default=None, ge=0, le=MAX_LAYER_INDEX, description="Number of lowest blocks to freeze."
    )
    fraction: float | None = Field(default=None, ge=0.0, le=1.0, description="Share of blocks to freeze.")
    freeze_embeddings: bool = True

    @model_validator(mode="after")
    def _exactly_one(self) -> BottomFreezeSpec:
        if (self.count is None) == (self.fraction is None):
            raise ValueError("give exactly one of count or fraction")
        return self

    def num_frozen(self, num_blocks: int) -> int:
        """Blocks frozen on a backbone with ``num_blocks`` blocks."""
        if self.count is not None:
            if self.count > num_blocks:
                raise BackboneError(
                    f"freezer.count={self.count} but the backbone has only {num_blocks} blocks"
                )
            return self.count
        assert self.fraction is not None
        # Exact decimal arithmetic: 0.58 x 25 is 14.5 and must round to 15, not float's 14.499...
        return min(num_blocks, math.floor(Fraction(str(self.fraction)) * num_blocks + Fraction(1, 2)))

    def resolve(self, backbone: nn.Module) -> FreezePlan:
        from probekit.backbone import locate

        layout = locate(backbone)
        n = self.num_frozen(layout.num_blocks)
        frozen = [
            name
            for name, _ in backbone.named_parameters()
            if ((b := layout.block_of(name)) is not None and b < n)
            or (self.freeze_embeddings and layout.is_embedding(name))
        ]
        return FreezePlan.from_frozen(backbone, layout, frozen)
