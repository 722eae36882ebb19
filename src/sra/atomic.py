"""Atomic file writes: a reader sees the old file or the complete new one, never a torn one.

Every writer in the package goes through :func:`atomic_path`: write to a temporary file in the
same folder (so the final ``os.replace`` is a rename on one file system), flush it to disk, then
rename it over the target. A write the OS refuses (disk full, read-only, …) raises
:class:`sra.oserrors.WriteError` naming the target, with the temporary file removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from sra.oserrors import writing


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on error
    removed. The parent folder is created if needed. ``suffix`` keeps libraries that insist on
    an extension (``np.savez`` adds ``.npz``) writing exactly where we say."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
        os.close(fd)
    try:
        with writing(path):  # the free space is measured before the temporary file goes
            yield Path(tmp)
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (``fsync``: also force it to disk before the rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = False) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_write_json(path: str | os.PathLike, obj: Any, fsync: bool = False) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n", fsync=fsync)
