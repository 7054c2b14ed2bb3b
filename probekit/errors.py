"""Errors users see, and the exit codes the CLI maps them to (DESIGN.md section 5)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class ProbekitError(Exception):
    """Base class for every error probekit raises on purpose."""

    exit_code: int = EXIT_INTERNAL


class UserError(ProbekitError):
    """Bad input: a config, a spec field, a path, a model. The CLI prints it on one line, exit 2."""

    exit_code = EXIT_BAD_INPUT


class DataError(UserError):
    """A data file or data setting probekit cannot use; one line naming file:line (or row) and field
    (also importable as ``probekit.data.DataError``)."""


class ConfigError(UserError):
    """A config or spec that does not validate."""


class UnknownKindError(UserError, KeyError):
    """A ``kind`` that no registry entry answers to."""

    def __init__(self, family: str, kind: str, known: Iterable[str]) -> None:
        self.family = family
        self.kind = kind
        self.known = sorted(known)
        super().__init__(self._message())

    def _message(self) -> str:
        text = f"unknown {self.family} kind {self.kind!r}"
        hint = did_you_mean(self.kind, self.known)
        if hint:
            text += f"; {hint}"
        return text + f" (known: {', '.join(self.known) or 'none'})"

    def __str__(self) -> str:  # KeyError would add quotes around the message
        return self._message()


class DuplicateKindError(UserError):
    """Two sources claim the same ``kind`` in one family."""

    def __init__(self, family: str, kind: str, first: str, second: str) -> None:
        self.family = family
        self.kind = kind
        self.sources = (first, second)
        super().__init__(
            f"{family} kind {kind!r} is claimed twice: by {first} and by {second}; "
            "uninstall one of them or block it with PROBEKIT_BLOCK_PLUGINS"
        )


class PluginUnavailableError(UserError):
    """A kind whose plugin failed to load (or conflicts) was asked for."""


class TerminatedError(ProbekitError):
    """The process received SIGTERM: training stopped after a checkpoint, or before training the
    unfinished run folder was removed (exit code 143)."""

    exit_code = EXIT_TERMINATED


class Terminated(BaseException):
    """SIGTERM arrived outside the training loop. Like ``KeyboardInterrupt`` it is not an
    ``Exception``, so library code that catches ``Exception`` (model loading, for one) cannot
    swallow it or report it as its own error; the CLI turns it into exit code 143."""


class InterruptedRunError(ProbekitError):
    """SIGINT (Ctrl-C) during training: stopped after the current step and a checkpoint (exit code 130)."""

    exit_code = EXIT_INTERRUPTED


class DivergedError(ProbekitError):
    """The loss or gradients became non-finite: training stopped (exit code 3)."""

    exit_code = EXIT_DIVERGED


class PeerLostError(ProbekitError):
    """Another process of a multi-process run died or stopped answering (exit code 1): the job
    ends with this one line instead of hanging."""

    exit_code = EXIT_INTERNAL


class PluginError(UserError):
    """A plugin component broke its contract (wrong output shape, ...) or is missing."""


class BackboneError(UserError):
    """A backbone probekit cannot read (unknown block layout, missing layer)."""


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """Return ``"did you mean 'x'?"`` for the closest candidate, or ``""`` when none is close."""
    if not isinstance(word, str):
        return ""
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"did you mean {matches[0]!r}?" if matches else ""
