"""Data loading: JSONL, CSV and parquet files -> train/val/test splits of (text, class index).

A `DataSpec` says where the data is: one file that probekit splits (stratified by class, with a
seed), a folder holding ``train.*``, ``val.*`` and optionally ``test.*``, three separate files,
or nothing at all for the shipped demo dataset. `load_data` reads it, checks every record and
returns a `Dataset`:

```python
from probekit.data import DataSpec, load_data

data = load_data(DataSpec(path="prompts.jsonl", label_map={"safe": 0, "unsafe": 1}))
data.train.texts, data.train.labels, data.label_map
print("\\n".join(data.report.lines()))
```

Every problem raises `DataError` with one line naming its place: ``file:line`` for JSONL and
CSV (CSV lines count the header as line 1, and a record spanning several lines is named by its
first), ``file: row N`` for parquet (``row 1`` is the first row), then the field and what was
found there.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import io
import json
import os
import random
import re
import stat
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import IO, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from probekit import jsonio
from probekit.chat import ROLES as CHAT_ROLES
from probekit.chat import ChatSpec, Conversation, Message, Positions
from probekit.errors import DataError, did_you_mean
from probekit.spec import PathText

__all__ = [
    "DEFAULT_MAX_TEXT_CHARS",
    "FORMAT_SUFFIXES",
    "DataError",
    "DataReport",
    "DataSpec",
    "Dataset",
    "Split",
    "TextTypeError",
    "TextValueError",
    "check_data_file",
    "check_text",
    "check_texts",
    "field_text",
    "is_invisible",
    "load_data",
    "read_records",
    "read_text_lines",
    "stored_data_spec",
    "stream_text_lines",
    "text_problem",
]

FORMAT_SUFFIXES: dict[str, str] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
}
"""File suffix (lower case) -> the format ``format="auto"`` reads it as (``.json`` is JSON Lines)."""

_FORMATS = ("jsonl", "csv", "parquet")
_BOM = b"\xef\xbb\xbf"
_CSV_INT = re.compile(r"[+-]?[0-9]+")
_SHOWN = 12  # at most this many names in a listing

DEFAULT_MAX_TEXT_CHARS = 1_000_000
"""The default of `DataSpec.max_text_chars`: the most characters one text may hold."""
_LINE_SLACK = 64 * 1024  # bytes a JSON Lines record may hold beyond 4 bytes per text character
_CSV_FIELD_LIMIT = 131072  # the csv module's default bound on one field, in characters
_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # universal newlines, as text mode reads them


class TextValueError(DataError, ValueError):
    """A text given to predict is empty, only invisible characters, or not valid Unicode."""


class TextTypeError(DataError, TypeError):
    """Something other than a string was given where predict expects a text."""


# -- texts ---------------------------------------------------------------------------------------
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp", "Co", "Cn", "Cs"})
"""Controls, format characters (zero-width, bidi, BOM), spaces and separators, private use,
unassigned and surrogate code points."""
_INVISIBLE_MORE = frozenset(
    chr(code)
    for code in (
        *(0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x180B, 0x180C, 0x180D, 0x180F, 0x2800, 0x3164, 0xFFA0),
        *range(0xFE00, 0xFE10),  # variation selectors
        *range(0xE0100, 0xE01F0),  # variation selectors supplement
    )
)
"""Default-ignorable (or blank) code points of other categories: grapheme joiner, Hangul fillers,
Khmer inherent vowels, Mongolian variation selectors, braille blank, variation selectors."""
_SURROGATE = re.compile("[\ud800-\udfff]")
_SHOWN_CHARS = 5


def is_invisible(char: str) -> bool:
    """True for a character that shows nothing: whitespace, a control or format character
    (zero-width space, BOM, bidi marks), a private-use, unassigned or surrogate code point."""
    return char in _INVISIBLE_MORE or unicodedata.category(char) in _INVISIBLE_CATEGORIES


def text_problem(text: str, max_chars: int | None = None) -> str | None:
    """Why ``text`` cannot be classified, or ``None``: more than ``max_chars`` characters, empty
    or only whitespace, only invisible characters (`is_invisible`; naming them), or a lone
    surrogate (not valid Unicode). The same check serves data rows, ``predict --input`` and
    `Probe.predict`; a text holding invisible characters among visible ones is fine."""
    if max_chars is not None and len(text) > max_chars:
        return (
            f"holds {len(text)} characters; data.max_text_chars is {max_chars}; "
            "shorten the text or raise data.max_text_chars"
        )
    if not text or text.isspace():
        return f"is empty (got {_short(text)})"
    if all(is_invisible(char) for char in text):  # stops at the first visible character
        return f"has only invisible characters ({_code_points(text)})"
    lone = _SURROGATE.search(text)
    if lone is not None:
        return (
            f"holds a lone surrogate U+{ord(lone.group()):04X} at character {lone.start() + 1}, "
            "which is not valid Unicode"
        )
    return None


def _code_points(text: str) -> str:
    distinct = list(dict.fromkeys(text))
    shown = []
    for char in distinct[:_SHOWN_CHARS]:
        name = unicodedata.name(char, "")
        shown.append(f"U+{ord(char):04X}" + (f" {name}" if name else ""))
    more = f", ... ({len(distinct)} distinct)" if len(distinct) > _SHOWN_CHARS else ""
    return ", ".join(shown) + more


def check_text(text: str, place: str, max_chars: int | None = None, field: str | None = None) -> str:
    """Return ``text`` if `text_problem` finds nothing, else raise `TextValueError` naming ``place``
    (``file:line``, ``texts[3]``, ``text argument 2 of 3``) and ``field`` when there is one."""
    problem = text_problem(text, max_chars)
    if problem is None:
        return text
    raise TextValueError(f"{place}: " + (f"field {field!r} " if field is not None else "") + problem)


def check_texts(texts: object, max_chars: int | None = None) -> tuple[list[str], bool]:
    """The texts given to `Probe.predict` as a list, and whether a single string was given.

    Raises:
        TextTypeError: bytes, something that is not a string or an iterable, or a non-string item
            (``texts[3]: expected a string, got int 123``).
        TextValueError: an empty or invisible-only text, or one that `text_problem` refuses.
    """
    if isinstance(texts, str):
        return [check_text(texts, "text", max_chars)], True
    if isinstance(texts, (bytes, bytearray, memoryview)):
        raise TextTypeError(
            f"texts: expected a string or a sequence of strings, got {type(texts).__name__}; "
            "decode it first, e.g. data.decode('utf-8')"
        )
    try:
        items = list(texts)  # type: ignore[call-overload]
    except TypeError:
        raise TextTypeError(
            f"texts: expected a string or a sequence of strings, got {type(texts).__name__} {_short(texts)}"
        ) from None
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise TextTypeError(
                f"texts[{index}]: expected a string, got {type(item).__name__} {_short(item)}"
            )
        check_text(item, f"texts[{index}]", max_chars)
    return items, False


# -- the spec ------------------------------------------------------------------------------------
class DataSpec(BaseModel):
    """Where the training data is, how its records are read, and how one file is split.

    Give at most one source: `path` (a file to split, or a folder with ``train.*``, ``val.*`` and
    optionally ``test.*``), or `train` and `val` (and optionally `test`) as separate files, or
    neither for probekit's shipped demo dataset (split like one file).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    path: PathText | None = Field(
        default=None,
        description="A data file (split into train/val/test) or a folder holding train/val/test "
        "files; unset (with no train/val/test) for probekit's demo dataset.",
    )
    train: PathText | None = Field(default=None, description="Training file (with `val`).")
    val: PathText | None = Field(default=None, description="Validation file (with `train`).")
    test: PathText | None = Field(default=None, description="Optional test file.")
    text_field: str = Field(
        default="text", min_length=1, max_length=1000, description="Field (column) holding the text."
    )
    label_field: str = Field(
        default="label", min_length=1, max_length=1000, description="Field (column) holding the label."
    )
    label_fields: list[Annotated[str, Field(min_length=1, max_length=1000)]] | None = Field(
        default=None,
        min_length=1,
        max_length=10_000,
        description="Multi-label data with one column per label: the columns, each cell 0/1, "
        "true/false or null (unknown). Unset: labels come from label_field.",
    )
    label_map: dict[Annotated[str, Field(max_length=1000)], int] | None = Field(
        default=None,
        description="Label name -> class index (0..K-1, no gaps, one name per class). "
        "Required when labels are strings.",
    )
    val_fraction: float = Field(
        default=0.1, ge=0.0, lt=1.0, description="Share of each class put in val when splitting one file."
    )
    test_fraction: float = Field(
        default=0.1, ge=0.0, lt=1.0, description="Share of each class put in test when splitting one file."
    )
    split_seed: int = Field(
        default=0, ge=0, le=2**32 - 1, description="Seed of the stratified split of one file (0 .. 2^32-1)."
    )
    format: Literal["auto", "jsonl", "csv", "parquet"] = Field(
        default="auto",
        description="File format; `auto` goes by suffix "
        "(.jsonl/.ndjson/.json as JSON Lines, .csv, .parquet).",
    )
    max_text_chars: int = Field(
        default=DEFAULT_MAX_TEXT_CHARS,
        ge=1,
        le=2**31 - 1,
        description="The most characters one text may hold; a longer text is refused with its place "
        "(a JSON Lines line may hold at most 4 bytes per character plus 64 KiB). Also bounds the texts "
        "`probekit predict` reads for a run trained with it.",
    )

    chat: ChatSpec | None = Field(
        default=None,
        description="Rows are conversations rendered by a chat template (see probekit.chat); unset: "
        "rows are plain text in text_field.",
    )
    positions: Positions = Field(
        default="all",
        description="Tokens the pooler reads: `all` (every token of the attention mask, specials "
        "included), `prompt` or `response` (the user's or assistant's message contents), "
        "`generation_prompt` (the tokens that open the assistant's turn), `last_prompt_token` (the "
        "last of the prompt, generation prompt included), or `{last_n: k}`.",
    )

    in_memory: str | None = Field(
        default=None,
        max_length=1000,
        description="Set by `probekit.train(config, data=...)` when the data came as Python objects: "
        "what they were (e.g. `DataFrame, 600 rows`). Such a config reloads its data only when given "
        "them again; unset for files.",
    )

    @field_validator("label_map")
    @classmethod
    def _check_label_map(cls, value: dict[str, int] | None) -> dict[str, int] | None:
        if value is None:
            return None
        if not value:
            raise ValueError(
                "label_map is empty; map each label to a class index, e.g. {'safe': 0, 'unsafe': 1}"
            )
        indices = sorted(set(value.values()))
        if indices[0] < 0:
            bad = next(name for name, index in value.items() if index < 0)
            raise ValueError(f"label {bad!r} maps to {value[bad]}; class indices start at 0")
        gap = _first_gap(indices)
        if gap is not None:
            above = indices[gap]
            name = next(name for name, index in value.items() if index == above)
            shown = _join(indices[:_SHOWN]) + (
                f", ... ({len(indices)} in all)" if len(indices) > _SHOWN else ""
            )
            raise ValueError(
                f"class indices must run 0..K-1 without gaps; got {shown} (missing {gap}; "
                f"label {name!r} maps to {above})"
            )
        if len(indices) < 2:
            raise ValueError(f"label_map has a single class ({indices[0]}); a classifier needs at least two")
        if len(indices) < len(value):
            shared = Counter(value.values()).most_common(1)[0][0]
            names = [name for name, index in value.items() if index == shared]
            raise ValueError(
                f"label_map gives class {shared} several names ({_names(names)}); each class needs exactly "
                "one name, so relabel the data to merge classes"
            )
        return value

    @model_validator(mode="after")
    def _check_sources(self) -> DataSpec:
        given = [name for name in ("train", "val", "test") if getattr(self, name) is not None]
        if self.path is not None and given:
            raise ValueError(f"give either path or {'/'.join(given)}, not both")
        if self.in_memory is not None and (self.path is not None or given):
            files = "path" if self.path is not None else "/".join(given)
            raise ValueError(f"in_memory (data given as Python objects) and {files} (files) are both set")
        if given and (self.train is None or self.val is None):
            missing = [name for name in ("train", "val") if getattr(self, name) is None]
            raise ValueError(
                f"{' and '.join(given)} given without {' and '.join(missing)}; "
                "separate files need train and val (test is optional)"
            )
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction must be below 1 (train needs rows); "
                f"got {self.val_fraction} + {self.test_fraction}"
            )
        if self.positions in ("prompt", "response", "generation_prompt") and self.chat is None:
            raise ValueError(
                f"positions {self.positions!r} reads part of a conversation; set data.chat to read rows "
                "as conversations, or use all, last_prompt_token or last_n with plain text"
            )
        if self.chat is not None and self.chat.classify == "prompt" and self.positions == "response":
            raise ValueError(
                "positions 'response' with chat.classify 'prompt': the prompt is read without its response"
            )
        if (
            self.chat is not None
            and self.positions == "generation_prompt"
            and not (self.chat.generation_prompt or self.chat.classify != "prompt")
        ):
            raise ValueError(
                "positions 'generation_prompt' with chat.generation_prompt false: there is none to read"
            )
        if self.text_field == self.label_field:
            raise ValueError(f"text_field and label_field are both {self.text_field!r}; they must differ")
        if self.label_fields is not None:
            repeated = sorted({f for f in self.label_fields if self.label_fields.count(f) > 1})
            if repeated:
                raise ValueError(f"label_fields names {_names(repeated)} more than once")
            if self.text_field in self.label_fields:
                raise ValueError(f"label_fields holds the text_field {self.text_field!r}")
            if self.label_map is not None:
                raise ValueError("give label_fields (one column per label) or label_map, not both")
        return self


