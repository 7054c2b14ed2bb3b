"""Presets: released, named configurations. Built-ins register in `probekit.registry.PRESETS`."""

from probekit.presets.hazards13 import HAZARDS13
from probekit.presets.safety8k import SAFETY8K

__all__ = ["HAZARDS13", "SAFETY8K"]
