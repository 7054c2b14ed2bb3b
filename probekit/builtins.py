"""Imports every built-in component module so that each registers itself."""

import probekit.freezers
import probekit.heads
import probekit.poolers
import probekit.presets
import probekit.schedulers
import probekit.tasks  # noqa: F401
