"""The Probe end to end: building from a spec, the safety8k structure, training, output widths."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import probekit
from probekit.heads import LinearHeadSpec, MLPHeadSpec
from probekit.optim import OptimizerSpec, build_optimizer
from probekit.poolers import MaskedMeanSpec, MultiLayerSpec
from probekit.probe import Probe
from tests.backbones import FAMILIES, make_backbone, make_batch

Factory = Callable[..., Any]


def test_build_from_a_spec_in_five_lines() -> None:
    import probekit

    backbone = make_backbone("bert", 4, 32)
    probe = probekit.build(probekit.preset("safety8k"), backbone)
    logits = probe(*make_batch(batch=3))
    assert logits.shape == (3, 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_safety8k_builds_on_every_family(backbone_factory: Factory, family: str) -> None:
    backbone = backbone_factory(family, 6, 32, fresh=True)
    probe = probekit.build(probekit.preset("safety8k"), backbone)
    ids, mask = make_batch(batch=2, pad_id=1 if family == "roberta" else 0)
    probe.eval()
    with torch.no_grad():
        logits = probe(ids, mask)
    assert logits.shape == (2, 2)
    assert torch.isfinite(logits).all()
    assert probe.plan.frozen_blocks == (0, 1, 2, 3)
    assert probe.plan.trainable_blocks == (4, 5)
    assert probe.layers == (4, 5, 6)


@pytest.mark.parametrize("hidden", [16, 32, 48])
def test_safety8k_head_structure(backbone_factory: Factory, hidden: int) -> None:
    probe = probekit.build(probekit.preset("safety8k"), backbone_factory("llama", 3, hidden, fresh=True))
    head = probe.head
    assert isinstance(head, nn.Sequential)
    assert [type(m) for m in head] == [nn.LayerNorm, nn.Linear, nn.GELU, nn.Dropout, nn.Linear]
    norm, first, act, drop, last = head
    assert norm.normalized_shape == (hidden,)
    assert norm.elementwise_affine
    assert (first.in_features, first.out_features) == (hidden, 128)
    assert first.bias is not None
    assert act.approximate == "none"
    assert drop.p == 0.2
    assert (last.in_features, last.out_features) == (128, 2)
    assert last.bias is not None
    assert probe.pooler.output_dim(hidden) == hidden


def test_safety8k_on_a_32_block_llama() -> None:
    backbone = make_backbone("llama", 32, 16)
    probe = probekit.build(probekit.preset("safety8k"), backbone)
    plan = probe.plan
    assert plan.num_blocks == 32
    assert plan.frozen_blocks == tuple(range(20))
    assert plan.trainable_blocks == tuple(range(20, 32))
    assert plan.embeddings_frozen
    assert not backbone.embed_tokens.weight.requires_grad
    assert probe.layers == (30, 31, 32)
    for b, block in enumerate(backbone.layers):
        assert all(p.requires_grad == (b >= 20) for p in block.parameters()), b
    assert backbone.norm.weight.requires_grad  # the final norm feeds hidden state 32
    assert "blocks frozen 0-19, trainable 20-31 of 32" in plan.describe()
    # the pooled features are the masked mean of the mean of the last 3 hidden states
    ids, mask = make_batch(batch=2, tokens=5)
    with torch.no_grad():
        hidden = backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        features = probe.features(ids, mask)
    assert len(hidden) == 33
    mixed = torch.stack(hidden[30:33]).mean(0)
    m = mask.unsqueeze(-1).float()
    expected = (mixed * m).sum(1) / m.sum(1)
    assert torch.allclose(features, expected, atol=1e-5)


def _toy_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class 0 uses ids 2..49, class 1 ids 50..99: separable by the token embeddings."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1] * 4)
    low = torch.randint(2, 50, (8, 6), generator=gen)
    ids = torch.where(labels.unsqueeze(1).bool(), low + 48, low)
    mask = torch.ones_like(ids)
    mask[::3, 4:] = 0
    return ids, mask, labels


def test_probe_trains() -> None:
    torch.manual_seed(0)
    probe = probekit.build(probekit.preset("safety8k"), make_backbone("bert", 4, 32))
    ids, mask, labels = _toy_batch()
    optimizer = build_optimizer(probe, OptimizerSpec(lr_head=1e-2, lr_body=1e-3))

    def loss_now() -> float:
        probe.eval()
        with torch.no_grad():
            return float(nn.functional.cross_entropy(probe(ids, mask), labels))

    start = loss_now()
    for _ in range(15):
        probe.train()
        loss = nn.functional.cross_entropy(probe(ids, mask), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    end = loss_now()
    assert end < 0.5 * start, (start, end)
    probe.eval()
    with torch.no_grad():
        assert torch.equal(probe(ids, mask).argmax(-1), labels)


def test_gradients_reach_trainable_blocks_and_head_only() -> None:
    backbone = make_backbone("llama", 8, 16)
    probe = probekit.build(probekit.preset("safety8k"), backbone)
    assert probe.plan.frozen_blocks == (0, 1, 2, 3, 4)
    ids, mask = make_batch(batch=4, tokens=6)
    loss = nn.functional.cross_entropy(probe(ids, mask), torch.tensor([0, 1, 1, 0]))
    loss.backward()
    for name, param in probe.head.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    layout = probe.layout
    for name, param in backbone.named_parameters():
        if name in probe.plan.frozen:
            assert param.grad is None, name
    for b, block in enumerate(backbone.layers):
        grads = [p.grad for p in block.parameters()]
        if b in probe.plan.trainable_blocks:
            assert all(g is not None for g in grads), b
            assert any(g.abs().sum() > 0 for g in grads if g is not None), b
        else:
            assert all(g is None for g in grads), b
    assert backbone.embed_tokens.weight.grad is None
    assert layout.num_blocks == 8


def test_no_freezer_lets_gradient_reach_the_embeddings() -> None:
    backbone = make_backbone("gpt2", 2, 16)  # not the shared one: backward leaves .grad behind
    probe = Probe(backbone, MaskedMeanSpec(), LinearHeadSpec())
    ids, mask = make_batch()
    probe(ids, mask).sum().backward()
    assert backbone.wte.weight.grad is not None
    assert backbone.h[0].attn.c_attn.weight.grad is not None


# -- output widths ---------------------------------------------------------------------------------
@settings(max_examples=10)
@given(
    family=st.sampled_from(["bert", "gpt2", "llama"]),
    layers=st.lists(st.integers(-5, -1), min_size=1, max_size=4, unique=True),
    combine_at=st.sampled_from(["tokens", "pooled"]),
    head=st.sampled_from(["linear", "mlp"]),
)
def test_concat_pooler_width_and_head_size(
    backbone_factory: Factory, family: str, layers: list[int], combine_at: str, head: str
) -> None:
    hidden = 16
    backbone = backbone_factory(family, 4, hidden)
    spec = MultiLayerSpec(layers=tuple(layers), combine="concat", combine_at=combine_at)
    head_spec = LinearHeadSpec(num_classes=3) if head == "linear" else MLPHeadSpec(num_classes=3)
    probe = Probe(backbone, spec, head_spec)
    k = len(layers)
    assert probe.pooler.output_dim(hidden) == k * hidden
    linears = [m for m in probe.head if isinstance(m, nn.Linear)]
    assert linears[0].in_features == k * hidden
    assert linears[-1].out_features == 3
    if head == "mlp":
        assert probe.head[0].normalized_shape == (k * hidden,)
    ids, mask = make_batch()
    probe.eval()
    with torch.no_grad():
        features = probe.features(ids, mask)
        hs = backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        logits = probe(ids, mask)
    assert features.shape == (3, k * hidden)
    assert logits.shape == (3, 3)
    m = mask.unsqueeze(-1).float()
    expected = torch.cat([(hs[i] * m).sum(1) / m.sum(1) for i in layers], dim=-1)
    assert torch.allclose(features, expected, atol=1e-5)


def test_default_multilayer_concat_is_three_times_hidden(backbone_factory: Factory) -> None:
    probe = Probe(backbone_factory("bert", 4, 32), MultiLayerSpec(combine="concat"), MLPHeadSpec())
    assert probe.layers == (2, 3, 4)
    assert probe.pooler.output_dim(32) == 96
    assert probe.head[1].in_features == 96
    assert probe(*make_batch()).shape == (3, 2)


# -- task models -----------------------------------------------------------------------------------
def _task_models() -> list[tuple[str, Callable[[], nn.Module], str]]:
    import transformers as tf

    llama = {
        "vocab_size": 100,
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 32,
        "pad_token_id": 0,
    }
    bert = {
        "vocab_size": 100,
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 32,
    }
    gpt2 = {"vocab_size": 100, "n_embd": 16, "n_layer": 2, "n_head": 4}
    return [
        ("LlamaForCausalLM", lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**llama)), "model"),
        (
            "LlamaForSequenceClassification",
            lambda: tf.LlamaForSequenceClassification(tf.LlamaConfig(**llama)),
            "model",
        ),
        ("GPT2LMHeadModel", lambda: tf.GPT2LMHeadModel(tf.GPT2Config(**gpt2)), "transformer"),
        (
            "BertForSequenceClassification",
            lambda: tf.BertForSequenceClassification(tf.BertConfig(**bert)),
            "bert",
        ),
        ("BertForMaskedLM", lambda: tf.BertForMaskedLM(tf.BertConfig(**bert)), "bert"),
    ]


@pytest.mark.parametrize(
    ("name", "make", "attr"), _task_models(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_task_models_use_their_base_model(name: str, make: Callable[[], nn.Module], attr: str) -> None:
    torch.manual_seed(0)
    model = make().eval()
    assert type(model).__name__ == name
    base = getattr(model, attr)
    probe = probekit.build(probekit.preset("safety8k"), model)
    assert probe.backbone is base
    assert probe.layout.num_blocks == 2
    keys = set(probe.state_dict())
    assert all(k.startswith(("backbone.", "head.", "pooler.")) for k in keys)
    assert not any(part in k for k in keys for part in ("lm_head", "classifier", "score", ".cls."))
    assert {f"backbone.{n}" for n, _ in base.named_parameters()} <= keys
    ids, mask = make_batch(batch=2, tokens=5)
    probe.eval()
    with torch.no_grad():
        logits = probe(ids, mask)
        hidden = base(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        features = probe.features(ids, mask)
    assert logits.shape == (2, 2)
    m = mask.unsqueeze(-1).float()
    expected = (torch.stack(hidden[-3:]).mean(0) * m).sum(1) / m.sum(1)
    assert torch.allclose(features, expected, atol=1e-5)


def test_bert_own_pooler_is_dropped_so_every_trainable_parameter_gets_a_gradient() -> None:
    backbone = make_backbone("bert", 2, 16)
    assert backbone.pooler is not None
    probe = Probe(backbone, MaskedMeanSpec(layer=-1), LinearHeadSpec())
    assert backbone.pooler is None
    assert not any(name.startswith("pooler.") for name in probe.plan.trainable | probe.plan.frozen)
    ids, mask = make_batch()
    probe(ids, mask).sum().backward()
    assert all(p.grad is not None for p in probe.parameters() if p.requires_grad)
