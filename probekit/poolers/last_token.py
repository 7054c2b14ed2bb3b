"""``last_token``: the hidden state of the last real token (decoders under left or right padding)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from probekit._lazy import lazy_attributes
from probekit.registry import POOLERS
from probekit.spec import BuildContext, TokenPoolerSpec

if TYPE_CHECKING:
    from probekit.poolers.modules import LastToken as LastToken


@POOLERS.register
class LastTokenSpec(TokenPoolerSpec):
    """Last real token of one layer (the summary position of a causal decoder)."""

    kind: Literal["last_token"] = "last_token"

    def build(self, ctx: BuildContext) -> LastToken:
        from probekit.poolers.modules import LastToken

        return LastToken()


__getattr__ = lazy_attributes(__name__, {"LastToken": "probekit.poolers.modules"})
"""``LastToken``, the torch module this spec builds, imported on first use: importing the spec (to
validate a config) imports no torch."""