# -- results -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Split:
    """One split: texts and their class indices, in the order of the source file."""

    name: str
    """``"train"``, ``"val"`` or ``"test"``."""
    texts: tuple[str, ...]
    labels: tuple[Any, ...]
    """One per text: a class index ``0..K-1``; for multi-label data a tuple of L cells (``1.0``,
    ``0.0`` or ``nan`` for unknown); for regression a float (`probekit.targets`)."""
    source: str
    """Where it came from: the file, or ``"file (split seed N)"`` for a split of one file."""

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class DataReport:
    """Class balance per split and exact duplicates shared between splits (warnings, not errors)."""

    class_balance: dict[str, dict[int, int]]
    """Split name -> class index -> number of rows (every class ``0..K-1`` listed, zeros included)."""
    shared_duplicates: dict[str, int]
    """``"train/val"``, ``"train/test"``, ``"val/test"`` (pairs of the splits present) -> number of
    distinct texts found in both, compared after stripping, case folding and collapsing whitespace."""
    class_names: dict[int, str] = dataclasses.field(default_factory=dict)
    """Class index -> label name, where the lines show names (``safe: 500 (34.2%)``)."""
    target: str = "binary"
    """What the labels are (`load_data`'s ``target``)."""
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Multi-label: split -> label column -> positive, negative and unknown rows; regression:
    split -> the targets' mean, std, min and max."""

    def _target_lines(self) -> list[str]:
        """Per split: every label's positive/negative/unknown rows, or the targets' spread."""
        out: list[str] = []
        for name, per in self.stats.items():
            if self.target == "multilabel":
                rows = sum(next(iter(per.values())).values()) if per else 0
                parts = ", ".join(
                    f"{self.class_names.get(c, c)} {s['positive']}+/{s['negative']}-"
                    + (f"/{s['unknown']}?" if s["unknown"] else "")
                    for c, s in per.items()
                )
                out.append(f"{name}: {rows} rows; per label (positive+/negative-/unknown?) {parts}")
            else:
                out.append(
                    f"{name}: target mean {per['mean']:.4g}, std {per['std']:.4g}, "
                    f"min {per['min']:.4g}, max {per['max']:.4g}"
                )
        return out

    def lines(self) -> list[str]:
        """A human-readable summary: rows and class shares per split, then shared texts."""
        out: list[str] = self._target_lines()
        for name, counts in self.class_balance.items() if self.target != "multilabel" else ():
            total = sum(counts.values())
            parts = ", ".join(
                f"{self.class_names.get(index, index)}: {count} ({100.0 * count / (total or 1):.1f}%)"
                for index, count in sorted(counts.items())
            )
            out.append(f"{name}: {total} rows; per class {parts}")
        if self.shared_duplicates:
            pairs = ", ".join(f"{pair} {count}" for pair, count in self.shared_duplicates.items())
            out.append(f"texts shared between splits (case and whitespace folded): {pairs}")
        for pair, count in self.shared_duplicates.items():
            if count:
                first, second = pair.split("/")
                noun = "text appears" if count == 1 else "texts appear"
                out.append(
                    f"warning: {count} {noun} in both {first} and {second}; "
                    f"scores on {second} may be optimistic"
                )
        for name, counts in self.class_balance.items():
            absent = [index for index, count in sorted(counts.items()) if count == 0]
            if self.target == "multilabel" and absent:
                shown = [self.class_names.get(index, index) for index in absent]
                out.append(f"note: {name} has no positive row of label {_join(shown)}")
                continue
            if absent:
                shown = [self.class_names.get(index, index) for index in absent]
                out.append(f"note: {name} has no rows of class {_join(shown)}")
        return out


