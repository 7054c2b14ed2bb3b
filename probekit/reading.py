"""Reading a probe's inputs: conversations rendered by a chat template, tokenised, and the 0/1
mask of the tokens the pooler reads (``data.chat`` and ``data.positions``; see `probekit.chat`).

Training, evaluation, `Probe.predict` and the ``--dry-run`` view all go through `Reader`, so a
probe reads the same tokens wherever it runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from probekit.chat import ChatSpec, Conversation, LastN, Message, describe_positions
from probekit.data import DataError, as_conversation
from probekit.errors import UserError

__all__ = ["Encoding", "Reader", "Rendered", "Renderer", "reader_for", "show_positions"]


@dataclass(frozen=True)
class Rendered:
    """A conversation as the template writes it, with the character spans of its parts."""

    text: str
    prompt: tuple[tuple[int, int], ...]
    """User message contents."""
    response: tuple[tuple[int, int], ...]
    """Assistant message contents."""
    generation_prompt: tuple[int, int] | None
    """What the template adds to open the assistant's turn after the prompt (None when the
    conversation has no prompt end to mark, e.g. with ``generation_prompt: false``)."""
    prompt_end: int
    """Where the prompt (with its generation prompt when there is one) ends."""


class Renderer:
    """Renders conversations with a tokenizer's chat template (or ``spec.template``)."""

    def __init__(self, tokenizer: Any, spec: ChatSpec) -> None:
        self.tokenizer = tokenizer
        self.spec = spec
        self.template = spec.template or getattr(tokenizer, "chat_template", None)
        if not self.template:
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise UserError(
                f"data.chat: the tokenizer of {name} has no chat template; give one with "
                "data.chat.template_file (a Jinja file), or leave data.chat unset to read plain text"
            )

    def _render(self, messages: Sequence[Message], generation: bool) -> str:
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in messages],
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=generation,
            )
        except Exception as exc:  # a Jinja error (raise_exception in the template, syntax)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"data.chat: the chat template failed: {first}") from None
        if not isinstance(text, str):
            raise UserError("data.chat: the chat template did not render to text")
        return text

    def messages(self, conversation: Conversation) -> list[Message]:
        """The messages rendered for ``conversation``: the system prompt first, the answer dropped
        when the prompt is classified."""
        messages = list(conversation.messages)
        if self.spec.system_prompt and messages[0].role != "system":
            messages.insert(0, Message("system", self.spec.system_prompt))
        if self.spec.classify == "prompt" and messages[-1].role == "assistant":
            messages.pop()
        return messages

    def render(self, conversation: Conversation, where: str) -> Rendered:
        messages = self.messages(conversation)
        if self.spec.classify == "response" and messages[-1].role != "assistant":
            raise DataError(f"{where}: no response to classify (data.chat.classify: response)")
        answered = messages[-1].role == "assistant"
        prompt = messages[:-1] if answered else messages
        generation = answered or self.spec.generation_prompt
        full = self._render(messages, generation=not answered and generation)
        spans: dict[str, list[tuple[int, int]]] = {"user": [], "assistant": [], "system": []}
        for i, message in enumerate(messages):
            # Where the content starts: render the conversation up to this message with a marker
            # for its content; what comes before the marker must begin the whole rendering.
            marked = self._render([*messages[:i], Message(message.role, _MARK)], generation=False)
            span = _locate(full, marked, message.content)
            if span is None:
                raise DataError(
                    f"{where}: the chat template does not write message {i} ({message.role}) as given, "
                    "so its tokens cannot be found; probekit needs a template that writes each message's "
                    "content"
                )
            spans[message.role].append(span)
        bare = self._render(prompt, generation=False)
        opened = self._render(prompt, generation=True) if generation else bare
        if not full.startswith(opened):
            raise DataError(
                f"{where}: the chat template renders the prompt differently inside the whole conversation, "
                "so the prompt's end cannot be found"
            )
        gen = (
            (len(bare), len(opened))
            if generation and len(opened) > len(bare) and full.startswith(bare)
            else None
        )
        return Rendered(full, tuple(spans["user"]), tuple(spans["assistant"]), gen, len(opened))


_MARK = "\x00probekit-content\x00"
"""Stands in for a message's content when locating it (no template writes it on its own)."""


