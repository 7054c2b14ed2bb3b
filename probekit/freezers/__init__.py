"""Freezing policies, resolved against a backbone into a `FreezePlan`."""

from probekit.freezers.all import FreezeAllSpec
from probekit.freezers.bottom import BottomFreezeSpec
from probekit.freezers.none import NoFreezeSpec
from probekit.freezers.plan import FreezePlan
from probekit.freezers.regex import RegexFreezeSpec

__all__ = ["BottomFreezeSpec", "FreezeAllSpec", "FreezePlan", "NoFreezeSpec", "RegexFreezeSpec"]