@dataclass(frozen=True)
class Dataset:
    """Loaded, checked and split data, ready for training."""

    train: Split
    val: Split
    test: Split | None
    label_map: dict[str, int]
    """Label name (as text: ``"0"``, ``"true"``, ``"unsafe"``) -> class index; stored with each run."""
    report: DataReport

    @property
    def num_classes(self) -> int:
        """Number of classes ``K`` (class indices run ``0..K-1``); labels for multi-label data, 0
        for regression."""
        return max(self.label_map.values(), default=-1) + 1

    def splits(self) -> tuple[Split, ...]:
        """The splits present, in the order train, val, test."""
        return (self.train, self.val) if self.test is None else (self.train, self.val, self.test)


# -- reading files -------------------------------------------------------------------------------
def read_records(
    path: Path, fmt: str = "auto", *, max_text_chars: int = DEFAULT_MAX_TEXT_CHARS
) -> list[tuple[int, dict[str, Any]]]:
    """Read every record of a JSONL, CSV or parquet file.

    Args:
        path: the file.
        fmt: ``"jsonl"``, ``"csv"``, ``"parquet"``, or ``"auto"`` to go by the suffix
            (see `FORMAT_SUFFIXES`).
        max_text_chars: bounds one record: a JSON Lines line may hold at most
            ``4 * max_text_chars`` bytes plus 64 KiB (checked before it is parsed; ``\\uXXXX``
            escapes take 6 bytes a character, so a text near the bound written with them may need
            a higher setting), a CSV field at most ``max(max_text_chars, 131072)`` characters. The
            texts themselves are checked against it by `load_data`.

    Returns:
        ``(number, record)`` pairs in file order: the 1-based line for JSONL and CSV (the line a
        record starts on; the CSV header is line 1), the 1-based row for parquet. CSV values are
        strings; JSONL and parquet values keep their types. Blank lines (and CSV rows of empty
        cells) are skipped.

    Raises:
        DataError: a missing or unreadable file, a folder, an unknown format, bad UTF-8 (with its
            byte offset), a line that is not a JSON object or repeats a key, a record past the size
            bound, malformed CSV, repeated column names, an empty file, a file with no records, or
            parquet without pyarrow installed.
    """
    path = Path(path)
    check_data_file(path)  # a missing file or a folder is named as such, whatever its suffix
    fmt = _resolve_format(path, fmt)
    if fmt == "jsonl":
        return _read_jsonl(path, max_text_chars)
    if fmt == "csv":
        return _read_csv(path, max_text_chars)
    return _read_parquet(path)


def _resolve_format(path: Path, fmt: str) -> str:
    if fmt in _FORMATS:
        return fmt
    if fmt != "auto":
        raise DataError(f"{path}: unknown data format {fmt!r} (known: auto, {', '.join(_FORMATS)})")
    found = FORMAT_SUFFIXES.get(path.suffix.lower())
    if found is None:
        suffix = f"suffix {path.suffix!r}" if path.suffix else "no suffix"
        raise DataError(
            f"{path}: cannot tell the format from {suffix}; name it "
            f"{', '.join(FORMAT_SUFFIXES)} or set data.format"
        )
    return found


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def _hub_hint(path: Path) -> str:
    """For a missing path shaped like a Hugging Face dataset id (``owner/name``): how to use one."""
    text = str(path)
    if path.is_absolute() or path.suffix.lower() in FORMAT_SUFFIXES or not _HUB_ID.fullmatch(text):
        return ""
    return (
        f"; {text!r} looks like a Hugging Face dataset id: probekit reads local data only, so load it "
        f"with datasets.load_dataset({text!r}) and pass it as probekit.train(config, data=...), or "
        "save_to_disk(FOLDER) and give that folder"
    )


