"""Run folders: their names, the lock, and the transaction claim -> publish | keep | remove.

A run (``probekit train``, ``probekit sweep``) writes into a hidden sibling of its output folder,
``.NAME.partial-PID``, and renames it into place only when complete, so a failed run never leaves
a half-written ``NAME``. Around that transaction this module enforces three rules:

* **The output folder cannot destroy the user's files.** ``--out`` may not be, hold, or lie inside
  an input (the data, the model folder, the config file, the cache folder), the working folder,
  the home folder or the file-system root; ``--overwrite`` replaces only an earlier probekit run
  or sweep folder (or an empty folder), and a symlinked ``--out`` is replaced as a link, never
  followed into its target. All of it is checked before anything is created or loaded.
* **One process per run folder.** A lock file ``.NAME.lock`` beside the output folder is held
  (``flock``) for the whole run, fresh or resumed. A second run on the same folder is refused with
  the holder's pid; the kernel drops the lock of a process that died, so a stale lock file is
  recognised (and said so) and taken over.
* **Nothing is left behind by a refused or failed run**: the partial folder is removed unless it
  holds training-state checkpoints to resume from, parent folders the run created are removed
  again when empty, and the lock file goes with the lock.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from probekit.errors import InterruptedRunError, Terminated, TerminatedError, UserError

Log = Callable[[str], None]

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
"""A run name is one folder name: it cannot climb out of ``runs/`` or name a hidden folder."""

RUN_MARKERS = ("checkpoint/probe.json", "report.json", "sweep.json")
"""A folder holding one of these was written by probekit (a training run or a sweep)."""

_SUFFIX_ROOM = len(".") + len(".partial-") + 10
"""Bytes a sibling name (``.NAME.partial-PID``, ``.NAME.lock``) adds to the output folder's name."""


class StorageError(UserError):
    """The file system refused a write: no space, read-only, permissions, a name too long."""


def storage_error(path: Path | str, exc: OSError, doing: str) -> StorageError:
    """One line for an ``OSError`` met while ``doing`` something with ``path``."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    where = exc.filename if isinstance(exc.filename, str) and exc.filename else str(path)
    return StorageError(f"{where}: cannot {doing}: {reason}")


def explain_failure(exc: BaseException, kept: Path | None) -> BaseException:
    """The error to show for ``exc``, which ended a run: a file-system failure (disk full,
    read-only) becomes one line, and Ctrl-C or SIGTERM before the training loop a
    `probekit.errors` error; each says whether the unfinished run was ``kept`` for ``--resume``
    or nothing was written. Anything else is returned as it is."""
    where = (
        f"the unfinished run and its last checkpoint are kept in {kept} (continue with --resume)"
        if kept is not None
        else "no run folder was written"
    )
    if isinstance(exc, OSError):
        return StorageError(f"{storage_error(exc.filename or '', exc, 'write')}; {where}".lstrip(": "))
    if isinstance(exc, KeyboardInterrupt):
        return InterruptedRunError(f"interrupted by Ctrl-C; {where}")
    if isinstance(exc, Terminated):
        return TerminatedError(f"terminated by SIGTERM; {where}")
    if isinstance(exc, RuntimeError) and NOT_DETERMINISTIC in str(exc):
        operation = str(exc).split(NOT_DETERMINISTIC)[0].strip() or "an operation"
        return UserError(
            f"train.deterministic: {operation} has no deterministic kernel on this device; set "
            f"train.deterministic=false to train with it; {where}"
        )
    return exc


NOT_DETERMINISTIC = "does not have a deterministic implementation"
"""What torch says of an operation it cannot run under ``torch.use_deterministic_algorithms``."""


def save_tensors(tensors: Mapping[str, Any], path: Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, with a failed write raised as the ``OSError`` it is.

    safetensors reports I/O failures (a full disk, a file-size limit) as its own
    ``SafetensorError("... (os error 28)")``; callers handle file-system failures in one way,
    as ``OSError`` with its errno."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(dict(tensors), str(path), metadata=metadata)
    except SafetensorError as exc:
        found = re.search(r"os error (\d+)", str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from exc


# -- names -------------------------------------------------------------------------------------
def check_run_name(name: str) -> str:
    """``name`` if it is a safe run name, else a `UserError` saying why."""
    if RUN_NAME.fullmatch(name) is None or ".." in name:
        raise UserError(
            f"run name {name!r}: a run name is one folder name of letters, digits, '.', '_' and '-' "
            "(starting with a letter or digit, no '..'); use --out to write elsewhere"
        )
    return name


def safe_run_name(text: str) -> str:
    """A run name derived from ``text`` (a preset or config file name): unsafe characters become
    ``-``; ``run`` when nothing is left."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", text).replace("..", "-").lstrip("._-")[:100]
    return cleaned or "run"


