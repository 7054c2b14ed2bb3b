"""Chat tokenizers, templates and conversation data made in code for the chat and positions tests.

The tokenizers are byte-level BPE (as GPT-2, Llama 3 and Qwen2 use) trained in a few
milliseconds on a small corpus, with a template's special tokens added, so offsets, merges and
leading spaces behave as in real chat models. No download."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
"""Llama-3-style: a BOS, headers around each role, contents trimmed, ``<|eot_id|>`` after each."""

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""ChatML (Qwen2-style): ``<|im_start|>role\\n...<|im_end|>\\n``, no BOS."""

SPECIALS = {
    "llama3": [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ],
    "chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
}

SAFE = ["how do I bake bread", "what is the capital of France", "tell me a story about a cat", "plan a trip"]
UNSAFE = ["how do I build a weapon", "help me hack a bank account", "write a threat to my neighbour"]
ANSWERS_OK = ["Sure, here is a simple answer.", "Here is what I know about it."]
ANSWERS_BAD = ["Step one: get the parts and assemble the weapon.", "First, steal the password and log in."]


def corpus() -> list[str]:
    return [
        *SAFE,
        *UNSAFE,
        *ANSWERS_OK,
        *ANSWERS_BAD,
        "You are a helpful assistant.",
        "system user assistant",
    ]


def chat_tokenizer(style: str, *, vocab: int = 300, pad_is_eos: bool = True, side: str = "right") -> Any:
    """A byte-level BPE fast tokenizer with ``style``'s template (``llama3`` or ``chatml``); the
    pad token is the end-of-sequence token when ``pad_is_eos``."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = SPECIALS[style]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(corpus() * 3, trainer=trainer)
    if style == "llama3":
        kwargs = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
        template = LLAMA3_TEMPLATE
    else:
        kwargs = {"eos_token": "<|im_end|>"}
        template = CHATML_TEMPLATE
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=core, **kwargs)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [s for s in specials if s not in kwargs.values()]}
    )
    tokenizer.pad_token = tokenizer.eos_token if pad_is_eos else None
    tokenizer.chat_template = template
    tokenizer.padding_side = side
    return tokenizer


def conversation_rows(n: int = 60, seed: int = 0) -> list[dict[str, Any]]:
    """Prompt/response rows: an unsafe prompt answered harmfully is label 1, everything else 0;
    ``prompt_label`` says whether the prompt alone is unsafe."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        bad_prompt = i % 2 == 1
        prompt = rng.choice(UNSAFE if bad_prompt else SAFE)
        complies = bad_prompt and i % 4 == 1
        response = rng.choice(ANSWERS_BAD if complies else ANSWERS_OK)
        rows.append(
            {"prompt": prompt, "response": response, "label": int(complies), "prompt_label": int(bad_prompt)}
        )
    return rows


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def save_chat_model(folder: Path, family: str, style: str, *, layers: int = 2, seed: int = 0) -> Path:
    """A tiny random ``family`` model (tests/backbones.py) with a ``style`` chat tokenizer."""
    from tests.backbones import make_backbone

    tokenizer = chat_tokenizer(style)
    model = make_backbone(family, num_layers=layers, seed=seed)
    model.resize_token_embeddings(len(tokenizer))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
