"""Reading files a user hands us without running their code, and saying in one line what is wrong.

``.pt`` files are read with ``torch.load(weights_only=True)`` (for the release's ``args`` only
``argparse.Namespace`` is allowed in addition); ``.safetensors`` headers are checked against the
file size before anything is read. Every failure is an :class:`SraError` naming the file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from sra.errors import SraError, first_line

_CHUNK = 8 << 20  # hashing reads 8 MiB at a time: memory stays flat for multi-GB files
_MAX_SAFETENSORS_HEADER = 100_000_000  # safetensors' own limit; larger "lengths" are not headers
_LINE_LIMIT = 200  # a quoted library message longer than this is noise, not help


def _torch_load_problem(exc: BaseException) -> str:
    """What a failed ``torch.load(weights_only=True)`` means, in our words."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text:
        code = re.search(r"GLOBAL ([\w.]+)", text)
        if code:
            return (f"refused: it references code ({code.group(1)}), which is never run; only "
                    "tensors and plain data are loaded")
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        reason = first_line(detail.group(1), limit=_LINE_LIMIT) if detail else ""
        return f"not a tensors-only torch file ({reason or 'unreadable pickle data'})"
    if isinstance(exc, EOFError) or "Ran out of input" in text:
        return "truncated (the data ends early)"
    if "zip archive" in text or "central directory" in text or "PytorchStreamReader" in text:
        return "truncated or corrupt (not a complete torch zip archive)"
    return f"not a tensors-only torch file ({first_line(exc, with_type=True, limit=_LINE_LIMIT)})"


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load`` that refuses arbitrary pickled code (release ``args`` Namespaces allowed).
    A missing file is a ``FileNotFoundError``; anything unreadable a one-line :class:`SraError`."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint file not found: {p}")
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals([argparse.Namespace]):
            # plain pickles (not torch.save's zip) make torch warn about the protocol: noise here
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(p, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError):
        raise
    except Exception as exc:  # UnpicklingError, RuntimeError (zip), EOFError, …: one line, ours
        raise SraError(f"{p}: {_torch_load_problem(exc)}") from None


def load_pt_required(path: Path) -> Any:
    """:func:`safe_torch_load` for a file that must be there: a missing one is a damage too."""
    try:
        return safe_torch_load(path)
    except FileNotFoundError:
        raise SraError(f"{path}: missing") from None


def check_safetensors(path: str | Path) -> None:
    """Check a ``.safetensors`` file's header and that its size is what the header promises,
    reading only the header (cheap even for multi-GB files)."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else None
            raw = f.read(n) if n is not None and n <= min(size - 8, _MAX_SAFETENSORS_HEADER) else b""
    except FileNotFoundError:
        raise SraError(f"{p}: missing") from None
    except IsADirectoryError:
        raise SraError(f"{p}: is a directory, not a .safetensors file") from None
    except OSError as exc:
        raise SraError(f"{p}: unreadable ({exc.strerror or exc})") from None
    if n is None:
        raise SraError(f"{p}: truncated: {size} bytes, too short for a safetensors file")
    if n > _MAX_SAFETENSORS_HEADER:  # random bytes read as a length: absurd
        raise SraError(f"{p}: not a safetensors file (header length {n} is implausible)")
    if n > size - 8:
        raise SraError(f"{p}: truncated: {size} bytes, the header alone needs {8 + n}")
    try:
        header = json.loads(raw)
    except ValueError:
        raise SraError(f"{p}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise SraError(f"{p}: not a safetensors file (its header is not a JSON object)")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            _, stop = entry["data_offsets"]
            end = max(end, int(stop))
        except (KeyError, TypeError, ValueError):
            raise SraError(f"{p}: not a safetensors file (bad header entry {name!r})") from None
    expected = 8 + n + end
    if size < expected:
        raise SraError(f"{p}: truncated: {size} of {expected} bytes")
    if size > expected:
        raise SraError(f"{p}: corrupt: {size - expected} bytes beyond the tensors' data")


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` whose failures are one line naming the file."""
    check_safetensors(path)
    try:
        return load_file(path)
    except Exception as exc:  # SafetensorError has no stable base class to catch
        why = first_line(exc, limit=_LINE_LIMIT)
        raise SraError(f"{path}: not a readable safetensors file ({why})") from None


def check_state_dict(sd: Any, source: str) -> dict[str, torch.Tensor]:
    """``sd`` if it is a non-empty ``{name: tensor}`` dict, else a one-line error."""
    if not isinstance(sd, dict) or not sd:
        raise SraError(f"{source} holds no state dict (got {type(sd).__name__})")
    bad = next((k for k, v in sd.items()
                if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise SraError(f"{source} is not a state dict (entry {bad!r} is a {type(sd[bad]).__name__})")
    return sd


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; missing, unreadable or corrupt → one-line :class:`SraError`."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SraError(f"{path}: missing") from None
    except OSError as exc:
        raise SraError(f"{path}: unreadable ({exc.strerror or exc})") from None
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise SraError(f"{path}: corrupt (not valid JSON: {exc.msg} at line {exc.lineno} "
                       f"column {exc.colno})") from None
    except ValueError:  # UnicodeDecodeError: binary garbage
        raise SraError(f"{path}: corrupt (not JSON text)") from None
    if not isinstance(obj, dict):
        raise SraError(f"{path}: corrupt (a JSON {type(obj).__name__}, expected an object)")
    return obj


def file_sha256(path: str | Path, fsync: bool = False) -> tuple[int, str]:
    """(size in bytes, SHA-256 hex digest) of a file, streamed in chunks. ``fsync``: also force
    the file to disk (a manifest must not vouch for bytes still only in the page cache)."""
    h = hashlib.sha256()
    size = 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
        if fsync:
            os.fsync(f.fileno())
    return size, h.hexdigest()
