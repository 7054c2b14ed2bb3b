"""Hypothesis strategies that draw pooler cases: shapes first, then lengths, then a seed.

Tensors come from a seeded torch generator (hypothesis draws the seed), so a failing example
shrinks to small shapes and replays exactly.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from probekit.testing import PoolerCase, random_case


@st.composite
def pooler_cases(
    draw: Any,
    num_layers: int = 1,
    max_batch: int = 4,
    max_tokens: int = 10,
    max_hidden: int = 16,
    min_length: int = 1,
    hidden_multiple: int = 1,
) -> PoolerCase:
    """A `PoolerCase` with ``num_layers`` layers; each row has ``min_length``+ valid tokens and the
    hidden width is a multiple of ``hidden_multiple``."""
    batch = draw(st.integers(1, max_batch))
    tokens = draw(st.integers(max(1, min_length), max_tokens))
    hidden = hidden_multiple * draw(st.integers(1, max(1, max_hidden // hidden_multiple)))
    lengths = draw(st.lists(st.integers(min_length, tokens), min_size=batch, max_size=batch))
    seed = draw(st.integers(0, 2**31 - 1))
    return random_case(seed, batch, tokens, hidden, num_layers, lengths)


padding_fills = st.sampled_from(["random", "inf", "-inf", "nan"])
"""What padding positions hold in padding-invariance checks."""