def check_data_file(path: Path) -> None:
    """Refuse a path that does not exist, is a folder, or is not a regular file (or a pipe)."""
    try:
        info = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise DataError(f"{path}: no such file or folder{_hub_hint(path)}") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise DataError(
            f"{path}: is a folder; give one data file (a folder holding train.*, val.* and test.* files "
            "is for train --data)"
        )
    if not stat.S_ISREG(info.st_mode) and not stat.S_ISFIFO(info.st_mode):
        raise DataError(f"{path}: not a regular file")


def _read_bytes(path: Path) -> bytes:
    check_data_file(path)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _reject_utf16(path: Path, data: bytes) -> None:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(
            f"{path}:1: not valid UTF-8: the file starts with a UTF-16 byte order mark; save it as UTF-8"
        )


def _utf8_error(path: Path, data: bytes, line: int, offset: int, exc: UnicodeDecodeError) -> DataError:
    """``offset`` is where the decoded chunk starts in the file; ``exc.start`` is within the chunk."""
    at = offset + exc.start
    return DataError(
        f"{path}:{line}: not valid UTF-8: byte 0x{data[at]:02x} at byte offset {at} ({exc.reason})"
    )


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def _line_limit(max_text_chars: int) -> int:
    """The most bytes one JSON Lines line may hold: 4 per text character (UTF-8) plus 64 KiB."""
    return 4 * max_text_chars + _LINE_SLACK


def _read_jsonl(path: Path, max_text_chars: int = DEFAULT_MAX_TEXT_CHARS) -> list[tuple[int, dict[str, Any]]]:
    data = _read_bytes(path)
    _reject_utf16(path, data)
    limit = _line_limit(max_text_chars)
    start = len(_BOM) if data.startswith(_BOM) else 0
    records: list[tuple[int, dict[str, Any]]] = []
    for line, chunk in enumerate(data[start:].split(b"\n"), 1):
        offset = start
        start += len(chunk) + 1
        raw = chunk[:-1] if chunk.endswith(b"\r") else chunk
        if len(raw) > limit:  # before decoding or parsing it
            raise DataError(
                f"{path}:{line}: line holds {len(raw)} bytes; a record may hold at most {limit} "
                f"(4 bytes per character of data.max_text_chars={max_text_chars}, plus 64 KiB); "
                "shorten the text or raise data.max_text_chars"
            )
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _utf8_error(path, data, line, offset, exc) from None
        try:
            value = json.loads(text, object_pairs_hook=jsonio.unique_keys)
        except jsonio.RepeatedKeyError as exc:
            raise DataError(f"{path}:{line}: key {exc.key!r} appears twice in this record") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line}: not valid JSON: {exc.msg} (column {exc.colno})") from None
        except (ValueError, RecursionError) as exc:  # e.g. integers past the digit limit
            raise DataError(f"{path}:{line}: not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            hint = "; JSON Lines holds one object per line, not an array" if isinstance(value, list) else ""
            raise DataError(f"{path}:{line}: expected a JSON object, got {_json_type(value)}{hint}")
        records.append((line, value))
    if not records:
        raise DataError(f"{path}: empty file")
    return records


def _read_csv(path: Path, max_text_chars: int = DEFAULT_MAX_TEXT_CHARS) -> list[tuple[int, dict[str, Any]]]:
    limit = max(max_text_chars, _CSV_FIELD_LIMIT)
    previous = csv.field_size_limit(limit)  # process-wide: put back when done
    try:
        return _parse_csv(path, limit, max_text_chars)
    finally:
        csv.field_size_limit(previous)


def _read_utf8(path: Path) -> str:
    """The file's text: UTF-8, an optional byte-order mark dropped; bad bytes named by line and offset."""
    data = _read_bytes(path)
    _reject_utf16(path, data)
    start = len(_BOM) if data.startswith(_BOM) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, start + exc.start) + 1
        raise _utf8_error(path, data, line, start, exc) from None


def _parse_csv(path: Path, limit: int, max_text_chars: int) -> list[tuple[int, dict[str, Any]]]:
    text = _read_utf8(path)
    if not text.strip():
        raise DataError(f"{path}: empty file")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    header_line = 0
    records: list[tuple[int, dict[str, Any]]] = []
    while True:
        line = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            if "field larger than field limit" in str(exc):
                raise DataError(
                    f"{path}:{line}: a field holds more than {limit} characters; "
                    f"data.max_text_chars is {max_text_chars}; shorten the text or raise data.max_text_chars"
                ) from None
            raise DataError(f"{path}:{line}: not valid CSV: {exc}") from None
        if not any(cell.strip() for cell in row):
            continue
        if header is None:
            header, header_line = row, line
            repeated = [name for name, count in Counter(row).items() if count > 1]
            if repeated:
                raise DataError(f"{path}:{line}: column {repeated[0]!r} appears more than once in the header")
            continue
        if len(row) != len(header):
            raise DataError(
                f"{path}:{line}: row has {len(row)} fields but the header (line {header_line}) has "
                f"{len(header)} ({_names(header)}); quote fields that hold commas or quotes"
            )
        records.append((line, dict(zip(header, row, strict=True))))
    if header is None:
        raise DataError(f"{path}: empty file")
    if not records:
        raise DataError(f"{path}:{header_line}: no rows below the header ({_names(header)})")
    return records


def _read_parquet(path: Path) -> list[tuple[int, dict[str, Any]]]:
    check_data_file(path)
    try:
        pa = importlib.import_module("pyarrow")
        pq = importlib.import_module("pyarrow.parquet")
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from None
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    with handle:
        try:
            names = [str(name) for name in pq.read_schema(handle).names]
            repeated = [name for name, count in Counter(names).items() if count > 1]
            if not repeated:
                handle.seek(0)
                rows = pq.read_table(handle).to_pylist()
        except (pa.ArrowException, ValueError, OSError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"{path}: not a readable parquet file: {first}") from None
    if repeated:  # parquet allows them; a record (a dict) could keep only one
        raise DataError(f"{path}: column {repeated[0]!r} appears more than once (columns: {_names(names)})")
    if not rows:
        raise DataError(f"{path}: no rows")
    return [(number, dict(row)) for number, row in enumerate(rows, 1)]


# -- plain text: one text per line ---------------------------------------------------------------
def read_text_lines(path: Path, max_text_chars: int = DEFAULT_MAX_TEXT_CHARS) -> list[str]:
    """The texts of a plain text file, one per line (lines end with ``\\n``, ``\\r\\n`` or ``\\r``);
    blank lines are skipped.

    Raises:
        DataError: a missing file, a folder, bad UTF-8, or a line that `text_problem` refuses
            (only invisible characters, more than ``max_text_chars``), named ``file:line``.
    """
    path = Path(path)
    text = _read_utf8(path)
    texts: list[str] = []
    for number, raw in enumerate(_LINE_BREAK.split(text), 1):
        kept = _line_text(raw, f"{path}:{number}", max_text_chars)
        if kept is not None:
            texts.append(kept)
    return texts


