"""``max``: the element-wise maximum over the hidden states of the real tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

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


def __getattr__(name: str) -> Any:
    """``MaskedMax``, the torch module this spec builds, imported on first use: importing the spec
    (to validate a config) imports no torch."""
    if name == "MaskedMax":
        from probekit.poolers.modules import MaskedMax

        return MaskedMax
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
