"""``mlp``: ``[norm] -> (Linear -> activation -> Dropout) x N -> Linear``.

The safety8k head is ``mlp`` with its defaults: LayerNorm(d) -> Linear(d, 128) -> GELU ->
Dropout(0.2) -> Linear(128, 2), ``d`` read from the backbone through the pooler.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, PositiveInt
from torch import nn

from probekit.registry import HEADS
from probekit.spec import MAX_WIDTH, BuildContext, HeadSpec

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}


@HEADS.register
class MLPHeadSpec(HeadSpec):
    """A small MLP head; an empty ``hidden_sizes`` makes it ``[norm] -> Linear``."""

    kind: Literal["mlp"] = "mlp"
    hidden_sizes: tuple[Annotated[PositiveInt, Field(le=MAX_WIDTH)], ...] = Field(
        default=(128,), max_length=64, description="Width of each hidden layer."
    )
    norm: Literal["layernorm", "none"] = "layernorm"
    activation: Literal["gelu", "relu", "silu", "tanh"] = "gelu"
    dropout: float = Field(default=0.2, ge=0.0, lt=1.0)

    def build(self, ctx: BuildContext, in_dim: int) -> nn.Module:
        layers: list[nn.Module] = [nn.LayerNorm(in_dim)] if self.norm == "layernorm" else []
        width = in_dim
        for hidden in self.hidden_sizes:
            layers += [nn.Linear(width, hidden), ACTIVATIONS[self.activation](), nn.Dropout(self.dropout)]
            width = hidden
        layers.append(nn.Linear(width, self.num_classes))
        return nn.Sequential(*layers)
