"""Learning-rate schedules: multipliers of each parameter group's base rate, per optimiser step."""

from probekit.schedulers.constant import ConstantSpec
from probekit.schedulers.cosine import CosineSpec
from probekit.schedulers.linear import LinearSpec

__all__ = ["ConstantSpec", "CosineSpec", "LinearSpec"]
