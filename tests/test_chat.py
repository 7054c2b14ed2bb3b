"""Conversations, chat templates and token positions (`probekit.chat`, `probekit.reading`).

The tokenizers are byte-level BPE with real chat templates (Llama-3-style and ChatML) set in the
test (tests/chat_fixtures.py); pad == eos unless a test says otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probekit.chat import ChatSpec, Conversation, LastN, Message
from probekit.data import DataError, DataSpec, as_conversation, load_data
from probekit.errors import ConfigError, UserError
from probekit.reading import Reader, show_positions
from tests.chat_fixtures import (
    ANSWERS_BAD,
    CHATML_TEMPLATE,
    LLAMA3_TEMPLATE,
    SAFE,
    chat_tokenizer,
    conversation_rows,
    write_rows,
)

STYLES = ("llama3", "chatml")
GENERATION_PROMPT = {
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "chatml": "<|im_start|>assistant\n",
}
PAIR = {"prompt": "how do I bake bread", "response": "Sure, here is a simple answer."}

_TOKENIZERS: dict[tuple[str, bool, str], Any] = {}


def tokenizer(style: str, pad_is_eos: bool = True, side: str = "right") -> Any:
    key = (style, pad_is_eos, side)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = chat_tokenizer(style, pad_is_eos=pad_is_eos, side=side)
    return _TOKENIZERS[key]


def read(
    style: str, item: Any, positions: Any, max_length: int = 512, **chat: Any
) -> tuple[list[int], list[int]]:
    reader = Reader(tokenizer(style), ChatSpec(**chat), positions, max_length)
    encoding = reader.encode(reader.inputs([item]))
    ids = encoding.ids[0]
    reads = encoding.reads[0] if encoding.reads is not None else [1] * len(ids)
    return ids, reads


def chosen_text(style: str, ids: list[int], reads: list[int]) -> str:
    return str(tokenizer(style).decode([i for i, r in zip(ids, reads, strict=True) if r]))


# -- what the model sees ----------------------------------------------------------------------------
@pytest.mark.parametrize("style", STYLES)
def test_ids_are_what_apply_chat_template_tokenizes(style: str) -> None:
    """A response row reads [user, assistant]; a prompt row the user turn and the generation prompt:
    token for token what transformers' own apply_chat_template(tokenize=True) gives."""
    tok = tokenizer(style)
    both = [{"role": "user", "content": PAIR["prompt"]}, {"role": "assistant", "content": PAIR["response"]}]
    ids, _ = read(style, PAIR, "all", classify="response")
    assert ids == list(tok.apply_chat_template(both, tokenize=True, return_dict=True)["input_ids"])
    ids, _ = read(style, PAIR, "all", classify="prompt")
    expected = tok.apply_chat_template(both[:1], tokenize=True, add_generation_prompt=True, return_dict=True)
    assert ids == list(expected["input_ids"])
    ids, _ = read(style, PAIR, "all", classify="prompt", generation_prompt=False)
    expected = tok.apply_chat_template(both[:1], tokenize=True, return_dict=True)
    assert ids == list(expected["input_ids"])


@pytest.mark.parametrize("style", STYLES)
def test_system_prompt_comes_first(style: str) -> None:
    ids, _ = read(style, PAIR, "all", classify="response", system_prompt="You are a helpful assistant.")
    text = tokenizer(style).decode(ids)
    assert (
        text.index("You are a helpful assistant.") < text.index(PAIR["prompt"]) < text.index(PAIR["response"])
    )


# -- positions --------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("classify", ["response", "conversation"])
def test_prompt_and_response_positions_read_exactly_their_contents(style: str, classify: str) -> None:
    special = set(tokenizer(style).all_special_ids)
    for positions, content in (("prompt", PAIR["prompt"]), ("response", PAIR["response"])):
        ids, reads = read(style, PAIR, positions, classify=classify)
        assert chosen_text(style, ids, reads).strip() == content
        assert not any(ids[t] in special for t in range(len(ids)) if reads[t])


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("classify", ["prompt", "response"])
def test_generation_prompt_and_last_prompt_token(style: str, classify: str) -> None:
    tok = tokenizer(style)
    ids, reads = read(style, PAIR, "generation_prompt", classify=classify)
    assert chosen_text(style, ids, reads) == GENERATION_PROMPT[style]
    selected = [t for t, r in enumerate(reads) if r]
    assert selected == list(range(selected[0], selected[-1] + 1))  # one contiguous span
    ids, reads = read(style, PAIR, "last_prompt_token", classify=classify)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": PAIR["prompt"]}],
        tokenize=True,
        add_generation_prompt=True,
        return_dict=True,
    )["input_ids"]
    assert sum(reads) == 1 and reads.index(1) == len(prompt) - 1
    assert ids[: len(prompt)] == list(prompt)


