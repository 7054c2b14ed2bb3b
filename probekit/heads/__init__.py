"""Heads: pooled features -> class logits. Built-ins register in `probekit.registry.HEADS`."""

from probekit.heads.linear import LinearHeadSpec
from probekit.heads.mlp import MLPHeadSpec

__all__ = ["LinearHeadSpec", "MLPHeadSpec"]
