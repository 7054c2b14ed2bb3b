"""``attention``: a learned query per head attends over the valid tokens of one layer.

The hidden states ``(b, t, h)`` are split into ``heads`` heads of width ``h / heads``. Head ``k``
scores each valid token by ``<hidden_k, query_k> / (sqrt(h / heads) * temperature)``, takes a
softmax over the valid tokens of the row, and returns the weighted sum of their hidden states;
the heads are concatenated back to width ``h``.

Padding is removed with ``torch.where`` (never by multiplying with the mask): its values are
replaced by zeros before anything reads them and its scores by ``-inf`` before the softmax, so
nothing it holds (``inf`` and ``nan`` included) reaches the output or the gradients. Rows with
no valid token pool to zeros. Without position information the pooler ignores token order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from probekit.errors import ConfigError
from probekit.spec import BuildContext, TokenPoolerSpec

if TYPE_CHECKING:
    from probekit_attention_pool.pool import AttentionPool as AttentionPool

__all__ = ["AttentionPool", "AttentionPoolSpec"]
__version__ = "0.1.0"


class AttentionPoolSpec(TokenPoolerSpec):
    """Learned attention pooling over the tokens of one layer (one query per head)."""

    kind: Literal["attention"] = "attention"
    heads: int = Field(default=1, ge=1, description="Attention heads; must divide the hidden size.")
    temperature: float = Field(
        default=1.0,
        gt=0.0,
        allow_inf_nan=False,
        description="Softmax temperature: above 1 flattens the weights, below 1 sharpens them.",
    )

    permutation_invariant: ClassVar[bool] = True

    def build(self, ctx: BuildContext) -> AttentionPool:
        if ctx.hidden_size % self.heads:
            divisors = [d for d in range(1, min(ctx.hidden_size, 64) + 1) if ctx.hidden_size % d == 0]
            raise ConfigError(
                f"pooler.heads={self.heads} (pooler.token_pooler.heads inside multilayer) does not "
                f"divide the hidden size {ctx.hidden_size} that the attention pooler reads; choose "
                f"among {', '.join(map(str, divisors))}"
            )
        from probekit_attention_pool.pool import AttentionPool

        return AttentionPool(ctx.hidden_size, self.heads, self.temperature)


def __getattr__(name: str) -> Any:
    """`AttentionPool` (torch) on first use: the entry point loads only the spec, so listing
    components or validating a config never imports torch."""
    if name in {"AttentionPool", "INIT_STD"}:
        from probekit_attention_pool import pool

        return getattr(pool, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
