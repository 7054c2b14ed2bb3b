"""``max``: the element-wise maximum over the hidden states of the real tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from probekit._lazy import lazy_attributes
from probekit.registry import POOLERS
from probekit.spec import BuildContext, TokenPoolerSpec

if TYPE_CHECKING:
    from probekit.poolers.modules import MaskedMax as MaskedMax


@POOLERS.register
class MaxSpec(TokenPoolerSpec):
    """Masked max over the tokens of one layer."""

    kind: Literal["max"] = "max"
    permutation_invariant: ClassVar[bool] = True

    def build(self, ctx: BuildContext) -> MaskedMax:
        from probekit.poolers.modules import MaskedMax

        return MaskedMax()


__getattr__ = lazy_attributes(__name__, {"MaskedMax": "probekit.poolers.modules"})
"""``MaskedMax``, the torch module this spec builds, imported on first use: importing the spec (to
validate a config) imports no torch."""
