"""Reading backbones: locating blocks and embeddings, hidden states, early stopping, padding."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from probekit.backbone import KNOWN_LAYOUTS, locate, resolve_layers
from probekit.errors import BackboneError
from probekit.heads import LinearHeadSpec
from probekit.poolers import ClsSpec, LastTokenSpec, MaskedMeanSpec, MultiLayerSpec
from probekit.probe import Probe
from tests.backbones import DECODERS, ENCODERS, FAMILIES, make_batch

Factory = Callable[..., Any]

# family -> (path of the block list, the exact embedding parameter names of a tiny backbone)
EXPECTED_LAYOUT: dict[str, tuple[str, set[str]]] = {
    "bert": (
        "encoder.layer",
        {
            "embeddings.word_embeddings.weight",
            "embeddings.position_embeddings.weight",
            "embeddings.token_type_embeddings.weight",
            "embeddings.LayerNorm.weight",
            "embeddings.LayerNorm.bias",
        },
    ),
    "roberta": (
        "encoder.layer",
        {
            "embeddings.word_embeddings.weight",
            "embeddings.position_embeddings.weight",
            "embeddings.token_type_embeddings.weight",
            "embeddings.LayerNorm.weight",
            "embeddings.LayerNorm.bias",
        },
    ),
    "deberta-v2": (
        "encoder.layer",
        {
            "embeddings.word_embeddings.weight",
            "embeddings.position_embeddings.weight",
            "embeddings.LayerNorm.weight",
            "embeddings.LayerNorm.bias",
        },
    ),
    "distilbert": (
        "transformer.layer",
        {
            "embeddings.word_embeddings.weight",
            "embeddings.position_embeddings.weight",
            "embeddings.LayerNorm.weight",
            "embeddings.LayerNorm.bias",
        },
    ),
    "gpt2": ("h", {"wte.weight", "wpe.weight"}),
    "llama": ("layers", {"embed_tokens.weight"}),
    "mistral": ("layers", {"embed_tokens.weight"}),
    "qwen2": ("layers", {"embed_tokens.weight"}),
    "gemma": ("layers", {"embed_tokens.weight"}),
}

# parameters outside the blocks that are *not* embeddings (final norms, BERT's pooler)
NOT_EMBEDDINGS: dict[str, set[str]] = {
    "bert": {"pooler.dense.weight", "pooler.dense.bias"},
    "roberta": {"pooler.dense.weight", "pooler.dense.bias"},
    "gpt2": {"ln_f.weight", "ln_f.bias"},
    "llama": {"norm.weight"},
    "mistral": {"norm.weight"},
    "qwen2": {"norm.weight"},
    "gemma": {"norm.weight"},
}

LAYER_SETS = [(0,), (1,), (-1,), (0, 2), (-3, -2, -1)]


def _pad_id(family: str) -> int:
    return 1 if family == "roberta" else 0


def test_expected_layouts_cover_every_family() -> None:
    assert set(EXPECTED_LAYOUT) == set(FAMILIES)
    assert set(ENCODERS) | set(DECODERS) == set(FAMILIES)


# -- locate ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_layers", [3, 4])
def test_locate_finds_the_block_list(backbone_factory: Factory, family: str, num_layers: int) -> None:
    model = backbone_factory(family, num_layers)
    layout = locate(model)
    path, _ = EXPECTED_LAYOUT[family]
    assert layout.blocks_path == path
    assert layout.num_blocks == model.config.num_hidden_layers == num_layers
    assert layout.hidden_size == model.config.hidden_size == 32
    blocks = layout.blocks(model)
    assert blocks is model.get_submodule(path)
    assert isinstance(blocks, nn.ModuleList)
    assert len(blocks) == num_layers
    # every parameter of block b is attributed to b, and nothing else is
    in_blocks = set()
    for b, block in enumerate(blocks):
        for name, _ in block.named_parameters():
            full = f"{path}.{b}.{name}"
            assert layout.block_of(full) == b
            in_blocks.add(full)
    for name, _ in model.named_parameters():
        if name not in in_blocks:
            assert layout.block_of(name) is None, name


@pytest.mark.parametrize("family", FAMILIES)
def test_embedding_parameters_are_exactly_the_embeddings(backbone_factory: Factory, family: str) -> None:
    model = backbone_factory(family)
    layout = locate(model)
    names = [n for n, _ in model.named_parameters()]
    embeddings = {n for n in names if layout.is_embedding(n)}
    _, expected = EXPECTED_LAYOUT[family]
    assert embeddings == expected
    for name in NOT_EMBEDDINGS.get(family, set()):
        assert name in names
        assert not layout.is_embedding(name)
    assert not any(layout.is_embedding(n) for n in names if layout.block_of(n) is not None)


def test_deberta_relative_embeddings_count_as_embeddings() -> None:
    import transformers as tf

    config = tf.DebertaV2Config(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        relative_attention=True,
        position_buckets=8,
        norm_rel_ebd="layer_norm",
    )
    model = tf.DebertaV2Model(config)
    layout = locate(model)
    names = {n for n, _ in model.named_parameters()}
    assert {"encoder.rel_embeddings.weight", "encoder.LayerNorm.weight"} <= names
    assert layout.is_embedding("encoder.rel_embeddings.weight")
    assert layout.is_embedding("encoder.LayerNorm.weight")
    assert layout.is_embedding("embeddings.word_embeddings.weight")
    assert not layout.is_embedding("encoder.layer.0.attention.self.query_proj.weight")


# -- unknown architectures -------------------------------------------------------------------------
def _config(model_type: str, num_hidden_layers: int = 3, hidden_size: int = 8) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        model_type=model_type, num_hidden_layers=num_hidden_layers, hidden_size=hidden_size
    )


class NoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = _config("mystery")
        self.embed = nn.Embedding(10, 8)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
        self.extra = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])  # wrong length


class TwoBlockLists(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = _config("mystery")
        self.embed = nn.Embedding(10, 8)
        self.encoder_blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
        self.decoder_blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(hidden_states))


class Custom(nn.Module):
    """An unknown model_type with one ModuleList of length num_hidden_layers."""

    def __init__(self) -> None:
        super().__init__()
        self.config = _config("mystery")
        self.embed_tokens = nn.Embedding(10, 8)
        self.stack = nn.Module()
        self.stack.blocks = nn.ModuleList([Block() for _ in range(3)])
        self.heads = nn.ModuleList([nn.Linear(8, 8)])  # another ModuleList, of the wrong length
        self.final_norm = nn.LayerNorm(8)


@pytest.mark.parametrize(
    ("model_cls", "found"), [(NoBlocks, "found none"), (TwoBlockLists, "found 2 candidate")]
)
def test_unknown_architecture_raises_backbone_error(model_cls: type[nn.Module], found: str) -> None:
    with pytest.raises(BackboneError) as info:
        locate(model_cls())
    message = str(info.value)
    assert model_cls.__name__ in message
    assert "mystery" in message
    assert found in message
    assert "known model types" in message
    for known in ("bert", "gpt2", "llama", "distilbert"):
        assert known in message
    assert ", ".join(sorted(KNOWN_LAYOUTS)) in message


def test_two_candidates_are_named() -> None:
    with pytest.raises(BackboneError, match="encoder_blocks") as info:
        locate(TwoBlockLists())
    assert "decoder_blocks" in str(info.value)


def test_model_without_config_raises_backbone_error() -> None:
    with pytest.raises(BackboneError, match="Linear"):
        locate(nn.Linear(2, 2))


def test_unknown_model_type_falls_back_to_the_single_block_list() -> None:
    model = Custom()
    layout = locate(model)
    assert layout.model_type == "mystery"
    assert layout.blocks_path == "stack.blocks"
    assert layout.num_blocks == 3
    assert layout.blocks(model) is model.stack.blocks
    assert layout.hidden_size == 8
    assert layout.is_embedding("embed_tokens.weight")
    assert not layout.is_embedding("final_norm.weight")
    assert not layout.is_embedding("stack.blocks.0.proj.weight")
    assert layout.block_of("stack.blocks.2.proj.bias") == 2
    assert layout.block_of("heads.0.weight") is None


def test_known_model_type_with_a_moved_block_list_falls_back() -> None:
    model = Custom()
    model.config.model_type = "llama"  # the table says `layers`, which this model lacks
    layout = locate(model)
    assert layout.blocks_path == "stack.blocks"
    assert layout.num_blocks == 3


# -- hidden states ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(
    backbone_factory: Factory,
) -> dict[str, tuple[Any, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]]:
    """Per family: the model, a right-padded batch and HF's output_hidden_states."""
    out = {}
    for family in FAMILIES:
        model = backbone_factory(family)
        ids, mask = make_batch(batch=3, tokens=7, pad_id=_pad_id(family))
        with torch.no_grad():
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        assert len(hidden) == 5
        out[family] = (model, ids, mask, tuple(hidden))
    return out