def _locate(full: str, marked: str, content: str) -> tuple[int, int] | None:
    """The span of ``content`` in ``full``: where ``marked`` (the rendering up to that message,
    the content replaced by `_MARK`) puts the mark, the text before it agreeing with ``full``;
    the content written as given or stripped of surrounding whitespace (Llama 3's ``| trim``)."""
    at = marked.find(_MARK)
    if at < 0 or not full.startswith(marked[:at]):
        return None
    for candidate in (content, content.strip()):
        if candidate and full.startswith(candidate, at):
            return at, at + len(candidate)
    return None


# -- reading: texts -> token ids and the tokens the pooler reads -----------------------------------
@dataclass
class Encoding:
    """Token ids of texts and, when positions select fewer than every token, a 0/1 read mask per row."""

    ids: list[list[int]]
    reads: list[list[int]] | None
    truncated: list[bool]
    texts: list[str]
    """What the tokenizer was given (a conversation's rendered text)."""


class Reader:
    """Turns a probe's inputs into token ids and read masks, by its ``data.chat`` and
    ``data.positions`` settings (`probekit.data.DataSpec`)."""

    def __init__(self, tokenizer: Any, chat: ChatSpec | None, positions: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.chat = chat
        self.positions = positions
        self.max_length = max_length
        self.renderer = Renderer(tokenizer, chat) if chat is not None else None

    @property
    def selects(self) -> bool:
        """Whether the pooler reads fewer tokens than the attention mask holds."""
        return bool(self.positions != "all")

    def inputs(self, items: Sequence[Any], where: str = "texts") -> list[str]:
        """The checked items: conversations for a chat probe (strings read as prompts), else strings."""
        if self.chat is None:
            for i, item in enumerate(items):
                if isinstance(item, (Conversation, Mapping)):
                    raise UserError(
                        f"{where}[{i}]: a conversation, but this probe reads plain text "
                        "(its data.chat is unset)"
                    )
            return list(items)
        return [as_conversation(item, f"{where}[{i}]", self.chat) for i, item in enumerate(items)]

    def encode(self, texts: Sequence[str], where: Any = None) -> Encoding:
        """Ids (truncated to ``max_length``) and read masks of ``texts``; ``where(i)`` names row i
        in errors."""
        from probekit.tokens import encode_texts

        place = where or (lambda i: f"texts[{i}]")
        if self.renderer is None:
            ids, truncated = encode_texts(self.tokenizer, texts, self.max_length)
            reads = None
            if self.selects:
                reads = [self._raw_reads(row, place(i)) for i, row in enumerate(ids)]
            return Encoding(ids, reads, truncated, list(texts))
        all_ids: list[list[int]] = []
        all_reads: list[list[int]] = []
        cut: list[bool] = []
        rendered_texts: list[str] = []
        for i, text in enumerate(texts):
            if not isinstance(text, Conversation):
                text = Conversation([Message("user", text)])
            rendered = self.renderer.render(text, place(i))
            row, read, was_cut = self._tokens(rendered, place(i))
            if not any(read):
                raise DataError(
                    f"{place(i)}: no token left to read (data.positions: "
                    f"{describe_positions(self.positions)}) within model.max_length={self.max_length} tokens"
                )
            all_ids.append(row)
            all_reads.append(read)
            cut.append(was_cut)
            rendered_texts.append(rendered.text)
        return Encoding(all_ids, all_reads if self.selects else None, cut, rendered_texts)

    def _special(self) -> set[int]:
        return set(getattr(self.tokenizer, "all_special_ids", []) or [])

    def _raw_reads(self, row: list[int], where: str) -> list[int]:
        special = self._special()
        real = [t for t, token in enumerate(row) if token not in special]
        read = [0] * len(row)
        if self.positions == "last_prompt_token":
            chosen = real[-1:]
        elif isinstance(self.positions, LastN):
            chosen = real[-self.positions.last_n :]
        else:  # prompt/response/generation_prompt need data.chat (DataSpec refuses them without)
            raise UserError(f"data.positions: {self.positions} needs conversations (set data.chat)")
        if not chosen:
            raise DataError(f"{where}: no token but special ones to read (data.positions)")
        for t in chosen:
            read[t] = 1
        return read

    def _tokens(self, rendered: Rendered, where: str) -> tuple[list[int], list[int], bool]:
        try:
            out = self.tokenizer(
                rendered.text, add_special_tokens=False, return_offsets_mapping=True, verbose=False
            )
        except NotImplementedError:
            raise UserError(
                "data.chat needs a fast tokenizer (character offsets); load the model's tokenizer with "
                "use_fast=True"
            ) from None
        ids = list(out["input_ids"])
        offsets = [tuple(o) for o in out["offset_mapping"]]
        special = self._special()
        read = self._select(rendered, ids, offsets, special)
        truncated = len(ids) > self.max_length
        if truncated:
            keep = (
                slice(len(ids) - self.max_length, None)
                if getattr(self.tokenizer, "truncation_side", "right") == "left"
                else slice(0, self.max_length)
            )
            ids, read = ids[keep], read[keep]
        return ids, read, truncated

    def _select(
        self, rendered: Rendered, ids: list[int], offsets: list[tuple[int, int]], special: set[int]
    ) -> list[int]:
        positions = self.positions
        n = len(ids)

        def inside(spans: Sequence[tuple[int, int]], skip_special: bool) -> list[int]:
            return [
                int(
                    any(s < e_tok and b_tok < e for s, e in spans for b_tok, e_tok in [offsets[t]])
                    and not (skip_special and ids[t] in special)
                    and offsets[t][1] > offsets[t][0]
                )
                for t in range(n)
            ]

        if positions == "all":
            return [1] * n
        if positions == "prompt":
            return inside(rendered.prompt, True)
        if positions == "response":
            return inside(rendered.response, True)
        if positions == "generation_prompt":
            if rendered.generation_prompt is None:
                return [0] * n
            return inside([rendered.generation_prompt], False)
        if positions == "last_prompt_token":
            ends = [
                t for t in range(n) if offsets[t][1] > offsets[t][0] and offsets[t][1] <= rendered.prompt_end
            ]
            read = [0] * n
            if ends:
                read[ends[-1]] = 1
            return read
        assert isinstance(positions, LastN)
        real = [t for t in range(n) if ids[t] not in special]
        read = [0] * n
        for t in real[-positions.last_n :]:
            read[t] = 1
        return read


def show_positions(reader: Reader, item: Any, width: int = 100, where: str = "example") -> list[str]:
    """Lines showing one example's tokens with the ones the pooler reads in ``[[...]]``; errors
    name it ``where``."""
    encoding = reader.encode([reader.inputs([item], where)[0]], lambda i: where)
    ids = encoding.ids[0]
    reads = encoding.reads[0] if encoding.reads is not None else [1] * len(ids)
    tokens = reader.tokenizer.convert_ids_to_tokens(ids)
    parts = [f"[[{tok}]]" if read else str(tok) for tok, read in zip(tokens, reads, strict=True)]
    lines, line = [], ""
    for part in parts:
        if line and len(line) + 1 + len(part) > width:
            lines.append(line)
            line = part
        else:
            line = f"{line} {part}" if line else part
    if line:
        lines.append(line)
    chosen = sum(reads)
    head = (
        f"positions {describe_positions(reader.positions)}: the pooler reads {chosen} of {len(ids)} tokens "
        "(marked [[...]])"
    )
    return [head, *lines]


def reader_for(tokenizer: Any, data: Any, max_length: int) -> Reader:
    """The `Reader` of a run's data settings (a `probekit.data.DataSpec`, or None for plain text
    read whole)."""
    chat = getattr(data, "chat", None)
    positions = getattr(data, "positions", "all")
    return Reader(tokenizer, chat.resolved() if chat is not None else None, positions, max_length)


def describe_reading(reader: Reader, example: Any, max_lines: int = 8) -> list[str]:
    """The ``--dry-run`` lines of how a probe reads its inputs, with ``example`` (a train row)
    shown token by token and the tokens the pooler reads marked."""
    chat = reader.chat
    if chat is None:
        what = "plain text"
    else:
        source = "the given chat template" if chat.template else "the tokenizer's chat template"
        what = f"conversations in {source}, classifying the {chat.classify}"
        if chat.system_prompt:
            what += ", with a system prompt"
    shown = show_positions(reader, example)
    tokens = shown[1:]
    if len(tokens) > max_lines:
        tokens = [*tokens[: max_lines - 1], f"... ({len(tokens) - max_lines + 1} more lines)"]
    return [f"reading: {what}; train row 0, {shown[0]}:", *[f"  {line}" for line in tokens]]
