"""Presets: released, named configurations. Built-ins register in `probekit.registry.PRESETS`."""

from probekit.presets.safety8k import SAFETY8K

__all__ = ["SAFETY8K"]