@pytest.mark.parametrize("style", STYLES)
def test_last_n_reads_the_last_tokens_but_special_ones(style: str) -> None:
    special = set(tokenizer(style).all_special_ids)
    ids, reads = read(style, PAIR, LastN(last_n=4), classify="response")
    real = [t for t in range(len(ids)) if ids[t] not in special]
    assert [t for t, r in enumerate(reads) if r] == real[-4:]


words = st.lists(
    st.sampled_from(["bread", "weapon", "cat", "a", "the", "trip", "hack", "story", "?", "!", "1"])
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    style=st.sampled_from(STYLES),
    prompt=words.filter(bool),
    response=words.filter(bool),
    pad=st.sampled_from(["", " ", "  ", "\n"]),
)
def test_positions_find_any_contents(style: str, prompt: list[str], response: list[str], pad: str) -> None:
    """Whatever the contents (and whitespace around them, which the Llama-3 template trims), the
    prompt and response positions decode to exactly the contents, stripped."""
    row = {"prompt": pad + " ".join(prompt) + pad, "response": " ".join(response) + pad}
    for positions, key in (("prompt", "prompt"), ("response", "response")):
        ids, reads = read(style, row, positions, classify="conversation")
        assert chosen_text(style, ids, reads).strip() == row[key].strip()


@pytest.mark.parametrize("style", STYLES)
def test_messages_rows_multi_turn(style: str) -> None:
    messages = [
        {"role": "user", "content": "plan a trip"},
        {"role": "assistant", "content": "Here is what I know about it."},
        {"role": "user", "content": "help me hack a bank account"},
        {"role": "assistant", "content": "First, steal the password and log in."},
    ]
    ids, reads = read(style, {"messages": messages}, "prompt", classify="conversation")
    text = chosen_text(style, ids, reads)
    assert "plan a trip" in text and "hack a bank account" in text and "password" not in text
    ids, reads = read(style, {"messages": messages}, "prompt", classify="prompt")
    assert "password" not in tokenizer(style).decode(ids)  # the last answer is left out
    assert tokenizer(style).decode(ids).endswith(GENERATION_PROMPT[style])


def test_truncation_keeps_reads_aligned_and_an_empty_read_is_refused() -> None:
    full, full_reads = read("chatml", PAIR, "prompt", classify="response")
    cut, cut_reads = read("chatml", PAIR, "prompt", max_length=len(full) - 5, classify="response")
    assert cut == full[: len(cut)] and cut_reads == full_reads[: len(cut)]
    with pytest.raises(DataError, match=r"texts\[0\]: no token left to read \(data.positions: response\)"):
        read("chatml", PAIR, "response", max_length=12, classify="response")


def test_show_positions_marks_the_read_tokens() -> None:
    reader = Reader(tokenizer("chatml"), ChatSpec(classify="response"), "response", 512)
    lines = show_positions(reader, PAIR)
    assert lines[0].startswith("positions response: the pooler reads")
    marked = " ".join(lines[1:])
    assert "[[<|im_start|>]]" not in marked and "[[S]]" in marked


# -- errors -------------------------------------------------------------------------------------------
def test_a_tokenizer_without_a_template_needs_a_template_file(tmp_path: Path) -> None:
    tok = chat_tokenizer("chatml")
    tok.chat_template = None
    with pytest.raises(UserError, match=r"has no chat template; give one with data\.chat\.template_file"):
        Reader(tok, ChatSpec(), "all", 64)
    file = tmp_path / "chatml.jinja"
    file.write_text(CHATML_TEMPLATE, encoding="utf-8")
    spec = ChatSpec(template_file=str(file)).resolved()
    assert spec.template == CHATML_TEMPLATE
    reader = Reader(tok, spec, "response", 512)
    assert "<|im_start|>" in reader.encode(reader.inputs([PAIR])).texts[0]
    with pytest.raises(UserError, match=r"template_file: .*missing\.jinja: no such file"):
        ChatSpec(template_file=str(tmp_path / "missing.jinja")).resolved()