def _assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    assert torch.equal(actual, expected) or (actual - expected).abs().max().item() < 1e-6


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layers", LAYER_SETS, ids=str)
def test_hidden_states_equal_output_hidden_states(
    reference: dict[str, Any], family: str, layers: tuple[int, ...]
) -> None:
    model, ids, mask, expected = reference[family]
    probe = Probe(model, MultiLayerSpec(layers=layers), LinearHeadSpec())
    assert probe.layers == tuple(i % 5 for i in layers)
    with torch.no_grad():
        got = probe.hidden_states(ids, mask)
    assert len(got) == len(layers)
    for index, hidden in zip(layers, got, strict=True):
        _assert_same(hidden, expected[index])


@settings(max_examples=15)
@given(
    family=st.sampled_from(["bert", "distilbert", "gpt2", "llama"]),
    layers=st.lists(st.integers(0, 4), min_size=1, max_size=5, unique=True),
    negate=st.lists(st.booleans(), min_size=5, max_size=5),
)
def test_hidden_states_for_any_layer_set(
    reference: dict[str, Any], family: str, layers: list[int], negate: list[bool]
) -> None:
    model, ids, mask, expected = reference[family]
    indices = tuple(i - 5 if neg else i for i, neg in zip(layers, negate, strict=False))
    probe = Probe(model, MultiLayerSpec(layers=indices), LinearHeadSpec())
    with torch.no_grad():
        got = probe.hidden_states(ids, mask)
    for index, hidden in zip(layers, got, strict=True):
        _assert_same(hidden, expected[index])


