"""Tiny random-init backbones of real transformers architectures, built in code (no download)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

FAMILIES = ("bert", "roberta", "deberta-v2", "distilbert", "gpt2", "llama", "mistral", "qwen2", "gemma")
"""Architectures the tests build; each maps to a config class and a bare model class."""

ENCODERS = ("bert", "roberta", "deberta-v2", "distilbert")
DECODERS = ("gpt2", "llama", "mistral", "qwen2", "gemma")


def make_backbone(family: str, num_layers: int = 4, hidden: int = 32, seed: int = 0) -> nn.Module:
    """A randomly initialised bare model of ``family`` in eval mode (vocabulary of 100 ids)."""
    import transformers as tf

    common: dict[str, Any] = {"vocab_size": 100}
    heads = 4
    if family == "gpt2":
        config = tf.GPT2Config(
            n_embd=hidden, n_layer=num_layers, n_head=heads, bos_token_id=0, eos_token_id=0, **common
        )
        model_cls: Any = tf.GPT2Model
    elif family == "distilbert":
        config = tf.DistilBertConfig(
            dim=hidden, n_layers=num_layers, n_heads=heads, hidden_dim=2 * hidden, pad_token_id=0, **common
        )
        model_cls = tf.DistilBertModel
    elif family in ("bert", "roberta", "deberta-v2"):
        cfg_cls, model_cls = {
            "bert": (tf.BertConfig, tf.BertModel),
            "roberta": (tf.RobertaConfig, tf.RobertaModel),
            "deberta-v2": (tf.DebertaV2Config, tf.DebertaV2Model),
        }[family]
        config = cfg_cls(
            hidden_size=hidden,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            intermediate_size=2 * hidden,
            max_position_embeddings=64,
            pad_token_id=1 if family == "roberta" else 0,
            **common,
        )
    else:
        cfg_cls, model_cls = {
            "llama": (tf.LlamaConfig, tf.LlamaModel),
            "mistral": (tf.MistralConfig, tf.MistralModel),
            "qwen2": (tf.Qwen2Config, tf.Qwen2Model),
            "gemma": (tf.GemmaConfig, tf.GemmaModel),
        }[family]
        extra = {"head_dim": hidden // heads} if family == "gemma" else {}
        config = cfg_cls(
            hidden_size=hidden,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=2,
            intermediate_size=2 * hidden,
            max_position_embeddings=64,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
            **extra,
            **common,
        )
    torch.manual_seed(seed)
    model = model_cls(config)
    model.eval()
    return model


def make_batch(
    batch: int = 3, tokens: int = 7, seed: int = 0, pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` with rows of different lengths (ids 2..99)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 100, (batch, tokens), generator=gen)
    lengths = [tokens - (i * 2) % tokens for i in range(batch)]
    mask = (torch.arange(tokens).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).long()
    ids = torch.where(mask.bool(), ids, pad_id)
    return ids, mask
