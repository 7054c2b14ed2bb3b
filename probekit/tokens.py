"""Tokenising texts for a probe: truncated to ``max_length`` tokens, with the work bounded by it.

Hugging Face tokenizers tokenise a whole string even with ``truncation=True`` and cut afterwards:
one 50 MB text costs gigabytes and minutes before 512 tokens of it are kept. `encode_texts` gives
exactly the ids of ``tokenizer(text, truncation=True, max_length=max_length)["input_ids"]`` while
tokenising only a prefix of a long text:

* texts of at most `prefix_chars` characters (the common case) are tokenised in one batched call,
  as they always were;
* a longer text goes through growing character prefixes, doubling from `prefix_chars`, until one
  gives more than ``max_length`` tokens or the whole text is used. A prefix ends where a word
  ends: before the last space of its second half that follows a non-space character. Every
  tokenizer that splits words at spaces (WordPiece, byte-level BPE, SentencePiece's metaspace,
  word-level) then sees the prefix's words exactly as in the whole text, so the prefix's first
  ``max_length`` ids are the text's. A prefix whose second half holds no such space (a long run
  without spaces: text in a script written without them, or a huge "word") is cut at its length
  and trusted only once the next, doubled prefix gives the same ``max_length`` ids. Doubling adds
  more than 128 characters, past WordPiece's 100-character word limit, so a word cut short there
  and the whole word both give ``[UNK]``.

A text that gives few tokens for many characters (long runs of spaces, one huge word) needs more
of it tokenised, at most all of it; `probekit.data.DataSpec.max_text_chars` bounds that for data
files and ``probekit predict``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["encode_texts", "pad_rows", "prefix_chars"]

_CHARS_PER_TOKEN = 8
_SLACK = 128
_WORD_END = re.compile(r" (?=\S)")
"""Searched in a reversed prefix: a space that follows (in the text) a non-space character."""


def prefix_chars(max_length: int) -> int:
    """Texts up to this many characters are tokenised whole; longer ones through prefixes from
    this length: ``8 * max_length + 128``."""
    return _CHARS_PER_TOKEN * max_length + _SLACK


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], list[bool]]:
    """Token ids of each text, truncated to ``max_length``, and whether each text needed more.

    Args:
        tokenizer: a Hugging Face tokenizer (called as ``tokenizer(text_or_texts, ...)``).
        texts: the texts.
        max_length: the most tokens (special tokens included) kept per text.

    Returns:
        ``(ids, truncated)``: ``ids[i] == tokenizer(texts[i], truncation=True,
        max_length=max_length)["input_ids"]``; ``truncated[i]`` is true when ``texts[i]`` gives
        more than ``max_length`` tokens. The tokenizer sees each text whole when it is short
        (all short texts in one batched call), else prefixes of it (see the module notes).
    """
    texts = list(texts)
    ids: list[list[int]] = [[] for _ in texts]
    truncated = [False] * len(texts)
    head = prefix_chars(max_length)
    # Left truncation keeps a text's end, and a max_length that leaves no room besides the special
    # tokens truncates nothing: prefixes would not do, so those texts go whole.
    whole = getattr(tokenizer, "truncation_side", "right") != "right" or max_length <= _specials(tokenizer)
    short = [i for i, text in enumerate(texts) if whole or len(text) <= head]
    if short:
        full = tokenizer([texts[i] for i in short], truncation=False, verbose=False)["input_ids"]
        over = []
        for i, row in zip(short, full, strict=True):
            ids[i] = list(row)
            if len(row) > max_length:
                over.append(i)
        if over:
            cut = tokenizer([texts[i] for i in over], truncation=True, max_length=max_length)["input_ids"]
            for i, row in zip(over, cut, strict=True):
                ids[i] = list(row)
                truncated[i] = True
    if not whole:
        for i, text in enumerate(texts):
            if len(text) > head:
                ids[i], truncated[i] = _encode_long(tokenizer, text, max_length, head)
    return ids, truncated


def _specials(tokenizer: Any) -> int:
    """How many special tokens the tokenizer adds to one text."""
    count = getattr(tokenizer, "num_special_tokens_to_add", None)
    if callable(count):
        return int(count())
    return len(tokenizer("")["input_ids"])


def _encode_long(tokenizer: Any, text: str, max_length: int, size: int) -> tuple[list[int], bool]:
    agreed: list[int] | None = None  # the ids of the last prefix cut inside a word, if it had enough
    while size < len(text):
        prefix, at_word_end = _prefix(text, size)
        count, row = _tokenise(tokenizer, prefix, max_length)
        if count > max_length:
            if at_word_end or row == agreed:
                return row, True
            agreed = row
        else:
            agreed = None
        size *= 2
    count, row = _tokenise(tokenizer, text, max_length)
    return row, count > max_length


def _prefix(text: str, size: int) -> tuple[str, bool]:
    """``text`` cut to at most ``size`` characters, and whether the cut is at the end of a word
    (the next character is a space and the last one is not); else it is cut at ``size``."""
    window = text[: size + 1]  # text[size] may be the space that ends the prefix
    found = _WORD_END.search(window[::-1], 0, len(window) - size // 2)
    if found is None:
        return text[:size], False
    return text[: len(window) - 1 - found.start()], True


def _tokenise(tokenizer: Any, text: str, max_length: int) -> tuple[int, list[int]]:
    """How many tokens ``text`` gives, and its ids truncated to ``max_length``."""
    full = tokenizer(text, truncation=False, verbose=False)["input_ids"]
    if len(full) <= max_length:
        return len(full), list(full)
    return len(full), list(tokenizer(text, truncation=True, max_length=max_length)["input_ids"])


def pad_rows(
    rows: Sequence[Sequence[int]], pad_id: int, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of ``rows`` padded with ``pad_id`` to the longest, on the left
    or the right."""
    width = max((len(row) for row in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        cols = slice(width - len(row), width) if left else slice(0, len(row))
        ids[b, cols] = torch.tensor(list(row), dtype=torch.long)
        mask[b, cols] = 1
    return ids, mask