@pytest.mark.parametrize("family", FAMILIES)
def test_token_pooler_reads_the_requested_layer(reference: dict[str, Any], family: str) -> None:
    model, ids, mask, expected = reference[family]
    for layer in (0, 2, -1):
        probe = Probe(model, MaskedMeanSpec(layer=layer), LinearHeadSpec())
        with torch.no_grad():
            (hidden,) = probe.hidden_states(ids, mask)
            features = probe.features(ids, mask)
        _assert_same(hidden, expected[layer])
        m = mask.unsqueeze(-1).float()
        by_hand = (expected[layer] * m).sum(1) / m.sum(1)
        assert torch.allclose(features, by_hand, atol=1e-5)


# -- early stopping --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "distilbert", "gpt2", "llama"])
@pytest.mark.parametrize("layers", [(0,), (1,), (2,), (0, 2), (1, 3), (-2,), (-1,), (0, -1)], ids=str)
def test_blocks_above_the_highest_layer_do_not_run(
    backbone_factory: Factory, family: str, layers: tuple[int, ...]
) -> None:
    model = backbone_factory(family)
    blocks = locate(model).blocks(model)
    calls = [0] * len(blocks)

    def counter(index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, _output: Any) -> None:
            calls[index] += 1

        return hook

    handles = [block.register_forward_hook(counter(i)) for i, block in enumerate(blocks)]
    try:
        probe = Probe(model, MultiLayerSpec(layers=layers), LinearHeadSpec())
        ids, mask = make_batch(pad_id=_pad_id(family))
        with torch.no_grad():
            logits = probe(ids, mask)
    finally:
        for handle in handles:
            handle.remove()
    assert logits.shape == (3, 2)
    top = max(probe.layers)  # hidden state `top` is the output of block top - 1
    assert calls == [1 if b < top else 0 for b in range(len(blocks))]


def test_probe_leaves_no_hooks_behind(backbone_factory: Factory) -> None:
    model = backbone_factory("llama")
    blocks = locate(model).blocks(model)
    probe = Probe(model, MultiLayerSpec(layers=(0, 2)), LinearHeadSpec())
    ids, mask = make_batch()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)  # transformers may install its own hooks once
    before = [(dict(b._forward_hooks), dict(b._forward_pre_hooks)) for b in blocks]
    with torch.no_grad():
        probe(ids, mask)
    assert [(dict(b._forward_hooks), dict(b._forward_pre_hooks)) for b in blocks] == before
    # and the plain model still runs to its end afterwards
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert len(out.hidden_states) == 5


