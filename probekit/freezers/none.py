"""``none``: full fine-tuning, nothing frozen."""

from __future__ import annotations

from typing import Literal

from torch import nn

from probekit.backbone import locate
from probekit.freezers.plan import FreezePlan
from probekit.registry import FREEZERS
from probekit.spec import FreezerSpec


@FREEZERS.register
class NoFreezeSpec(FreezerSpec):
    """Full fine-tuning: no backbone parameter is frozen."""

    kind: Literal["none"] = "none"

    def resolve(self, backbone: nn.Module) -> FreezePlan:
        return FreezePlan.from_frozen(backbone, locate(backbone), ())
