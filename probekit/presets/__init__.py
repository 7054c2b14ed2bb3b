"""Presets: released, named configurations. Built-ins register in `probekit.registry.PRESETS`."""

from probekit.presets.chat_prompt_guard import CHAT_PROMPT_GUARD
from probekit.presets.frozen_probe import FROZEN_PROBE
from probekit.presets.hazards13 import HAZARDS13
from probekit.presets.safety8k import SAFETY8K

__all__ = ["CHAT_PROMPT_GUARD", "FROZEN_PROBE", "HAZARDS13", "SAFETY8K"]
