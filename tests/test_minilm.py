"""The real pretrained all-MiniLM-L6-v2 (6 blocks, width 384): freezing, hidden states, pooling."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import probekit
from probekit.heads import LinearHeadSpec
from probekit.poolers import MaskedMeanSpec, MultiLayerSpec
from probekit.probe import Probe

pytestmark = pytest.mark.slow

SENTENCES = [
    "How do I bake bread?",
    "What is a recipe for baking bread?",
    "The stock market fell today.",
    "A short one.",
]


@pytest.fixture(scope="module")
def batch(minilm: tuple[Any, Any]) -> dict[str, torch.Tensor]:
    _, tokenizer = minilm
    encoded = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert (encoded["attention_mask"] == 0).any()  # rows of different lengths: padding matters
    return dict(encoded)


def test_minilm_shape(minilm: tuple[Any, Any]) -> None:
    model, _ = minilm
    assert model.config.model_type == "bert"
    assert model.config.num_hidden_layers == 6
    assert model.config.hidden_size == 384


def test_safety8k_freezes_blocks_0_to_3(minilm: tuple[Any, Any]) -> None:
    model = copy.deepcopy(minilm[0])  # freezing mutates requires_grad; keep the shared model intact
    probe = probekit.build(probekit.preset("safety8k"), model)
    plan = probe.plan
    assert plan.num_blocks == 6
    assert plan.frozen_blocks == (0, 1, 2, 3)
    assert plan.trainable_blocks == (4, 5)
    assert plan.embeddings_frozen
    assert probe.layers == (4, 5, 6)
    for b, block in enumerate(model.encoder.layer):
        assert all(p.requires_grad == (b >= 4) for p in block.parameters()), b
    assert not any(p.requires_grad for p in model.embeddings.parameters())
    head = probe.head
    assert head[0].normalized_shape == (384,)
    assert (head[1].in_features, head[1].out_features) == (384, 128)


def test_hidden_states_equal_output_hidden_states(
    minilm: tuple[Any, Any], batch: dict[str, torch.Tensor]
) -> None:
    model, _ = minilm
    with torch.no_grad():
        expected = model(**batch, output_hidden_states=True).hidden_states
    assert len(expected) == 7
    probe = Probe(model, MultiLayerSpec(layers=tuple(range(7))), LinearHeadSpec())
    with torch.no_grad():
        got = probe.hidden_states(
            batch["input_ids"], batch["attention_mask"], token_type_ids=batch["token_type_ids"]
        )
    for i, (hidden, ref) in enumerate(zip(got, expected, strict=True)):
        assert hidden.shape == ref.shape
        assert (hidden - ref).abs().max().item() < 1e-6, i
    # a lower layer alone, read by an early stop, is the same tensor too
    probe = Probe(model, MultiLayerSpec(layers=(2,)), LinearHeadSpec())
    with torch.no_grad():
        (hidden,) = probe.hidden_states(batch["input_ids"], batch["attention_mask"])
    assert (hidden - expected[2]).abs().max().item() < 1e-6


def _mean_pooling(last_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' mean pooling, as on the all-MiniLM-L6-v2 model card."""
    expanded = mask.unsqueeze(-1).expand(last_hidden.size()).float()
    return torch.sum(last_hidden * expanded, 1) / torch.clamp(expanded.sum(1), min=1e-9)


@pytest.fixture(scope="module")
def pooled(minilm: tuple[Any, Any], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model, _ = minilm
    probe = Probe(model, MaskedMeanSpec(), LinearHeadSpec()).eval()
    with torch.no_grad():
        return probe.features(batch["input_ids"], batch["attention_mask"])


def test_masked_mean_equals_sentence_transformers_pooling(
    minilm: tuple[Any, Any], batch: dict[str, torch.Tensor], pooled: torch.Tensor
) -> None:
    model, _ = minilm
    with torch.no_grad():
        last = model(**batch).last_hidden_state
    expected = _mean_pooling(last, batch["attention_mask"])
    assert pooled.shape == (len(SENTENCES), 384)
    assert torch.allclose(pooled, expected, atol=1e-5, rtol=1e-5)
    # and not the plain mean over every position, padding included
    plain = last.mean(dim=1)
    assert not torch.allclose(pooled, plain, atol=1e-3)


def test_similar_sentences_are_closer(pooled: torch.Tensor) -> None:
    unit = torch.nn.functional.normalize(pooled, dim=-1)
    cos = unit @ unit.T
    bread, recipe, market = 0, 1, 2
    assert cos[bread, recipe] > 0.6
    assert cos[bread, recipe] > cos[bread, market] + 0.3
    assert cos[bread, recipe] > cos[recipe, market] + 0.3
