"""``mlp``: ``[norm] -> (Linear -> activation -> Dropout) x N -> Linear``.

The safety8k head is ``mlp`` with its defaults: LayerNorm(d) -> Linear(d, 128) -> GELU ->
Dropout(0.2) -> Linear(128, 2), ``d`` read from the backbone through the pooler.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, PositiveInt

from probekit.registry import HEADS
from probekit.spec import MAX_WIDTH, BuildContext, HeadSpec

if TYPE_CHECKING:
    from torch import nn

ACTIVATIONS: dict[str, str] = {"gelu": "GELU", "relu": "ReLU", "silu": "SiLU", "tanh": "Tanh"}
"""``activation`` -> the name of its ``torch.nn`` module (looked up when the head is built: no
torch import before then)."""


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
        from torch import nn

        activation: type[nn.Module] = getattr(nn, ACTIVATIONS[self.activation])
        layers: list[nn.Module] = [nn.LayerNorm(in_dim)] if self.norm == "layernorm" else []
        width = in_dim
        for hidden in self.hidden_sizes:
            layers += [nn.Linear(width, hidden), activation(), nn.Dropout(self.dropout)]
            width = hidden
        layers.append(nn.Linear(width, self.num_classes))
        return nn.Sequential(*layers)
