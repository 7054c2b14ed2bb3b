"""Reading a run folder, which is untrusted input.

Someone may hand you a run folder, so nothing in it is believed until it is checked:

* **Nothing in it runs code.** No pickle is ever loaded (weights are safetensors, everything else
  JSON), and a model's own code runs only when the *caller* allows it: a run folder that says
  ``trust_remote_code: true`` is refused unless the caller passed ``--trust-remote-code``.
* **Nothing in it leads out of it.** Every file a run folder names is one bare file name (no
  ``/``, ``\\`` or ``..``, not absolute), and every file and folder probekit reads there
  (``probe.json``, the checkpoint folder, ``state/``, each ``state/step-*``, each manifest entry)
  must still lie inside the run folder once symlinks are resolved (`inside`).
* **Nothing in it skips validation.** ``probe.json``, ``state.json`` and ``manifest.json`` go
  through pydantic schemas with strict types and finite floats; a safetensors file has its
  header length checked against the file size (`load_safetensors`) before the safetensors
  library reads it, and its dtypes and values are checked after.
* **Nothing in it reaches the terminal raw.** A string taken from a run folder appears in a
  message only through `shown` (``repr``, capped), so control characters and terminal escape
  sequences are printed escaped.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import AfterValidator, AllowInfNan, Field, Strict, StringConstraints, ValidationError

from probekit import jsonio

MAX_SHOWN = 80
"""Characters of an untrusted value shown in a message (its ``repr``), at most."""
MAX_PATH_SHOWN = 300
"""Characters of a path from a run folder (a symlink's target) shown in a message, at most."""
MAX_MESSAGE = 400
"""Characters of a message composed elsewhere from untrusted text, at most (`printable`)."""
MAX_SAFETENSORS_HEADER = 100_000_000
"""The largest safetensors header accepted (the safetensors library's own limit)."""

BARE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")
"""A file name a run folder may give: one name, not hidden, no separators."""
DISTRIBUTION_NAME = re.compile(r"[A-Z0-9]|[A-Z0-9][A-Z0-9._-]*[A-Z0-9]", re.IGNORECASE)
"""A valid distribution (package) name (PEP 508)."""
HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
HUB_ID = re.compile(rf"{HUB_PART}(?:/{HUB_PART})?")
"""A Hugging Face hub id: ``name`` or ``org/name``."""
REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")
"""A branch, tag or commit of a hub model."""

# Strict scalar types for run-file schemas: no coercion ("1" is not 1, true is not 1), and
# floats are finite.
SInt = Annotated[int, Strict()]
SFloat = Annotated[float, Strict(), AllowInfNan(False)]
SStr = Annotated[str, Strict()]
SBool = Annotated[bool, Strict()]
Sha256 = Annotated[str, Strict(), StringConstraints(pattern=r"^[0-9a-f]{64}$")]
NonNegative = Annotated[int, Strict(), Field(ge=0)]


def _scalar(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError("a number, a string, a boolean or null was expected")


def _label(value: Any) -> Any:
    if isinstance(value, (bool, int, str)):
        return value
    raise ValueError("a label is an integer, a boolean or a string")


JSONScalar = Annotated[Any, AfterValidator(_scalar)]
"""A JSON number (nan allowed), string, boolean or null."""
Label = Annotated[Any, AfterValidator(_label)]
"""A label value: an integer, a boolean or a string."""


# -- showing untrusted text --------------------------------------------------------------------
def shown(value: object, limit: int = MAX_SHOWN) -> str:
    """``repr(value)`` capped at ``limit`` characters: how a value from a run folder is shown."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}... ({len(text)} characters)"


def printable(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` with every non-printable character escaped (a line break, an escape sequence),
    capped: for messages that other code composed from untrusted values."""
    escaped = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return escaped if len(escaped) <= limit else escaped[: limit - 3] + "..."


def is_bare_name(name: object) -> bool:
    """A file name a run folder may give: one name (no ``/``, ``\\``, ``..``), not absolute, not
    hidden, at most 255 characters."""
    return isinstance(name, str) and BARE_NAME.fullmatch(name) is not None and ".." not in name


def is_distribution_name(name: object) -> bool:
    """A valid PEP 508 distribution name of at most 100 characters."""
    return isinstance(name, str) and len(name) <= 100 and DISTRIBUTION_NAME.fullmatch(name) is not None


def is_hub_id(name: str) -> bool:
    """A well-formed Hugging Face hub id (``name`` or ``org/name``; no ``..``, ``--``, ``.git``)."""
    return (
        HUB_ID.fullmatch(name) is not None
        and ".." not in name
        and "--" not in name
        and not name.endswith(".git")
    )


def is_revision(ref: str) -> bool:
    """A sane git ref: a branch, tag or commit (no ``..``, no empty path part)."""
    return (
        REVISION.fullmatch(ref) is not None and ".." not in ref and "//" not in ref and not ref.endswith("/")
    )


# -- staying inside the run folder ---------------------------------------------------------------
def inside(path: Path, root: Path) -> bool:
    """Whether ``path``, with every symlink resolved, is ``root`` or lies inside it."""
    try:
        real, base = path.resolve(), root.resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL character
        return False
    return real == base or base in real.parents


def escape_note(path: Path) -> str:
    """Where a path that leads out of its folder goes, for a message."""
    try:
        return f"it resolves to {shown(str(path.resolve()), MAX_PATH_SHOWN)}"
    except (OSError, RuntimeError, ValueError):
        return "it cannot be resolved (a symlink loop?)"


# -- reading files --------------------------------------------------------------------------------
def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def read_json(path: Path, *, limit: int, allow_nan: bool = True) -> Any:
    """Parse the JSON file ``path`` (at most ``limit`` bytes, no duplicate keys; ``NaN`` and
    ``Infinity`` only when ``allow_nan``).

    Raises:
        ValueError: why the file is not usable, in words (no traceback material).
    """
    try:
        size = path.stat().st_size
        if size > limit:
            raise ValueError(f"{size} bytes, more than the {limit} a file of this kind may have")
        text = path.read_bytes().decode("utf-8")
        if allow_nan:
            return json.loads(text, object_pairs_hook=jsonio.unique_keys)
        return json.loads(text, object_pairs_hook=jsonio.unique_keys, parse_constant=_reject_constant)
    except jsonio.RepeatedKeyError as exc:
        raise ValueError(f"the key {shown(exc.key)} appears twice in one object") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except RecursionError:
        raise ValueError("not valid JSON (nested too deeply)") from None
    except OSError as exc:
        raise ValueError(f"cannot be read ({exc.strerror or type(exc).__name__})") from None


def canonical_json(value: Any) -> bytes:
    """The canonical JSON of ``value`` (sorted keys, compact separators, ASCII), for checksums."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def safetensors_header_length(path: Path) -> int:
    """The header length a safetensors file declares, checked against the file's size.

    Raises:
        ValueError: the file is too short, or its header length points past its end or is larger
            than any safetensors header may be.
    """
    size = path.stat().st_size
    if size < 8:
        raise ValueError(f"{size} bytes, too short for a safetensors file")
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
    if length > MAX_SAFETENSORS_HEADER:
        raise ValueError(f"its header length {length} is larger than a safetensors header may be")
    if 8 + length > size:
        raise ValueError(f"its header length {length} points past the end of the file ({size} bytes)")
    return length


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file from a run folder, its header checked first.

    Raises:
        ValueError: why the file is not a readable safetensors file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        safetensors_header_length(path)
        return load_file(path)
    except OSError as exc:
        raise ValueError(f"cannot be read ({exc.strerror or type(exc).__name__})") from None
    except (SafetensorError, ValueError, RuntimeError, TypeError, OverflowError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"not a readable safetensors file ({printable(first, 160)})") from None


# -- schema errors ----------------------------------------------------------------------------------
def field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    """A pydantic location as a field path: ``weights.tensors``, ``label_names[1]``; keys that are
    not plain names are shown with ``repr``."""
    text = ""
    for item in loc:
        if isinstance(item, int):
            text += f"[{item}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", str(item)):
            text += f".{item}" if text else str(item)
        else:
            text += f"[{shown(item, 40)}]"
    return text or "(top level)"


def first_error(exc: ValidationError, prefix: tuple[Any, ...] = ()) -> str:
    """``<field path>: <problem>`` for the first error of ``exc`` (one line), with how many more."""
    errors = exc.errors()
    error = errors[0]
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "missing":
        message = "missing (a required field)"
    elif error["type"] not in {"extra_forbidden"} and "input" in error:
        message += f", got {shown(error['input'], 60)}"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{field_path((*prefix, *error['loc']))}: {printable(message)}{more}"


# -- writing into a run folder --------------------------------------------------------------------
def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (never an existing file or symlink) and write ``data`` to it, flushed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def write_inside(root: Path, folder: str, name: str, data: bytes) -> Path:
    """Write ``root/folder/name`` atomically, creating ``folder``: it may not lead out of ``root``
    (a symlink), and an existing ``name`` is replaced, never followed.

    Raises:
        OSError: the file system refused (read-only, permissions, full).
        ValueError: ``folder`` leads out of ``root``.
    """
    directory = root / folder
    if (directory.is_symlink() or directory.exists()) and not inside(directory, root):
        raise ValueError(f"{folder}/ leads out of the run folder: {escape_note(directory)}")
    directory.mkdir(exist_ok=True)
    if not inside(directory, root):
        raise ValueError(f"{folder}/ leads out of the run folder: {escape_note(directory)}")
    target = directory / name
    temporary = directory / f".{name}.tmp-{os.getpid()}"
    _write_new(temporary, data)  # refuses a name that exists, even as a symlink
    try:
        temporary.replace(target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return target


def save_json_inside(root: Path, folder: str, name: str, value: Any, what: str) -> Path | None:
    """Write ``value`` as valid JSON (non-finite floats as ``null``: `probekit.jsonio`) to
    ``root/folder/name`` (see `write_inside`); return its path, or None after one warning
    (logger ``probekit``) saying why it could not be written there."""
    text = jsonio.dumps(value, indent=2) + "\n"
    try:
        return write_inside(root, folder, name, text.encode("utf-8"))
    except (OSError, ValueError) as exc:
        reason = (exc.strerror or type(exc).__name__) if isinstance(exc, OSError) else str(exc)
        logging.getLogger("probekit").warning(
            "%s: could not write the %s there (%s); they are not saved", root / folder / name, what, reason
        )
        return None
