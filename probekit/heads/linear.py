"""``linear``: optional dropout, then one linear layer to the class logits."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from probekit.registry import HEADS
from probekit.spec import BuildContext, HeadSpec

if TYPE_CHECKING:
    from torch import nn


@HEADS.register
class LinearHeadSpec(HeadSpec):
    """A linear probe: ``Dropout(p) -> Linear(in_dim, num_classes)``."""

    kind: Literal["linear"] = "linear"
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)

    def build(self, ctx: BuildContext, in_dim: int) -> nn.Module:
        from torch import nn

        layers: list[nn.Module] = [nn.Dropout(self.dropout)] if self.dropout > 0 else []
        return nn.Sequential(*layers, nn.Linear(in_dim, self.num_classes))
