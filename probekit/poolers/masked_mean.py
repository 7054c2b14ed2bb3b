"""``masked_mean``: the average of the hidden states of the real (unmasked) tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from probekit._lazy import lazy_attributes
from probekit.registry import POOLERS
from probekit.spec import BuildContext, TokenPoolerSpec

if TYPE_CHECKING:
    from probekit.poolers.modules import MaskedMean as MaskedMean


@POOLERS.register
class MaskedMeanSpec(TokenPoolerSpec):
    """Masked mean over the tokens of one layer."""

    kind: Literal["masked_mean"] = "masked_mean"
    permutation_invariant: ClassVar[bool] = True

    def build(self, ctx: BuildContext) -> MaskedMean:
        from probekit.poolers.modules import MaskedMean

        return MaskedMean()


__getattr__ = lazy_attributes(__name__, {"MaskedMean": "probekit.poolers.modules"})
"""``MaskedMean``, the torch module this spec builds, imported on first use: importing the spec (to
validate a config) imports no torch."""