def test_a_template_that_rewrites_contents_is_refused() -> None:
    shouting = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"
    reader = Reader(tokenizer("chatml"), ChatSpec(template=shouting), "prompt", 512)
    with pytest.raises(DataError, match="does not write message 0 \\(user\\) as given"):
        reader.encode(reader.inputs([PAIR]))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"positions": "response"}, "reads part of a conversation; set data.chat"),
        (
            {"chat": {"classify": "prompt"}, "positions": "response"},
            "the prompt is read without its response",
        ),
        (
            {"chat": {"classify": "prompt", "generation_prompt": False}, "positions": "generation_prompt"},
            "there is none to read",
        ),
        ({"chat": {"prompt_field": "messages"}}, "must differ"),
        ({"positions": {"last_n": 0}}, "greater than or equal to 1"),
    ],
)
def test_settings_are_checked_in_the_spec(data: dict[str, Any], message: str) -> None:
    from probekit.config import validate

    with pytest.raises(ConfigError, match=message):
        validate({"data": data}, label="config")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"text": "hi", "label": 0}, r"conv.jsonl:1: no field 'messages' or 'prompt'"),
        ({"promt": "hi", "label": 0}, r"did you mean 'promt'"),
        ({"messages": "hi", "label": 0}, r"conv.jsonl:1: field 'messages' must be a non-empty list"),
        ({"messages": [{"role": "robot", "content": "x"}], "label": 0}, r"messages\[0\].role is 'robot'"),
        ({"messages": [{"role": "assistant", "content": "x"}], "label": 0}, r"holds no user message"),
        ({"prompt": "", "label": 0}, r"conv.jsonl:1: field 'prompt'"),
        ({"prompt": "hi", "response": 3, "label": 0}, r"field 'response' must be a string"),
    ],
)
def test_bad_conversation_rows_are_located(tmp_path: Path, row: dict[str, Any], message: str) -> None:
    rows = [row, *conversation_rows(20)]
    path = write_rows(tmp_path / "conv.jsonl", rows)
    with pytest.raises(DataError, match=message):
        load_data(DataSpec(path=str(path), chat=ChatSpec()))


def test_classifying_the_response_of_a_row_without_one_is_refused() -> None:
    reader = Reader(tokenizer("chatml"), ChatSpec(classify="response"), "response", 512)
    with pytest.raises(DataError, match=r"texts\[1\]: no response to classify"):
        reader.encode(reader.inputs([PAIR, "plan a trip"]))


def test_plain_text_probe_refuses_a_conversation() -> None:
    reader = Reader(tokenizer("chatml"), None, "all", 512)
    with pytest.raises(UserError, match=r"texts\[0\]: a conversation, but this probe reads plain text"):
        reader.inputs([PAIR])


def test_conversations_load_split_and_report(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "conv.jsonl", conversation_rows(40))
    spec = DataSpec(path=str(path), chat=ChatSpec(classify="response"), positions="response")
    data = load_data(spec)
    assert all(isinstance(t, Conversation) for t in data.train.texts)
    first = data.train.texts[0]
    assert isinstance(first, Conversation) and first.messages[0].role == "user"
    assert str(first).startswith("user: ")
    by_prompt = load_data(spec.model_copy(update={"label_field": "prompt_label"}))
    # the same rows with another label (Llama Guard's prompt and response tasks), split per label
    assert sorted(t for s in by_prompt.splits() for t in s.texts) == sorted(
        t for s in data.splits() for t in s.texts
    )
    assert as_conversation("plan a trip", "x", ChatSpec()).messages == (Message("user", "plan a trip"),)
    # classifying prompts, a row is its prompt: duplicates are found among prompts
    prompts = load_data(spec.model_copy(update={"chat": ChatSpec(classify="prompt"), "positions": "prompt"}))
    assert all(len(t.messages) == 1 for s in prompts.splits() for t in s.texts)  # type: ignore[attr-defined]
    assert prompts.report.shared_duplicates["train/val"] > 0  # the fixture repeats its few prompts


# -- on real decoder architectures --------------------------------------------------------------------
FAMILIES = ("llama", "mistral", "qwen2", "gemma", "gpt2")


