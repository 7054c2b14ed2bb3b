"""Conversations, chat templates and token positions: what text a probe reads, and which tokens.

A chat model sees a conversation inside its chat template, and a probe served on that traffic
must be trained on the same text. With ``data.chat`` set, a data row is a conversation (a
``messages`` list of ``{role, content}``, or ``prompt`` and optional ``response`` fields) and is
rendered by the tokenizer's own chat template (or one from a file), with an optional system
prompt and generation prompt. ``data.chat.classify`` picks what a row's label is about: the
prompt (the conversation up to its last answer, ending in the generation prompt), the response,
or the whole conversation (Llama Guard's prompt and response classification from the same rows).

``data.positions`` picks the tokens the pooler reads, found from the conversation's structure, not
from per-family patterns: the template is rendered message by message, each message's content is
located in the rendered text between the renderings before and after it, and the tokenizer's
character offsets map those spans to tokens. So a template need only write each message's content
as it is (or stripped of surrounding whitespace), which every template we know does. Special tokens
are never read by ``prompt`` or ``response``; padding is never read by any setting.

A conversation travels through loading, splitting and reports as a `Conversation`: a ``str``
holding a readable form (``user: ...`` lines), so reports, duplicate checks and prediction rows
work unchanged, carrying its messages for the template.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from probekit.errors import UserError
from probekit.spec import PathText

__all__ = [
    "ChatSpec",
    "Conversation",
    "LastN",
    "Positions",
    "Message",
    "describe_positions",
]

ROLES = ("system", "user", "assistant")
MAX_TEMPLATE_CHARS = 200_000


class LastN(BaseModel):
    """The last ``k`` tokens of what a row renders to (special tokens and padding excluded)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    last_n: int = Field(ge=1, le=1_000_000, description="How many of the last tokens the pooler reads.")


Positions = Annotated[
    Literal["all", "prompt", "response", "last_prompt_token", "generation_prompt"] | LastN,
    Field(description="Which tokens the pooler reads."),
]


class ChatSpec(BaseModel):
    """How conversation rows become the text a chat model sees (``data.chat``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    classify: Literal["prompt", "response", "conversation"] = Field(
        default="conversation",
        description="What a row's label is about: `prompt` (the conversation before its last answer, "
        "the answer left out), `response` (the last answer, read with its prompt), or the whole "
        "`conversation`.",
    )
    system_prompt: str | None = Field(
        default=None,
        min_length=1,
        max_length=100_000,
        description="A system message put first in every conversation that has none.",
    )
    generation_prompt: bool = Field(
        default=True,
        description="With classify: prompt, end the text with the template's generation prompt "
        "(what opens the assistant's turn), as the model sees it before it answers.",
    )
    template_file: PathText | None = Field(
        default=None,
        description="A Jinja chat template file used instead of the tokenizer's own (needed when the "
        "tokenizer has none); training stores its text in `template`.",
    )
    template: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_TEMPLATE_CHARS,
        description="The chat template's text (set from template_file by training, so a run folder "
        "does not depend on the file); unset: the tokenizer's own.",
    )
    messages_field: str = Field(
        default="messages", min_length=1, max_length=1000, description="Field holding a list of messages."
    )
    prompt_field: str = Field(
        default="prompt", min_length=1, max_length=1000, description="Field holding the user's prompt."
    )
    response_field: str = Field(
        default="response",
        min_length=1,
        max_length=1000,
        description="Field holding the assistant's response (optional per row).",
    )

    @model_validator(mode="after")
    def _check_fields(self) -> ChatSpec:
        names = [self.messages_field, self.prompt_field, self.response_field]
        if len(set(names)) < 3:
            raise ValueError("messages_field, prompt_field and response_field must differ")
        return self

    def resolved(self) -> ChatSpec:
        """This spec with ``template`` read from ``template_file`` (a clear error when unreadable)."""
        if self.template is not None or self.template_file is None:
            return self
        path = Path(self.template_file).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"data.chat.template_file: {path}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"data.chat.template_file: {path}: cannot read it ({exc})") from None
        if not text.strip() or len(text) > MAX_TEMPLATE_CHARS:
            raise UserError(
                f"data.chat.template_file: {path}: a chat template must hold 1 to "
                f"{MAX_TEMPLATE_CHARS} characters"
            )
        return self.model_copy(update={"template": text})


# -- conversations ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Message:
    role: str
    content: str


class Conversation(str):
    """A conversation: as a string, its readable form (one ``role: content`` line per message);
    ``messages`` holds the messages a chat template renders."""

    messages: tuple[Message, ...]

    def __new__(cls, messages: Sequence[Message]) -> Conversation:
        shown = "\n".join(f"{m.role}: {m.content}" for m in messages)
        made = super().__new__(cls, shown)
        made.messages = tuple(messages)
        return made

    def __reduce__(self) -> Any:  # keep the messages through copy and pickle
        return (Conversation, (self.messages,))

    @property
    def has_response(self) -> bool:
        return bool(self.messages) and self.messages[-1].role == "assistant"


def describe_positions(positions: Any) -> str:
    """A positions setting as a config writes it."""
    return f"last_n: {positions.last_n}" if isinstance(positions, LastN) else str(positions)
