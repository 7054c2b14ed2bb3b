"""``linear``: linear warmup, then linear decay from the base rate to ``min_lr_ratio`` of it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from probekit.registry import SCHEDULERS
from probekit.spec import SchedulerSpec


@SCHEDULERS.register
class LinearSpec(SchedulerSpec):
    """Warmup then a straight line down to the floor ``min_lr_ratio``."""

    kind: Literal["linear"] = "linear"
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0, description="Floor as a share of the base lr.")

    def decay(self, progress: float) -> float:
        # Written from the floor up so that progress 1.0 gives exactly min_lr_ratio.
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * (1.0 - progress)
