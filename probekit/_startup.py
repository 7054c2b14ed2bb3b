"""Ctrl-C and SIGTERM while the ``probekit`` command starts (imports take seconds: torch).

``probekit.cli.main`` installs the signal handling of a run, but only once the package and the
command line are imported; a signal before that ended the process with a ``KeyboardInterrupt``
traceback (Ctrl-C) or without a word (SIGTERM). `guard_start_up` covers that window with a
handler that prints one line and exits with the signal's code (130, 143): nothing has been read
or written yet, so there is nothing to clean up.

It acts only in the process of the ``probekit`` command itself (its console script, or
``python -m probekit``): importing probekit into other code never touches signal handlers.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

_LINES = {
    signal.SIGINT: (130, b"probekit: interrupted by Ctrl-C while starting; nothing was written\n"),
    signal.SIGTERM: (143, b"probekit: terminated by SIGTERM while starting; nothing was written\n"),
}


def launched_as_cli(argv: list[str] | None = None) -> bool:
    """True when this process is the ``probekit`` command (console script or ``-m probekit``)."""
    argv = list(getattr(sys, "orig_argv", sys.argv)) if argv is None else argv
    if len(argv) >= 3 and argv[1] == "-m" and argv[2] in {"probekit", "probekit.cli"}:
        return True
    return len(argv) >= 2 and Path(argv[1]).name == "probekit"


def _leave(signum: int, _frame: FrameType | None) -> None:
    code, line = _LINES[signal.Signals(signum)]
    os.write(2, line)
    os._exit(code)


def guard_start_up() -> None:
    """In the ``probekit`` command's own process, until ``main`` takes over: one line and exit
    130/143 on Ctrl-C/SIGTERM. A signal the parent set to be ignored stays ignored."""
    if not launched_as_cli() or threading.current_thread() is not threading.main_thread():
        return
    for signum in _LINES:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _leave)
