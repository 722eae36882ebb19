"""One launch per directory: ``sra train`` and ``sra sample`` hold an exclusive OS lock on
``DIR/.sra-lock`` for as long as they run; a second launch is refused in one line naming the holder.

Why ``flock``: the kernel drops the lock when the process ends, however it ends (SIGKILL
included), so a killed run never leaves a stale lock. The file stays; it only says who took the
lock last (host, pid, start time, command) and is never trusted as the lock itself.

Several ranks of one launch: only the main process (global rank 0) takes the lock, before the
launch writes anything, and broadcasts its verdict (nothing, or the refusal line); every rank then
raises the same error, so a refused launch stops as a whole and a launch is never blocked by its
own ranks. Within one process the lock is re-entrant (a script or test that trains a run and then
resumes it in the same process is one launch). :func:`release_all` (the CLI calls it when a
command ends, and at exit) drops the locks and removes directories that were made only to hold one.

File systems: local disks and NFS (Linux emulates ``flock`` there with byte-range locks, which
need the file open for writing, hence ``O_RDWR``); Lustre needs its ``flock`` mount option. Where
the file system refuses locks altogether, the launch goes on with a warning.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from sra.errors import SraError, first_line
from sra.oserrors import writing

LOCK_NAME = ".sra-lock"
# flock errors that mean "this file system has no locks", not "someone holds it"
_UNSUPPORTED = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})
log = logging.getLogger("sra.lock")


@dataclass
class _Held:
    directory: Path
    fd: int
    created: Path | None  # the topmost folder made to hold the lock (removed again if left empty)


_HELD: dict[Path, _Held] = {}


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` is still the file open as ``fd`` (not unlinked or replaced meanwhile)."""
    try:
        on_disk, held = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def holder(directory: str | os.PathLike) -> str:
    """Who took the lock of ``directory`` last, as the lock file says."""
    try:
        info = json.loads((Path(directory) / LOCK_NAME).read_text())
        return f"host {info['host']}, pid {info['pid']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown: its lock file is not readable yet"


def _first_missing(d: Path) -> Path | None:
    missing = None
    for q in (d, *d.parents):
        if q.exists():
            break
        missing = q
    return missing


def _remove_if_empty(d: Path, created: Path | None, fd: int) -> None:
    """Remove the lock file (if it is still the one open as ``fd``: never another launch's) and
    the folders up to ``created`` if the lock is all they hold."""
    if created is None or not _same_file(fd, d / LOCK_NAME):
        return
    with contextlib.suppress(OSError):
        if {p.name for p in d.iterdir()} == {LOCK_NAME}:
            (d / LOCK_NAME).unlink()
        for q in (d, *d.parents):
            q.rmdir()  # OSError (not empty) ends the walk
            if q == created:
                break


def _lock_file(path: Path) -> int | None:
    """An fd of ``path`` holding its exclusive lock; None if the file system has no locks.
    Raises BlockingIOError if another process holds it."""
    for _ in range(10):  # another launch may remove an empty run dir's file meanwhile: retry
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in _UNSUPPORTED:
                log.warning("%s: the file system does not support locks (%s); running without "
                            "the one-launch-per-directory lock", path, os.strerror(exc.errno))
                return None
            raise
        if _same_file(fd, path):
            return fd
        os.close(fd)
    raise SraError(f"{path}: cannot be locked (the file keeps being replaced)")


def take(directory: str | os.PathLike, command: str, hint: str) -> None:
    """Lock ``directory`` (created if needed) for this process and write who holds it.
    :class:`SraError` naming the holder if another process has it; ``hint`` names the flags
    that choose another directory."""
    d = Path(os.path.abspath(directory))
    path = d / LOCK_NAME
    held = _HELD.get(d)
    if held is not None:
        if _same_file(held.fd, path):
            return
        _drop(held)  # the folder was removed under us: lock it anew
    created = _first_missing(d)
    fd = None
    try:
        with writing(path):
            d.mkdir(parents=True, exist_ok=True)
            try:
                fd = _lock_file(path)
            except BlockingIOError:
                raise SraError(f"{d} is in use by another launch ({holder(d)}); wait for it to "
                               f"end or stop it, or choose another {hint}") from None
            if fd is None:
                return
            started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            info = {"host": socket.gethostname(), "pid": os.getpid(), "started": started,
                    "command": command}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    except BaseException:
        if fd is not None:
            _remove_if_empty(d, created, fd)
            os.close(fd)
        raise
    _HELD[d] = _Held(d, fd, created)


def hold(directory: str | os.PathLike, command: str, hint: str, state=None) -> None:
    """Every process of a launch calls this before writing into ``directory``: the main process
    takes the lock and all processes raise its refusal (``state``: accelerate's Accelerator or
    PartialState; None for one process). A collective when there are several processes."""
    main = state is None or state.is_main_process
    error: BaseException | None = None
    refusal = None
    if main:
        try:
            take(directory, command, hint)
        except Exception as exc:  # every rank must hear the verdict, whatever it is
            error, refusal = exc, str(exc) if isinstance(exc, SraError) else first_line(exc, with_type=True)
    if state is not None and state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [refusal]
        broadcast_object_list(box, from_process=0)
        refusal = box[0]
    if error is not None:
        raise error
    if refusal is not None:
        raise SraError(refusal)


def _drop(held: _Held) -> None:
    _HELD.pop(held.directory, None)
    _remove_if_empty(held.directory, held.created, held.fd)  # still locked while the file goes
    os.close(held.fd)


def release(directory: str | os.PathLike) -> None:
    """Drop this process's lock on ``directory``, if it holds one (the end of a launch that lives
    on in a longer process, e.g. a ``Trainer`` used from a script)."""
    held = _HELD.get(Path(os.path.abspath(directory)))
    if held is not None:
        _drop(held)


def release_all() -> None:
    """Drop every lock this process holds (each folder made only for a lock is removed)."""
    for held in list(_HELD.values()):
        _drop(held)


def _forget_in_child() -> None:
    """A forked child (a DataLoader worker) closes its copies of the lock files: closing a copy
    leaves the parent's lock held, and a worker orphaned by a killed run can then not hold it on."""
    for held in _HELD.values():
        with contextlib.suppress(OSError):
            os.close(held.fd)
    _HELD.clear()


atexit.register(release_all)
os.register_at_fork(after_in_child=_forget_in_child)