def stream_text_lines(
    stream: IO[str], name: str = "<stdin>", max_text_chars: int = DEFAULT_MAX_TEXT_CHARS
) -> list[str]:
    """The texts of a text stream (standard input), one per line, read a bounded line at a time:
    a line longer than ``max_text_chars`` is refused before the rest of it is read. Blank lines
    are skipped; errors name ``<stdin>:line``."""
    texts: list[str] = []
    limit = max_text_chars + 2  # room for the line end
    number = 0
    while True:
        try:
            line = stream.readline(limit)
        except UnicodeDecodeError as exc:
            raise DataError(f"{name}: not valid UTF-8 after line {number}: {exc.reason}") from None
        if not line:
            return texts
        number += 1
        if len(line) >= limit and not line.endswith("\n"):
            raise DataError(
                f"{name}:{number}: line holds more than {max_text_chars} characters; data.max_text_chars "
                f"is {max_text_chars}; shorten the text or raise data.max_text_chars"
            )
        kept = _line_text(line, f"{name}:{number}", max_text_chars)
        if kept is not None:
            texts.append(kept)


def _line_text(line: str, place: str, max_chars: int) -> str | None:
    """A line without its line end, checked; ``None`` for a blank line (skipped)."""
    line = line.rstrip("\r\n")
    if not line.strip():
        return None
    return check_text(line, place, max_chars)


def stored_data_spec(data: Any, label: str = "the run's config") -> DataSpec:
    """The `DataSpec` of a run's stored config (its ``data`` section; defaults where absent)."""
    try:
        return DataSpec.model_validate(data if data is not None else {})
    except ValidationError as exc:
        first = exc.errors()[0]
        place = ".".join(str(part) for part in first["loc"])
        where = f"data.{place}" if place else "data"
        raise DataError(f"{label}: {where}: {first['msg']}") from None


# -- records -> texts and labels -----------------------------------------------------------------
@dataclass
class _Source:
    """The checked texts and raw labels of one file (or in-memory object), with their line (or
    row) numbers."""

    path: Path | str
    """The file, or what names an in-memory object in messages (``data['train']``)."""
    fmt: str
    """``jsonl``, ``csv``, ``parquet``, or ``memory`` (rows numbered from 0, as Python counts)."""
    numbers: list[int]
    texts: list[str]
    labels: list[Any]

    def where(self, index: int) -> str:
        number = self.numbers[index]
        return f"{self.path}: row {number}" if self.fmt in ("parquet", "memory") else f"{self.path}:{number}"


def _read_source(path: Path, spec: DataSpec) -> _Source:
    check_data_file(path)
    fmt = _resolve_format(path, spec.format)
    records = read_records(path, fmt, max_text_chars=spec.max_text_chars)
    return source_from_records(path, fmt, records, spec)


def source_from_records(
    origin: Path | str, fmt: str, records: Iterable[tuple[int, dict[str, Any]]], spec: DataSpec
) -> _Source:
    """Check ``(number, record)`` pairs with ``spec``'s fields: every record holds the text and
    label field(s), and its text passes `field_text`; errors name ``origin`` and the number."""
    source = _Source(origin, fmt, [], [], [])
    text_field, label_field = spec.text_field, spec.label_field
    chat = spec.chat
    for number, record in records:
        source.numbers.append(number)
        where = source.where(len(source.numbers) - 1)
        fields = [] if chat is not None else [(text_field, "text_field")]
        fields += (
            [(label_field, "label_field")]
            if spec.label_fields is None
            else [(name, "label_fields") for name in spec.label_fields]
        )
        for name, setting in fields:
            if name not in record:
                hint = did_you_mean(name, [str(key) for key in record])
                raise DataError(
                    f"{where}: no field {name!r} in this record (fields: {_names(record)})"
                    + (f"; {hint}" if hint else "")
                    + (
                        "; data.label_fields names it, so every record needs it"
                        if setting == "label_fields"
                        else f"; set data.{setting} to the field that holds the {setting.split('_')[0]}"
                    )
                )
        text = (
            field_text(record[text_field], where, text_field, spec.max_text_chars)
            if chat is None
            else conversation_from_record(record, where, chat, spec.max_text_chars)
        )
        if spec.label_fields is not None:
            source.texts.append(text)
            source.labels.append(tuple(record[name] for name in spec.label_fields))
            continue
        label = record[label_field]
        if fmt == "csv":
            label = _csv_label(label, spec.label_map)
        source.texts.append(text)
        source.labels.append(label)
    if not source.texts:
        raise DataError(f"{origin}: no rows; every split needs at least one")
    return source


def field_text(value: Any, where: str, field: str, max_chars: int | None = None) -> str:
    """The text a record's ``field`` holds, checked: not null, a string, and passing `text_problem`;
    else a `DataError` naming ``where`` (``file:line`` or ``file: row N``) and the field."""
    if value is None:
        raise TextTypeError(f"{where}: field {field!r} is null; every record needs a text")
    if not isinstance(value, str):
        raise TextTypeError(
            f"{where}: field {field!r} must be a string, got {_json_type(value)} {_short(value)}"
        )
    return check_text(value, where, max_chars, field)


def conversation_from_record(
    record: Mapping[str, Any], where: str, spec: ChatSpec, max_chars: int | None = None
) -> Conversation:
    """The conversation a data record holds: its ``messages_field`` list, or its ``prompt_field``
    and optional ``response_field``; a `probekit.data.DataError` naming ``where`` otherwise. With
    ``classify: prompt`` the last answer is left out (the row is its prompt), so reports and
    duplicate checks see what the probe classifies."""
    if spec.messages_field in record:
        raw = record[spec.messages_field]
        field = spec.messages_field
        if not isinstance(raw, list) or not raw:
            raise DataError(
                f"{where}: field {field!r} must be a non-empty list of {{role, content}} messages, "
                f"got {type(raw).__name__}"
            )
        messages = []
        for i, item in enumerate(raw):
            place = f"{field}[{i}]"
            if not isinstance(item, Mapping) or "role" not in item or "content" not in item:
                raise DataError(f"{where}: {place} must be a {{role, content}} mapping")
            role = item["role"]
            if role not in CHAT_ROLES:
                raise DataError(f"{where}: {place}.role is {role!r}; expected one of {', '.join(CHAT_ROLES)}")
            messages.append(Message(role, field_text(item["content"], where, f"{place}.content", max_chars)))
        if not any(m.role == "user" for m in messages):
            raise DataError(f"{where}: field {field!r} holds no user message")
        if spec.classify == "prompt" and messages[-1].role == "assistant":
            messages.pop()  # the prompt is classified: its answer is not part of the row
        return Conversation(messages)
    if spec.prompt_field not in record:
        hint = did_you_mean(spec.prompt_field, [str(k) for k in record])
        raise DataError(
            f"{where}: no field {spec.messages_field!r} or {spec.prompt_field!r} in this record "
            f"(fields: {', '.join(map(repr, record))})"
            + (f"; {hint}" if hint else "")
            + "; data.chat reads a conversation from either (see data.chat.messages_field, prompt_field)"
        )
    messages = [Message("user", field_text(record[spec.prompt_field], where, spec.prompt_field, max_chars))]
    response = record.get(spec.response_field)
    if response is not None and spec.classify != "prompt":
        messages.append(Message("assistant", field_text(response, where, spec.response_field, max_chars)))
    return Conversation(messages)