def default_run_dir(name: str) -> Path:
    """``runs/<name>-<local time>``."""
    return Path("runs") / f"{check_run_name(name)}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


# -- what --out may be ---------------------------------------------------------------------------
def real(path: Path) -> Path:
    """``path`` absolute with every symlink of its existing part resolved (it need not exist)."""
    return Path(path).expanduser().resolve()


def _absolute(path: Path) -> Path:
    """``path`` absolute and normalised, symlinks kept (the folder the user named)."""
    return Path(os.path.normpath(Path(path).expanduser().absolute()))


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def is_run_folder(folder: Path) -> bool:
    """True when ``folder`` holds what a probekit run, sweep or export writes."""
    from probekit.exported import is_export

    return any((folder / marker).is_file() for marker in RUN_MARKERS) or is_export(folder)


def _listing(folder: Path, limit: int = 3) -> str:
    try:
        entries = sorted(p.name for p in folder.iterdir())
    except OSError:
        return "files"
    shown = ", ".join(repr(name) for name in entries[:limit])
    return shown + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


def check_out(
    out: Path, *, overwrite: bool = False, inputs: Mapping[str, Path] | None = None, resume: bool = False
) -> None:
    """Refuse an output folder that could destroy the user's files or cannot be written.

    Args:
        out: the run folder asked for.
        overwrite: whether an existing run folder there may be replaced (once the new run is done).
        inputs: what the run reads, by description (``"data folder"``, ``"model folder"``, ...);
            ``out`` may not be, hold or lie inside any of them.
        resume: ``out`` names a stopped run to continue (it need not be empty).

    Raises:
        UserError: with the reason, before anything is created.
    """
    target = real(out)
    if target == Path(target.anchor):
        raise UserError(f"--out {out}: is the root of the file system; choose a folder for this run")
    if target == real(Path.home()):
        raise UserError(f"--out {out}: is your home folder; choose a folder for this run")
    cwd = real(Path.cwd())
    if _inside(cwd, target):
        what = "is the working folder" if cwd == target else "holds the working folder"
        raise UserError(f"--out {out}: {what}; choose a folder for this run")
    for description, path in (inputs or {}).items():
        source = real(path)
        if _inside(source, target):
            what = "is" if source == target else "holds"
            raise UserError(f"--out {out}: {what} the {description} {path}; choose a folder for this run")
        if _inside(target, source) and source.is_dir():
            raise UserError(
                f"--out {out}: lies inside the {description} {path}; write runs outside your inputs"
            )
    _check_writable_parent(out)
    if resume or not os.path.lexists(out):
        return
    if out.is_symlink() and not out.exists():
        raise UserError(f"--out {out}: is a broken symbolic link; remove it or choose another --out")
    if not out.is_dir():
        raise UserError(f"--out {out}: exists and is a file, not a folder; choose another --out")
    try:
        empty = not any(out.iterdir())
    except OSError as exc:
        raise storage_error(out, exc, "read the output folder") from None
    if empty:
        return
    if not overwrite:
        raise UserError(
            f"{out}: the output folder exists and is not empty; pass --overwrite or another --out"
        )
    if not is_run_folder(out):
        raise UserError(
            f"--out {out}: --overwrite replaces only an earlier probekit run or sweep folder, and this "
            f"folder holds other files ({_listing(out)}); choose another --out or empty it yourself"
        )


