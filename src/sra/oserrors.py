"""Refused writes (disk full, read-only file system, no permission, over quota) as one-line errors.

Every writer in ``sra`` reports a write the operating system refuses in the same words::

    cannot write PATH: REASON (N bytes free on that disk)

:func:`writing` wraps a write and turns such a failure into :class:`WriteError` naming the file
(``sra.atomic.atomic_path`` uses it, so every atomic writer gets it), and the CLI prints that
message as ``sra CMD: error: …`` without a traceback (:func:`os_error_line` covers a bare
``OSError`` that escaped every writer). Libraries hide the errno in different ways, all
recognised here: ``OSError.errno``; torch.save's C++ writer ("[enforce fail at
inline_container.cc…] unexpected pos …" for a short write, "… strerror: Read-only file system"
for an open); safetensors' Rust error ("… (os error 28)").
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Iterator

from sra.errors import SraError

WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT})
# Only these are certainly about writing; EACCES may also refuse a read.
_WRITE_ONLY = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT})
_TORCH_WRITER = ("inline_container.cc", "PytorchStreamWriter")
# torch's writer says "unexpected pos N vs M" when fwrite wrote less than asked: the disk is
# full or the quota is spent (it does not say which).
_SHORT_WRITE = ("unexpected pos", "file write failed")
SHORT_WRITE_REASON = "No space left on device or disk quota exceeded"
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


class WriteError(SraError, OSError):
    """A write the OS refused: a one-line user error (``SraError``) that is still an ``OSError``
    (with ``errno`` and ``filename``), so code that tolerates an unwritable cache keeps working."""

    def __init__(self, path: str | os.PathLike, reason: str, free: int | None,
                 code: int | None = None):
        OSError.__init__(self, code, reason, os.fspath(path))
        self.path, self.reason, self.free = Path(path), reason, free

    def __str__(self) -> str:
        free = "free space unknown" if self.free is None else f"{self.free} bytes free on that disk"
        return f"cannot write {self.path}: {self.reason} ({free})"

    def __reduce__(self):  # picklable across processes (OSError's default would mix up args)
        return type(self), (self.path, self.reason, self.free, self.errno)


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes on the file system holding ``path`` (or its nearest existing parent)."""
    p = Path(os.path.abspath(path))
    for q in (p, *p.parents):
        if q.exists():
            try:
                return shutil.disk_usage(q).free
            except OSError:
                return None
    return None


def write_reason(exc: BaseException) -> tuple[str, int | None] | None:
    """(reason, errno) if ``exc`` is a write the OS refused, else None."""
    if isinstance(exc, WriteError):
        return exc.reason, exc.errno
    if isinstance(exc, OSError):
        if exc.errno in WRITE_ERRNOS:
            return exc.strerror or os.strerror(exc.errno), exc.errno
        return None
    text = str(exc)
    if any(marker in text for marker in _TORCH_WRITER):
        for code in WRITE_ERRNOS:
            if os.strerror(code) in text:
                return os.strerror(code), code
        if any(marker in text for marker in _SHORT_WRITE):
            return SHORT_WRITE_REASON, errno.ENOSPC
        return None
    m = _RUST_OS_ERROR.search(text)
    if m and int(m.group(1)) in WRITE_ERRNOS:
        return os.strerror(int(m.group(1))), int(m.group(1))
    return None


def as_write_error(exc: BaseException, path: str | os.PathLike) -> WriteError | None:
    """``exc`` as a :class:`WriteError` naming ``path`` (free space measured now), or None if it
    is not a refused write. A :class:`WriteError` is returned as it is."""
    if isinstance(exc, WriteError):
        return exc
    found = write_reason(exc)
    if found is None:
        return None
    reason, code = found
    return WriteError(path, reason, free_bytes(path), code)


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Inside this block a refused write raises :class:`WriteError` naming ``path``; every other
    exception passes unchanged. The caller removes its own partial files (or uses atomic_path)."""
    try:
        yield
    except WriteError:
        raise
    except Exception as exc:
        err = as_write_error(exc, path)
        if err is None:
            raise
        raise err from exc


def os_error_line(exc: OSError) -> str | None:
    """One line for an ``OSError`` that no writer converted (the CLI's last resort): a refused
    write names the file the OS named (one it did not name is still one line); None for other
    errors (they keep their traceback)."""
    if isinstance(exc, WriteError):
        return str(exc)
    if exc.errno not in WRITE_ERRNOS:
        return None
    reason = exc.strerror or os.strerror(exc.errno)
    if not exc.filename:  # e.g. a buffered write failing at close(): still one line
        return f"cannot write a file the OS did not name: {reason}" if exc.errno in _WRITE_ONLY else None
    if exc.errno in _WRITE_ONLY:
        return str(as_write_error(exc, exc.filename))
    return f"cannot access {exc.filename}: {reason}"  # EACCES refuses reads too


class LogFileHandler(logging.FileHandler):
    """A log file that, when the OS refuses a write, says so once on stderr and stops writing
    (logging's default prints a traceback for every record that follows)."""

    failed = False

    def __init__(self, filename: str | os.PathLike, mode: str = "a", encoding: str | None = None):
        with writing(filename):
            super().__init__(filename, mode, encoding)

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        err = as_write_error(exc, self.baseFilename) if exc is not None else None
        if err is None:
            return super().handleError(record)
        if not self.failed:
            self.failed = True
            print(f"sra: WARNING: {err}; nothing more is logged to it", file=sys.stderr)
        with contextlib.suppress(OSError):
            self.close()  # flushing again may fail as well

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)