# -- resolve_layers --------------------------------------------------------------------------------
@given(num_blocks=st.integers(1, 40), data=st.data())
def test_resolve_layers_maps_negative_indices(num_blocks: int, data: st.DataObject) -> None:
    count = num_blocks + 1
    indices = data.draw(st.lists(st.integers(0, num_blocks), min_size=1, max_size=count, unique=True))
    signed = [i - count if data.draw(st.booleans()) else i for i in indices]
    assert resolve_layers(signed, num_blocks) == tuple(indices)


@given(num_blocks=st.integers(1, 40), data=st.data())
def test_resolve_layers_rejects_out_of_range(num_blocks: int, data: st.DataObject) -> None:
    count = num_blocks + 1
    bad = data.draw(st.one_of(st.integers(count, count + 50), st.integers(-count - 50, -count - 1)))
    with pytest.raises(BackboneError) as info:
        resolve_layers([0, bad], num_blocks, field="pooler.layers")
    message = str(info.value)
    assert message.startswith("pooler.layers:")
    assert f"layer {bad} " in message
    assert f"{count} hidden states" in message


@given(num_blocks=st.integers(1, 40), data=st.data())
def test_resolve_layers_rejects_aliases(num_blocks: int, data: st.DataObject) -> None:
    count = num_blocks + 1
    index = data.draw(st.integers(0, num_blocks))
    with pytest.raises(BackboneError) as info:
        resolve_layers([index, index - count], num_blocks, field="my.field")
    message = str(info.value)
    assert message.startswith("my.field:")
    assert f"hidden state {index} twice" in message


def test_probe_rejects_aliasing_and_missing_layers(backbone_factory: Factory) -> None:
    model = backbone_factory("bert")
    with pytest.raises(BackboneError, match=r"pooler\.layers: .*hidden state 4 twice"):
        Probe(model, MultiLayerSpec(layers=(-1, 4)), LinearHeadSpec())
    with pytest.raises(BackboneError, match=r"pooler\.layers: layer 5 .*5 hidden states"):
        Probe(model, MultiLayerSpec(layers=(1, 5)), LinearHeadSpec())
    with pytest.raises(BackboneError, match=r"layer -6 .*5 hidden states"):
        Probe(model, MultiLayerSpec(layers=(-6,)), LinearHeadSpec())


def test_token_pooler_out_of_range_names_its_own_field(backbone_factory: Factory) -> None:
    """A single-layer pooler is configured with ``pooler.layer``; the error must name that field."""
    model = backbone_factory("bert")
    with pytest.raises(BackboneError) as info:
        Probe(model, MaskedMeanSpec(layer=9), LinearHeadSpec())
    message = str(info.value)
    assert "5 hidden states" in message
    assert message.startswith("pooler.layer:"), message


# -- left vs right padding -------------------------------------------------------------------------
def _left_pad(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = ids.shape[1]
    lengths = mask.sum(dim=1).tolist()
    left_ids = torch.stack([torch.roll(row, tokens - n) for row, n in zip(ids, lengths, strict=True)])
    left_mask = torch.stack([torch.roll(row, tokens - n) for row, n in zip(mask, lengths, strict=True)])
    return left_ids, left_mask


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize(
    "pooler",
    [MaskedMeanSpec(), LastTokenSpec(), ClsSpec(), MultiLayerSpec(layers=(1, -1))],
    ids=lambda s: s.kind,
)
def test_left_and_right_padding_give_the_same_logits(
    backbone_factory: Factory, family: str, pooler: Any
) -> None:
    model = backbone_factory(family)
    ids, mask = make_batch(batch=4, tokens=7, seed=3, pad_id=_pad_id(family))
    left_ids, left_mask = _left_pad(ids, mask)
    assert not torch.equal(left_mask, mask)  # the batch really is padded differently
    assert bool((left_mask[:, 0] == 0).any())
    assert torch.equal(left_mask.sum(1), mask.sum(1))
    torch.manual_seed(0)
    probe = Probe(model, pooler, LinearHeadSpec()).eval()
    with torch.no_grad():
        right = probe(ids, mask)
        left = probe(left_ids, left_mask)
    assert torch.isfinite(left).all()
    assert torch.allclose(left, right, atol=1e-5), (left - right).abs().max()
