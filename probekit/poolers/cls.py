"""``cls``: the hidden state of the first real token (correct under left padding)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from probekit._lazy import lazy_attributes
from probekit.registry import POOLERS
from probekit.spec import BuildContext, TokenPoolerSpec

if TYPE_CHECKING:
    from probekit.poolers.modules import FirstToken as FirstToken


@POOLERS.register
class ClsSpec(TokenPoolerSpec):
    """First real token of one layer (BERT's [CLS] under right or left padding)."""

    kind: Literal["cls"] = "cls"

    def build(self, ctx: BuildContext) -> FirstToken:
        from probekit.poolers.modules import FirstToken

        return FirstToken()


__getattr__ = lazy_attributes(__name__, {"FirstToken": "probekit.poolers.modules"})
"""``FirstToken``, the torch module this spec builds, imported on first use: importing the spec (to
validate a config) imports no torch."""
