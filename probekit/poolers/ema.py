"""``ema``: an exponential moving average of the hidden states over the real tokens.

``e_1 = x_1``, ``e_i = alpha * x_i + (1 - alpha) * e_(i-1)`` over the real tokens in order
(padding is skipped); the pooled vector is ``e`` at the last real token. Recent tokens weigh
most, so as a streaming probe it follows where a text is going without forgetting where it came
from (probelab's EMA aggregation, here over features; the head then scores the average).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from probekit._lazy import lazy_attributes
from probekit.registry import POOLERS
from probekit.spec import BuildContext, TokenPoolerSpec

if TYPE_CHECKING:
    from probekit.poolers.modules import Ema as Ema


@POOLERS.register
class EmaSpec(TokenPoolerSpec):
    """Exponential moving average of one layer's hidden states over the real tokens."""

    kind: Literal["ema"] = "ema"
    alpha: float = Field(
        default=0.1, gt=0.0, le=1.0, description="Weight of each new token, in (0, 1]; 1 is the last token."
    )

    def build(self, ctx: BuildContext) -> Ema:
        from probekit.poolers.modules import Ema

        return Ema(self.alpha)


__getattr__ = lazy_attributes(__name__, {"Ema": "probekit.poolers.modules"})
"""``Ema``, the torch module this spec builds, imported on first use: importing the spec (to
validate a config) imports no torch."""
