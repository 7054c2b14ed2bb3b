"""``rolling_max``: the largest rolling-window mean of the hidden states, feature by feature.

Each real token ends a window of the last ``window`` real tokens (fewer at the start of a text);
the window's mean is taken per feature, and the pooled vector is the per-feature maximum over
all windows. A short burst of signal anywhere in a long text survives the pooling, and a single
odd token does not (the rolling-mean-then-max aggregation of the Gemini misuse probes, here over
features; with ``window: 1`` it is ``max``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from probekit._lazy import lazy_attributes
from probekit.registry import POOLERS
from probekit.spec import BuildContext, TokenPoolerSpec

if TYPE_CHECKING:
    from probekit.poolers.modules import RollingMax as RollingMax


@POOLERS.register
class RollingMaxSpec(TokenPoolerSpec):
    """Max over positions of a rolling-window mean of one layer's hidden states."""

    kind: Literal["rolling_max"] = "rolling_max"
    window: int = Field(default=8, ge=1, le=4096, description="Real tokens per window.")

    def build(self, ctx: BuildContext) -> RollingMax:
        from probekit.poolers.modules import RollingMax

        return RollingMax(self.window)


__getattr__ = lazy_attributes(__name__, {"RollingMax": "probekit.poolers.modules"})
"""``RollingMax``, the torch module this spec builds, imported on first use: importing the spec (to
validate a config) imports no torch."""
