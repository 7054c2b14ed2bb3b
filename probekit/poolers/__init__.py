"""Poolers: hidden states + attention mask -> one vector per row.

Every built-in registers itself in `probekit.registry.POOLERS` under its ``kind``. The specs
import no torch; the torch modules (`Pooler` and the built-ins' modules) load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from probekit._lazy import lazy_attributes
from probekit.poolers.cls import ClsSpec
from probekit.poolers.ema import EmaSpec
from probekit.poolers.last_token import LastTokenSpec
from probekit.poolers.masked_mean import MaskedMeanSpec
from probekit.poolers.max import MaxSpec
from probekit.poolers.multilayer import MultiLayerSpec
from probekit.poolers.rolling_max import RollingMaxSpec

if TYPE_CHECKING:
    from probekit.poolers.base import Pooler
    from probekit.poolers.modules import (
        Ema,
        FirstToken,
        LastToken,
        MaskedMax,
        MaskedMean,
        MultiLayerPooler,
        RollingMax,
    )

__all__ = [
    "ClsSpec",
    "Ema",
    "EmaSpec",
    "FirstToken",
    "LastToken",
    "LastTokenSpec",
    "MaskedMax",
    "MaskedMean",
    "MaskedMeanSpec",
    "MaxSpec",
    "MultiLayerPooler",
    "MultiLayerSpec",
    "Pooler",
    "RollingMax",
    "RollingMaxSpec",
]

_TORCH_MODULES = {
    "Pooler": "probekit.poolers.base",
    **dict.fromkeys(
        ["Ema", "FirstToken", "LastToken", "MaskedMax", "MaskedMean", "MultiLayerPooler", "RollingMax"],
        "probekit.poolers.modules",
    ),
}


__getattr__ = lazy_attributes(__name__, _TORCH_MODULES)
"""The torch modules, imported on first use (PEP 562)."""
