"""``none``: full fine-tuning, nothing frozen."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from probekit.freezers.plan import FreezePlan
from probekit.registry import FREEZERS
from probekit.spec import FreezerSpec

if TYPE_CHECKING:
    from torch import nn


@FREEZERS.register
class NoFreezeSpec(FreezerSpec):
    """Full fine-tuning: no backbone parameter is frozen."""

    kind: Literal["none"] = "none"

    def resolve(self, backbone: nn.Module) -> FreezePlan:
        from probekit.backbone import locate

        return FreezePlan.from_frozen(backbone, locate(backbone), ())