def _check_writable_parent(out: Path) -> None:
    """The nearest existing ancestor of ``out`` must be a writable folder, and the names a run
    writes beside ``out`` must fit the file system."""
    ancestor = _absolute(out).parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"--out {out}: cannot create it: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: cannot create it: {ancestor} is not writable")
    try:
        limit = os.pathconf(ancestor, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    longest = max((len(part.encode("utf-8", "surrogateescape")) for part in Path(out).parts), default=0)
    if longest + _SUFFIX_ROOM > limit:
        raise UserError(
            f"--out {out}: a folder name of {longest} bytes is too long here (at most "
            f"{limit - _SUFFIX_ROOM}, leaving room for the names probekit writes beside it)"
        )


# -- the lock ----------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _read_pid(fd: int) -> int | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 64).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


@dataclass
class RunLock:
    """An exclusive lock on a run folder (and its unfinished siblings): ``.NAME.lock`` beside it,
    held with ``flock`` for the lifetime of the run and holding the owner's pid."""

    out: Path
    fd: int | None = None

    @property
    def path(self) -> Path:
        return self.out.parent / f".{self.out.name}.lock"

    def acquire(self, log: Log) -> None:
        """Take the lock or raise a `UserError` naming the process that holds it."""
        import fcntl

        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            except OSError as exc:
                raise storage_error(self.path, exc, "create the run folder's lock") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_pid(fd)
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise storage_error(self.path, exc, "lock the run folder") from None
                who = f"process {holder}" if holder is not None else "another process"
                raise UserError(
                    f"{self.out}: {who} is already writing this run folder (lock {self.path}); "
                    "wait for it to finish or choose another --out"
                ) from None
            # A process releasing the lock unlinks the file: make sure ours is still the one there.
            try:
                same = self.path.stat().st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = _read_pid(fd)
            if previous is not None and previous != os.getpid() and not _alive(previous):
                log(f"note: {self.path} was left by process {previous}, which is no longer running; taken")
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))
            self.fd = fd
            return

    def release(self) -> None:
        """Drop the lock and remove its file (nothing is left beside the run folder)."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


# -- the transaction ---------------------------------------------------------------------------
@dataclass
class RunFolder:
    """A run's output folder ``out``, its lock, the hidden ``partial`` folder the run is written
    into, and the parent folders the run created (removed again if the run leaves nothing).

    ``open`` checks ``out`` and takes the lock; then ``create`` makes a new partial folder (or the
    caller sets ``partial`` to the unfinished run it resumes); ``publish`` or ``abandon`` ends the
    run; ``release`` always follows."""

    out: Path
    lock: RunLock
    overwrite: bool = False
    inputs: Mapping[str, Path] = field(default_factory=dict)
    created: list[Path] = field(default_factory=list)
    partial: Path | None = None

    @classmethod
    def open(
        cls,
        out: Path,
        *,
        overwrite: bool = False,
        inputs: Mapping[str, Path] | None = None,
        log: Log = print,
        resume: bool = False,
    ) -> RunFolder:
        """Check ``out`` (`check_out`) and lock it, before anything is loaded or written."""
        inputs = dict(inputs or {})
        check_out(out, overwrite=overwrite, inputs=inputs, resume=resume)
        created = _make_parents(out)
        lock = RunLock(out)
        try:
            lock.acquire(log)
            if not resume:  # again under the lock: another run may have published meanwhile
                check_out(out, overwrite=overwrite, inputs=inputs)
        except BaseException:
            lock.release()
            _remove_empty(created)
            raise
        return cls(out, lock, overwrite, inputs, created)

    def create(self) -> Path:
        """Make the hidden folder a new run is written into, ``.NAME.partial-PID``."""
        partial = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        if os.path.lexists(partial):
            _remove(partial)
        try:
            partial.mkdir()
        except OSError as exc:
            raise storage_error(partial, exc, "create the run folder") from None
        self.partial = partial
        return partial

    def publish(self) -> None:
        """Move the finished run into place; an earlier run there (``--overwrite``) is removed
        only afterwards, and a symlink there is replaced as a link (its target is untouched)."""
        assert self.partial is not None
        out, old = self.out, None
        try:
            if os.path.lexists(out):
                old = out.parent / f".{out.name}.old-{os.getpid()}"
                out.rename(old)
            self.partial.rename(out)
        except OSError as exc:
            if old is not None and not os.path.lexists(out):
                old.rename(out)
            raise storage_error(out, exc, "move the finished run into place") from None
        self.partial = None
        if old is not None:
            _remove(old)

    def abandon(self, log: Log, *, keep: bool) -> None:
        """After a failure: keep the partial folder for ``--resume`` when ``keep``, else remove it
        and any parent folder this run created."""
        if self.partial is not None and keep:
            log(f"the unfinished run and its checkpoints are kept in {self.partial} (continue with --resume)")
            return
        if self.partial is not None:
            _remove(self.partial)
            self.partial = None

    def release(self) -> None:
        """Drop the lock (after `publish` or `abandon`) and remove the parent folders this run
        created if nothing is left in them."""
        self.lock.release()
        _remove_empty(self.created)


def _make_parents(out: Path) -> list[Path]:
    """Create the missing parents of ``out``; return those created, deepest first."""
    missing: list[Path] = []
    parent = _absolute(out).parent
    while not os.path.lexists(parent) and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            _remove_empty([p for p in missing if p.exists()])
            raise storage_error(folder, exc, "create the folder") from None
    return missing


def _remove_empty(folders: Iterable[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            return


def _remove(path: Path) -> None:
    """Remove a file, a symlink (never its target) or a folder tree, ignoring what is gone."""
    if path.is_symlink() or (os.path.lexists(path) and not path.is_dir()):
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