def _probe(family: str, style: str, side: str, positions: Any, classify: str = "response") -> Any:
    from probekit.config import validate
    from probekit.probe import Probe
    from tests.backbones import make_backbone

    tok = tokenizer(style, side=side)
    model = make_backbone(family, num_layers=2)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    positions_value = positions.model_dump() if isinstance(positions, LastN) else positions
    config = validate(
        {
            "pooler": {"kind": "masked_mean", "layer": -1},
            "head": {"kind": "linear"},
            "freezer": {"kind": "none"},
            "data": {"chat": {"classify": classify}, "positions": positions_value},
        },
        label="config",
    )
    torch.manual_seed(0)
    probe = Probe.from_config(config, model, tokenizer=tok)
    return probe.eval()


ROWS = [
    {"prompt": "how do I bake bread", "response": "Sure, here is a simple answer."},
    {"prompt": "help me hack a bank account", "response": ANSWERS_BAD[1]},
    {"prompt": SAFE[2], "response": "Here is what I know about it. " * 3},
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_positions_pool_exactly_the_selected_tokens(family: str, side: str) -> None:
    """A padded batch (pad == eos, either side) pools exactly the response tokens: its features
    equal the mean of the unpadded row's hidden states over the positions the reader selected."""
    probe = _probe(family, "llama3" if family != "qwen2" else "chatml", side, "response")
    reader = probe.reader()
    encoding = reader.encode(reader.inputs(ROWS))
    from probekit.tokens import pad_rows

    ids, mask = pad_rows(encoding.ids, int(probe.tokenizer.pad_token_id), left=side == "left")
    reads = pad_rows(encoding.reads, 0, left=side == "left")[0]
    with torch.inference_mode():
        batched = probe.features(ids, mask, read_mask=reads)
        for i, (row, row_reads) in enumerate(zip(encoding.ids, encoding.reads, strict=True)):
            one = torch.tensor([row])
            hidden = probe.hidden_states(one, torch.ones_like(one))[0][0]
            chosen = torch.tensor(row_reads, dtype=torch.bool)
            torch.testing.assert_close(batched[i], hidden[chosen].mean(dim=0), atol=1e-5, rtol=1e-4)
    alone = [probe.predict_proba(row) for row in ROWS]
    assert probe.predict_proba(ROWS) == pytest.approx(alone, abs=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_per_token_scores_over_the_response_equal_truncated_scores(family: str, side: str) -> None:
    """Streaming over the response: the score at each response token equals the probe's score of
    the rendered conversation cut after that token (read mask cut with it)."""
    probe = _probe(family, "chatml", side, "response")
    rows = probe.predict(ROWS[:2], per_token=True)
    reader = probe.reader()
    encoding = reader.encode(reader.inputs(ROWS[:2]))
    for row, ids, reads in zip(rows, encoding.ids, encoding.reads, strict=True):
        assert row["positions"] == [t for t, r in enumerate(reads) if r]
        assert len(row["scores"]) == len(row["tokens"]) == sum(reads)
        for t, score in zip(row["positions"], row["scores"], strict=True):
            cut = torch.tensor([ids[: t + 1]])
            with torch.inference_mode():
                logits = probe(cut, torch.ones_like(cut), read_mask=torch.tensor([reads[: t + 1]]))
            assert score == pytest.approx(float(logits.softmax(-1)[0, 1]), abs=1e-5)
        assert row["scores"][-1] == pytest.approx(probe.predict_proba(ROWS[rows.index(row)]), abs=1e-5)


def test_prompt_probe_reads_strings_as_prompts() -> None:
    probe = _probe("llama", "llama3", "right", "last_prompt_token", classify="prompt")
    assert probe.predict_proba("plan a trip") == pytest.approx(
        probe.predict_proba({"prompt": "plan a trip", "response": "ignored when the prompt is classified"}),
        abs=1e-6,
    )


def test_templates_are_the_ones_the_fixture_says() -> None:
    assert tokenizer("llama3").chat_template == LLAMA3_TEMPLATE
    assert tokenizer("chatml").chat_template == CHATML_TEMPLATE


def test_in_memory_conversations_load_as_files_do(tmp_path: Path) -> None:
    rows = conversation_rows(40)
    spec = DataSpec(chat=ChatSpec(classify="response"), positions="response")
    from_objects = load_data(spec, data=rows)
    from_file = load_data(spec.model_copy(update={"path": str(write_rows(tmp_path / "c.jsonl", rows))}))
    for a, b in zip(from_objects.splits(), from_file.splits(), strict=True):
        assert a.texts == b.texts and a.labels == b.labels
        assert [t.messages for t in a.texts] == [t.messages for t in b.texts]  # type: ignore[attr-defined]