def as_conversation(item: Any, where: str, spec: ChatSpec) -> Conversation:
    """What `Probe.predict` takes from a chat probe's caller: a `Conversation`, a string (the user's
    prompt), or a mapping as a data record holds one (``{"prompt", "response"}`` or
    ``{"messages": [...]}``)."""
    if isinstance(item, Conversation):
        return item
    if isinstance(item, str):
        return Conversation([Message("user", check_text(item, where))])
    if isinstance(item, Mapping):
        return conversation_from_record(item, where, spec)
    raise TextTypeError(
        f"{where}: expected a string, a conversation mapping ({{'prompt': ..., 'response': ...}} or "
        f"{{'messages': [...]}}), got {type(item).__name__}"
    )


def _csv_label(cell: Any, label_map: dict[str, int] | None) -> Any:
    """CSV cells are text: a `label_map` key stays a string, an integer or true/false is converted."""
    if not isinstance(cell, str):
        return cell
    if label_map is not None and cell in label_map:
        return cell
    stripped = cell.strip()
    if not stripped:
        return None
    if _CSV_INT.fullmatch(stripped):
        return int(stripped)
    if stripped.lower() in {"true", "false"}:
        return stripped.lower() == "true"
    return cell


_KIND_NAMES = {bool: "boolean", int: "integer", str: "string"}


def _label_kind(value: Any, where: str, field: str) -> tuple[type, Any]:
    """The label's kind (bool, int or str) and its value (integral floats become ints)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(
            f"{where}: field {field!r} is {'null' if value is None else 'empty'}; every record needs a label"
        )
    if isinstance(value, bool):
        return bool, value
    if isinstance(value, int):
        return int, value
    if isinstance(value, float):
        if value.is_integer():
            return int, int(value)
        raise DataError(f"{where}: field {field!r}: label {value!r} is not a class index (an integer)")
    if isinstance(value, str):
        return str, value
    raise DataError(
        f"{where}: field {field!r}: a label must be an integer, boolean or string, got {_json_type(value)} "
        f"{_short(value)}"
    )


def _resolve_labels(
    sources: Sequence[_Source], spec: DataSpec, infer: bool = False
) -> tuple[list[list[int]], dict[str, int]]:
    """Class indices per source, and the label map stored with the run (built from the sorted
    string labels when ``infer`` and none is given)."""
    field = spec.label_field
    label_map = spec.label_map
    kinds: list[list[Any]] = []
    first: tuple[type, str] | None = None
    for source in sources:
        values: list[Any] = []
        for index, raw in enumerate(source.labels):
            where = source.where(index)
            kind, value = _label_kind(raw, where, field)
            if first is None:
                first = (kind, where)
            elif kind is not first[0]:
                raise DataError(
                    f"{where}: field {field!r}: {_KIND_NAMES[kind]} label {value!r}, but the first label "
                    f"({first[1]}) is {_article(_KIND_NAMES[first[0]])}; use one label type throughout"
                )
            values.append(value)
        kinds.append(values)
    assert first is not None  # every reader returns at least one record
    kind = first[0]

    if kind is bool:
        stored = dict(label_map) if label_map is not None else {"false": 0, "true": 1}
        return [[int(value) for value in values] for values in kinds], stored

    if kind is str:
        if label_map is None and infer:
            label_map = {name: index for index, name in enumerate(sorted({v for vs in kinds for v in vs}))}
        if label_map is None:
            names = sorted({value for values in kinds for value in values})
            example = {name: index for index, name in enumerate(names[:_SHOWN])}
            raise DataError(
                f"{first[1]}: field {field!r}: labels are strings ({_names(names)}); pass data.label_map "
                f"to give each a class index, e.g. {example}"
            )
        out: list[list[int]] = []
        for source, values in zip(sources, kinds, strict=True):
            indices = []
            for index, value in enumerate(values):
                if value not in label_map:
                    hint = did_you_mean(value, list(label_map))
                    raise DataError(
                        f"{source.where(index)}: field {field!r}: label {value!r} is not in data.label_map "
                        f"(keys: {_names(label_map)})" + (f"; {hint}" if hint else "")
                    )
                indices.append(label_map[value])
            out.append(indices)
        return out, dict(label_map)

    # integers: class indices
    for source, values in zip(sources, kinds, strict=True):
        for index, value in enumerate(values):
            if value < 0:
                raise DataError(
                    f"{source.where(index)}: field {field!r}: label {value} is negative; "
                    "class indices start at 0"
                )
    if label_map is not None:
        num_classes = max(label_map.values()) + 1
        for source, values in zip(sources, kinds, strict=True):
            for index, value in enumerate(values):
                if value >= num_classes:
                    raise DataError(
                        f"{source.where(index)}: field {field!r}: label {value} is outside "
                        f"0..{num_classes - 1} (data.label_map has {num_classes} classes)"
                    )
        return kinds, dict(label_map)
    seen = sorted({value for values in kinds for value in values})  # K distinct, bounded by the rows
    gap = _first_gap(seen)
    if gap is not None:
        where, value = next(
            (source.where(index), value)
            for source, values in zip(sources, kinds, strict=True)
            for index, value in enumerate(values)
            if value > gap
        )
        raise DataError(
            f"{where}: field {field!r}: label {value} but no row has label {gap}; class indices must run "
            "0..K-1 without gaps (or pass data.label_map)"
        )
    return kinds, {str(value): value for value in seen}  # seen is 0..K-1 here


# -- splitting -----------------------------------------------------------------------------------
def _half_up(value: float) -> int:
    return int(value + 0.5)


def _cut(size: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """Rows of one class (``size`` of them) given to val and to test; train keeps the rest (>= 1).

    Each gets its fraction rounded half up; with 3 or more rows val and test (when their fraction
    is above 0) get at least one; with 2, val gets one and test none; with 1, train keeps it.
    """
    if size < 2:
        return 0, 0
    if size == 2:
        return (1 if val_fraction > 0 else 0), 0
    counts = [_half_up(size * val_fraction), _half_up(size * test_fraction)]
    fractions = (val_fraction, test_fraction)
    for slot in (0, 1):
        if fractions[slot] > 0:
            counts[slot] = max(1, counts[slot])
    while counts[0] + counts[1] > size - 1:  # give a row back to train, from the most rounded-up
        slot = max(
            (slot for slot in (0, 1) if counts[slot] > 1),
            key=lambda slot: counts[slot] - size * fractions[slot],
        )
        counts[slot] -= 1
    return counts[0], counts[1]


def _split_indices(
    labels: Sequence[int], val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[int], list[int], list[int]]:
    """Row indices of train, val and test: each class's rows shuffled with `random.Random(seed)`
    (classes in index order, one generator) and cut by `_cut`; each split in file order."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    train: list[int] = []
    val: list[int] = []
    test: list[int] = []
    for label in sorted(by_class):
        rows = by_class[label]
        rng.shuffle(rows)
        n_val, n_test = _cut(len(rows), val_fraction, test_fraction)
        val += rows[:n_val]
        test += rows[n_val : n_val + n_test]
        train += rows[n_val + n_test :]
    return sorted(train), sorted(val), sorted(test)


