"""``constant``: linear warmup, then the base rate until the end."""

from __future__ import annotations

from typing import Literal

from probekit.registry import SCHEDULERS
from probekit.spec import SchedulerSpec


@SCHEDULERS.register
class ConstantSpec(SchedulerSpec):
    """Warmup, then a flat base learning rate (its floor is the base rate itself)."""

    kind: Literal["constant"] = "constant"

    def decay(self, progress: float) -> float:
        return 1.0
