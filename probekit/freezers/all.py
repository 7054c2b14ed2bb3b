"""``all``: probe only, the whole backbone frozen."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from probekit.freezers.plan import FreezePlan
from probekit.registry import FREEZERS
from probekit.spec import FreezerSpec

if TYPE_CHECKING:
    from torch import nn


@FREEZERS.register
class FreezeAllSpec(FreezerSpec):
    """Probe only: every backbone parameter is frozen; the pooler and head train."""

    kind: Literal["all"] = "all"

    def resolve(self, backbone: nn.Module) -> FreezePlan:
        from probekit.backbone import locate

        return FreezePlan.from_frozen(backbone, locate(backbone), (n for n, _ in backbone.named_parameters()))