# -- loading ---------------------------------------------------------------------------------------
def _demo_path() -> Path:
    try:
        module = importlib.import_module("probekit.datasets")
    except ModuleNotFoundError as exc:
        if exc.name not in {"probekit.datasets", "probekit"}:
            raise
        raise DataError(
            "the demo dataset (probekit.datasets) is not installed; set data.path or data.train and data.val"
        ) from None
    demo = getattr(module, "DEMO_SAFETY", None)
    if demo is None:
        raise DataError("probekit.datasets has no DEMO_SAFETY; set data.path or data.train and data.val")
    return Path(os.fspath(demo)) if isinstance(demo, (str, os.PathLike)) else Path(str(demo))


def _folder_files(folder: Path, spec: DataSpec) -> dict[str, Path]:
    suffixes = [s for s, f in FORMAT_SUFFIXES.items() if spec.format in {"auto", f}]
    try:
        entries = sorted(entry.name for entry in folder.iterdir())
    except OSError as exc:
        raise DataError(f"{folder}: cannot list the folder: {exc.strerror or exc}") from None
    found: dict[str, Path] = {}
    for name in ("train", "val", "test"):
        matches = [
            entry for entry in entries if Path(entry).stem == name and Path(entry).suffix.lower() in suffixes
        ]
        if len(matches) > 1:
            raise DataError(f"{folder}: more than one {name} file ({', '.join(matches)}); keep one")
        if matches:
            found[name] = folder / matches[0]
    missing = [name for name in ("train", "val") if name not in found]
    if missing:
        shown = ", ".join(entries[:_SHOWN]) + (
            f", ... ({len(entries)} in all)" if len(entries) > _SHOWN else ""
        )
        raise DataError(
            f"{folder}: no {' or '.join(missing)} file; a data folder holds train.*, val.* and optionally "
            f"test.* ({', '.join(suffixes)}); found: {shown or 'nothing'}"
        )
    return found


Target = Literal["binary", "multiclass", "multilabel", "regression"]
"""What a task reads from the labels (`load_data`)."""


def load_data(spec: DataSpec, *, target: Target = "binary", data: Any = None) -> Dataset:
    """Read, check and split the data a `DataSpec` points at.

    Args:
        spec: where the data is and how to read and split it.
        data: the data as Python objects instead of files (`probekit.memory`): records, columns,
            ``(texts, labels)``, a pandas DataFrame or a Hugging Face ``datasets.Dataset``, or a
            mapping of split name (``train``, ``val``/``validation``, ``test``) to one of these. One
            object is split like one file. ``spec``'s fields, label map and split settings apply.
        target: what the labels are. ``binary`` (the strict rules: string labels need
            ``data.label_map``, as which class is positive is never guessed; every class needs
            rows in train and val, where the threshold is chosen). ``multiclass``: string labels
            without ``data.label_map`` get one built from the data (the names sorted, class ``i``
            the ``i``-th name), and a class with no rows in val or test is a note of the report
            (it still needs rows in train). ``multilabel`` and ``regression``: see
            `probekit.targets`; one file is then split at random, not per class.

    Returns:
        The train, val and (when there is one) test splits, the label map to store with the run,
        and a `DataReport` of class balance and texts shared between splits. A single file (or the
        demo dataset) is split per class with ``random.Random(split_seed)``; each split keeps the
        file's order. ``test`` is ``None`` when no test file is given or the split left it empty.

    Raises:
        DataError: one line naming ``file:line`` (``file: row N`` for parquet, ``data['train']:
            row N`` for Python objects, counted from 0), the field and what was found: unreadable
            files, bad records, labels that do not map to classes, a single class in the data, or
            a class with no rows in train or val.
    """
    if data is not None:
        from probekit import memory

        return _from_sources(_memory_sources(memory.records(data, spec), spec), spec, target)
    if spec.in_memory is not None:
        raise DataError(
            f"data.in_memory: this config's data came as Python objects ({spec.in_memory}); give "
            "them again (probekit.train(config, data=...)) or set data.path to files"
        )
    if spec.train is not None and spec.val is not None:
        files = {"train": Path(spec.train), "val": Path(spec.val)}
        if spec.test is not None:
            files["test"] = Path(spec.test)
        return _from_sources({name: _read_source(path, spec) for name, path in files.items()}, spec, target)
    if spec.path is None:
        return _split_source(_read_source(_demo_path(), spec), spec, target)
    path = Path(spec.path)
    try:
        is_dir = path.is_dir()
    except OSError:
        is_dir = False
    if is_dir:
        from probekit import memory

        if memory.is_saved_dataset(path):
            return _from_sources(
                _memory_sources(memory.saved_dataset_records(path, spec), spec), spec, target
            )
        files = _folder_files(path, spec)
        return _from_sources({name: _read_source(file, spec) for name, file in files.items()}, spec, target)
    return _split_source(_read_source(path, spec), spec, target)


def _memory_sources(
    named: dict[str, tuple[str, Any]] | tuple[str, Any], spec: DataSpec
) -> dict[str, _Source] | _Source:
    """Checked sources of `probekit.memory`'s named records (rows counted from 0)."""
    if isinstance(named, tuple):
        return source_from_records(named[0], "memory", named[1], spec)
    return {split: source_from_records(name, "memory", rows, spec) for split, (name, rows) in named.items()}


def _from_sources(
    sources: dict[str, _Source] | _Source, spec: DataSpec, target: Target = "binary"
) -> Dataset:
    """Splits from named sources (``train``, ``val``, optionally ``test``), or one source split."""
    if isinstance(sources, _Source):
        return _split_source(sources, spec, target)
    files = list(sources)
    if target in ("multilabel", "regression"):
        rows, label_map = _targets(list(sources.values()), spec, target)
        splits = {
            name: Split(name, tuple(source.texts), tuple(values), str(source.path))
            for (name, source), values in zip(sources.items(), rows, strict=True)
        }
        _check_train(splits["train"].labels, label_map, target, str(sources["train"].path))
        return _dataset(splits, label_map, target)
    multiclass = target == "multiclass"
    labels, label_map = _resolve_labels(list(sources.values()), spec, infer=multiclass)
    _check_two_classes(list(sources.values()), labels, label_map, spec)
    splits = {
        name: Split(name, tuple(source.texts), tuple(indices), str(source.path))
        for (name, source), indices in zip(sources.items(), labels, strict=True)
    }
    num_classes = max(label_map.values()) + 1
    for name in files[: 1 if multiclass else 2]:
        counts = Counter(splits[name].labels)
        for index in range(num_classes):
            if not counts[index]:
                raise DataError(
                    f"{sources[name].path}: field {spec.label_field!r}: {name} has no rows of class "
                    f"{_class_name(label_map, index)}; every class needs rows in train"
                    + ("" if multiclass else " and val")
                )
    return _dataset(splits, label_map)


