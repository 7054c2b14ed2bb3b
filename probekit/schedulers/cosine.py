"""``cosine``: linear warmup, then cosine decay from the base rate to ``min_lr_ratio`` of it."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from probekit.registry import SCHEDULERS
from probekit.spec import SchedulerSpec


@SCHEDULERS.register
class CosineSpec(SchedulerSpec):
    """Warmup then half a cosine down to the floor ``min_lr_ratio`` (safety8k: 0, warmup 1 epoch)."""

    kind: Literal["cosine"] = "cosine"
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0, description="Floor as a share of the base lr.")

    def decay(self, progress: float) -> float:
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
