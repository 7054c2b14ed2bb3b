"""Poolers: hidden states + attention mask -> one vector per row.

Every built-in registers itself in `probekit.registry.POOLERS` under its ``kind``.
"""

from probekit.poolers.base import Pooler
from probekit.poolers.cls import ClsSpec, FirstToken
from probekit.poolers.ema import Ema, EmaSpec
from probekit.poolers.last_token import LastToken, LastTokenSpec
from probekit.poolers.masked_mean import MaskedMean, MaskedMeanSpec
from probekit.poolers.max import MaskedMax, MaxSpec
from probekit.poolers.multilayer import MultiLayerPooler, MultiLayerSpec
from probekit.poolers.rolling_max import RollingMax, RollingMaxSpec

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