def _split_source(source: _Source, spec: DataSpec, target: Target = "binary") -> Dataset:
    path = source.path
    if spec.val_fraction == 0:
        raise DataError(f"{path}: data.val_fraction is 0, but splitting one file needs a validation share")
    origin = f"{path} (split seed {spec.split_seed})"
    if target in ("multilabel", "regression"):
        [values], label_map = _targets([source], spec, target)
        parts = _split_indices([0] * len(values), spec.val_fraction, spec.test_fraction, spec.split_seed)
        splits = {
            name: Split(name, tuple(source.texts[r] for r in rows), tuple(values[r] for r in rows), origin)
            for name, rows in zip(("train", "val", "test"), parts, strict=True)
            if rows
        }
        if "val" not in splits:
            raise DataError(
                f"{path}: {len(values)} rows leave none for val; give more rows or a larger val_fraction"
            )
        _check_train(splits["train"].labels, label_map, target, str(path))
        return _dataset(splits, label_map, target)
    multiclass = target == "multiclass"
    [labels], label_map = _resolve_labels([source], spec, infer=multiclass)
    _check_two_classes([source], [labels], label_map, spec)
    train, val, test = _split_indices(labels, spec.val_fraction, spec.test_fraction, spec.split_seed)
    counts = Counter(labels)
    num_classes = max(label_map.values()) + 1
    for name, rows in (("train", train), ("val", val))[: 1 if multiclass else 2]:
        present = {labels[row] for row in rows}
        for index in range(num_classes):
            if index not in present:
                have = counts[index]
                why = (
                    f"no row of {path} has it"
                    if have == 0
                    else f"{path} has only {have} row{'s' if have != 1 else ''} of it; "
                    "a split needs at least 2 per class (train and val)"
                )
                raise DataError(
                    f"{path}: field {spec.label_field!r}: {name} has no rows of class "
                    f"{_class_name(label_map, index)}: {why}"
                )
    splits = {
        name: Split(
            name, tuple(source.texts[row] for row in rows), tuple(labels[row] for row in rows), origin
        )
        for name, rows in (("train", train), ("val", val), ("test", test))
        if rows
    }
    return _dataset(splits, label_map)


def _check_two_classes(
    sources: Sequence[_Source], labels: Sequence[Sequence[int]], label_map: dict[str, int], spec: DataSpec
) -> None:
    classes = {index for indices in labels for index in indices}
    if len(classes) < 2:
        (only,) = classes
        files = ", ".join(str(source.path) for source in sources)
        raise DataError(
            f"{files}: field {spec.label_field!r}: every row has class {_class_name(label_map, only)}; "
            "a classifier needs at least two classes"
        )


def _targets(
    sources: Sequence[_Source], spec: DataSpec, target: Target
) -> tuple[list[list[Any]], dict[str, int]]:
    from probekit import targets

    if target == "multilabel":
        rows, label_map = targets.multilabel_targets(sources, spec)
        return list(rows), label_map
    return list(targets.regression_targets(sources, spec)), {}


def _check_train(labels: Sequence[Any], label_map: dict[str, int], target: Target, where: str) -> None:
    from probekit import targets

    if target == "multilabel":
        targets.check_multilabel_train(labels, label_map, where)
    else:
        targets.check_regression_train(labels, where)


def _dataset(splits: dict[str, Split], label_map: dict[str, int], target: Target = "binary") -> Dataset:
    from probekit import targets

    num_classes = max(label_map.values(), default=-1) + 1
    stats: dict[str, Any] = {}
    if target == "multilabel":
        stats = {name: targets.multilabel_stats(split.labels, label_map) for name, split in splits.items()}
        balance = {name: {c: s["positive"] for c, s in per.items()} for name, per in stats.items()}
    elif target == "regression":
        stats = {name: targets.regression_stats(split.labels) for name, split in splits.items()}
        balance = {}
    else:
        balance = {
            name: {index: Counter(split.labels)[index] for index in range(num_classes)}
            for name, split in splits.items()
        }
    folded = {name: {_fold(text) for text in split.texts} for name, split in splits.items()}
    shared = {f"{a}/{b}": len(folded[a] & folded[b]) for a, b in combinations(splits, 2)}
    return Dataset(
        train=splits["train"],
        val=splits["val"],
        test=splits.get("test"),
        label_map=label_map,
        report=DataReport(
            class_balance=balance,
            shared_duplicates=shared,
            class_names={index: name for name, index in label_map.items()},
            target=target,
            stats=stats,
        ),
    )


# -- small helpers -------------------------------------------------------------------------------
def _first_gap(indices: Sequence[int]) -> int | None:
    """The smallest index missing from ``indices`` (sorted, distinct, non-negative) below its
    largest, or ``None`` when they run 0..K-1. Never allocates by the values' size: with K
    indices, the largest is K-1 exactly when there is no gap."""
    if not indices or indices[-1] == len(indices) - 1:
        return None
    low, high = 0, len(indices) - 1  # indices[i] == i holds up to some point, then never again
    while low < high:
        middle = (low + high) // 2
        if indices[middle] == middle:
            low = middle + 1
        else:
            high = middle
    return low


def _fold(text: str) -> str:
    """The text compared for duplicates: stripped, case folded, whitespace runs as one space."""
    return " ".join(text.casefold().split())


def _join(values: Iterable[object]) -> str:
    return ", ".join(str(value) for value in values)


def _names(names: Iterable[object]) -> str:
    items = [repr(name) for name in names]
    shown = ", ".join(items[:_SHOWN])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _SHOWN else "") if items else "none"


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _class_name(label_map: dict[str, int], index: int) -> str:
    names = [name for name, value in label_map.items() if value == index]
    return f"{index} ({'/'.join(repr(name) for name in names)})" if names else str(index)


def read_split(
    path: str | Path,
    spec: DataSpec,
    label_map: dict[str, int],
    name: str = "eval",
    target: Target = "binary",
    *,
    records: Iterable[tuple[int, dict[str, Any]]] | None = None,
) -> Split:
    """Read one labelled file with ``spec``'s fields and format and a fixed ``label_map``.

    Used to evaluate a trained run on new data: labels are read exactly as in training (for the
    run's ``target``, as `load_data` reads them) and mapped through the run's stored label map.
    ``records``: the file's ``(number, record)`` pairs when the caller read them already
    (`read_records`), so the file is read once.
    """

    def source(fixed: DataSpec) -> _Source:
        if records is None:
            return _read_source(Path(path), fixed)
        return source_from_records(Path(path), _resolve_format(Path(path), fixed.format), records, fixed)

    if target in ("multilabel", "regression"):
        fixed = (
            spec
            if spec.label_fields is not None or not label_map
            else spec.model_copy(update={"label_map": dict(label_map)})
        )
        read = source(fixed)
        (values,), _ = _targets([read], fixed, target)
        return Split(name, tuple(read.texts), tuple(values), str(path))
    fixed = spec.model_copy(update={"label_map": dict(label_map)})
    read = source(fixed)
    (indices,), _ = _resolve_labels([read], fixed)
    return Split(name, tuple(read.texts), tuple(indices), str(path))
