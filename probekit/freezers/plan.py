"""The freezing plan: which blocks and which exact parameters train.

One plan drives both ``requires_grad`` (`FreezePlan.apply`) and the optimiser's parameter
groups (`probekit.optim.param_groups`), so the two can never disagree.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from probekit.errors import UserError

if TYPE_CHECKING:
    from torch import nn

    from probekit.backbone import Layout


@dataclass(frozen=True)
class FreezePlan:
    """Frozen and trainable blocks and parameter names (relative to the backbone)."""

    num_blocks: int
    frozen_blocks: tuple[int, ...]
    """Blocks whose every parameter is frozen."""
    trainable_blocks: tuple[int, ...]
    """Blocks with at least one trainable parameter."""
    frozen: frozenset[str]
    trainable: frozenset[str]
    embeddings_frozen: bool

    @classmethod
    def from_frozen(cls, backbone: nn.Module, layout: Layout, frozen: Iterable[str]) -> FreezePlan:
        """Derive the block view from an exact set of frozen parameter names."""
        names = [n for n, _ in backbone.named_parameters()]
        frozen_set = frozenset(frozen)
        unknown = frozen_set.difference(names)
        if unknown:
            raise ValueError(f"not parameters of the backbone: {sorted(unknown)[:5]}")
        trainable = frozenset(names) - frozen_set
        trainable_blocks = sorted({b for n in trainable if (b := layout.block_of(n)) is not None})
        embedding_names = [n for n in names if layout.is_embedding(n)]
        return cls(
            num_blocks=layout.num_blocks,
            frozen_blocks=tuple(b for b in range(layout.num_blocks) if b not in trainable_blocks),
            trainable_blocks=tuple(trainable_blocks),
            frozen=frozen_set,
            trainable=trainable,
            embeddings_frozen=bool(embedding_names) and all(n in frozen_set for n in embedding_names),
        )

    def apply(self, backbone: nn.Module) -> None:
        """Set ``requires_grad`` on every backbone parameter exactly as the plan says."""
        names = {n for n, _ in backbone.named_parameters()}
        if names != self.frozen | self.trainable:
            raise ValueError("this plan was resolved against a different backbone")
        for name, param in backbone.named_parameters():
            if name in self.trainable and not param.is_floating_point():
                kind = str(param.dtype).removeprefix("torch.")
                raise UserError(
                    f"freezer: backbone parameter {name} is quantised ({kind}) "
                    "but the freezing plan trains it; only frozen blocks may be quantised: freeze its "
                    "block or load the backbone unquantised"
                )
            param.requires_grad_(name in self.trainable)

    def describe(self) -> str:
        """One line: frozen/trainable blocks and whether embeddings train."""
        return (
            f"blocks frozen {_ranges(self.frozen_blocks)}, trainable {_ranges(self.trainable_blocks)} "
            f"of {self.num_blocks}; embeddings {'frozen' if self.embeddings_frozen else 'trainable'}; "
            f"{len(self.trainable)} trainable / {len(self.frozen)} frozen backbone tensors"
        )


def _ranges(indices: tuple[int, ...]) -> str:
    if not indices:
        return "none"
    parts: list[str] = []
    start = prev = indices[0]
    for i in (*indices[1:], None):
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts)
