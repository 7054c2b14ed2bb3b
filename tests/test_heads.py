"""Heads, property-tested over every registered head kind."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import probekit
from probekit.heads import LinearHeadSpec, MLPHeadSpec
from probekit.registry import HEADS
from probekit.spec import BuildContext, HeadSpec

probekit.discover()

CTX = BuildContext(hidden_size=8, num_layers=2)


@st.composite
def head_specs(draw: st.DrawFn, kind: str) -> HeadSpec:
    num_classes = draw(st.integers(2, 5))
    if kind == "mlp":
        return MLPHeadSpec(
            num_classes=num_classes,
            hidden_sizes=tuple(draw(st.lists(st.integers(1, 16), max_size=3))),
            norm=draw(st.sampled_from(["layernorm", "none"])),
            activation=draw(st.sampled_from(["gelu", "relu", "silu", "tanh"])),
            dropout=draw(st.sampled_from([0.0, 0.2, 0.5])),
        )
    if kind == "linear":
        return LinearHeadSpec(num_classes=num_classes, dropout=draw(st.sampled_from([0.0, 0.3])))
    return HEADS.get(kind)(num_classes=num_classes)


@pytest.mark.parametrize("kind", HEADS.kinds())
@settings(max_examples=20)
@given(data=st.data(), in_dim=st.integers(1, 24), batch=st.integers(1, 5))
def test_every_head_maps_in_dim_to_num_classes_and_trains(
    kind: str, data: Any, in_dim: int, batch: int
) -> None:
    spec = data.draw(head_specs(kind))
    torch.manual_seed(0)
    head = spec.build(CTX, in_dim)
    features = torch.randn(batch, in_dim, requires_grad=True)
    logits = head(features)
    assert logits.shape == (batch, spec.num_classes)
    assert torch.isfinite(logits).all()
    logits.square().sum().backward()
    assert all(p.grad is not None for p in head.parameters())
    # In eval mode the head is the same function as the head without its dropout layers.
    head.eval()
    plain = copy.deepcopy(head)
    for name, module in list(plain.named_modules()):
        if isinstance(module, torch.nn.Dropout) and name:
            parent, _, leaf = name.rpartition(".")
            setattr(plain.get_submodule(parent) if parent else plain, leaf, torch.nn.Identity())
    torch.testing.assert_close(head(features), plain(features), rtol=0, atol=0)


def test_safety8k_head_is_the_recipe() -> None:
    head = probekit.preset("safety8k").head.build(CTX, 384)
    layers = list(head)
    assert [type(m) for m in layers] == [nn.LayerNorm, nn.Linear, nn.GELU, nn.Dropout, nn.Linear]
    assert layers[0].normalized_shape == (384,)
    assert (layers[1].in_features, layers[1].out_features) == (384, 128)
    assert layers[3].p == 0.2
    assert (layers[4].in_features, layers[4].out_features) == (128, 2)


def test_head_fields_are_validated() -> None:
    with pytest.raises(probekit.errors.ConfigError, match=r"head\.hidden_sizes\[0\]"):
        probekit.load_config({"head": {"kind": "mlp", "hidden_sizes": [0]}})
    with pytest.raises(probekit.errors.ConfigError, match=r"head\.num_classes"):
        probekit.load_config({"head": {"kind": "linear", "num_classes": 0}})
    with pytest.raises(probekit.errors.ConfigError, match=r"head\.activation"):
        probekit.load_config({"head": {"kind": "mlp", "activation": "swish"}})
