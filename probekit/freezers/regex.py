"""``regex``: freeze the parameters whose names match any of the patterns."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, field_validator

from probekit.errors import ConfigError
from probekit.freezers.plan import FreezePlan
from probekit.registry import FREEZERS
from probekit.spec import FreezerSpec

if TYPE_CHECKING:
    from torch import nn


@FREEZERS.register
class RegexFreezeSpec(FreezerSpec):
    """Freeze parameters matched (``re.search``) by any pattern; every pattern must match one."""

    kind: Literal["regex"] = "regex"
    patterns: tuple[Annotated[str, Field(max_length=1000)], ...] = Field(
        min_length=1, max_length=1000, description="Regular expressions on parameter names."
    )

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for i, pattern in enumerate(patterns):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"patterns[{i}] {pattern!r} is not a regular expression: {exc}") from None
        return patterns

    def resolve(self, backbone: nn.Module) -> FreezePlan:
        from probekit.backbone import locate

        names = [n for n, _ in backbone.named_parameters()]
        frozen: set[str] = set()
        for i, pattern in enumerate(self.patterns):
            matched = {n for n in names if re.search(pattern, n)}
            if not matched:
                raise ConfigError(
                    f"freezer.patterns[{i}] {pattern!r} matches no parameter of "
                    f"{type(backbone).__name__} (names look like {names[0]!r})"
                )
            frozen |= matched
        return FreezePlan.from_frozen(backbone, locate(backbone), frozen)
