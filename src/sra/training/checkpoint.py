"""Checkpoints: our run format (safetensors + JSON, atomic, verified, resumable) and the release's
``.pt``.

Layout of a run directory::

    RUN/config.json                   resolved config of the run
    RUN/checkpoints/step-0001000/     one complete checkpoint (renamed into place when complete)
        model.safetensors             student weights (with the SRA head)
        ema.safetensors               EMA weights (the teacher; what sampling uses)
        optimizer.pt  scaler.pt       optimizer / fp16 grad-scaler state (tensors only)
        rng-0.pt …                    RNG states of every process
        manifest.json                 size and SHA-256 of every file above
        meta.json                     step, data position, config, SHA-256 of manifest.json;
                                      written last: its presence marks a complete checkpoint

``meta.json`` is not in the manifest (it is written after it); it carries the manifest's hash
instead, so every byte of a checkpoint except meta.json's own is covered by a checksum and
meta.json is checked by parsing. Checkpoints written before manifests existed are verified by
parsing every file.

Nothing here executes pickled code: ``.pt`` files are read with ``torch.load(weights_only=True)``
(for the release's ``args`` only ``argparse.Namespace`` is allowed in addition). Every problem a
damaged or foreign file can cause is an :class:`SraError` whose one-line message names the file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from sra.errors import SraError
from sra.models import DiffusionTransformer, ModelConfig, build_model
from sra.models.registry import SIZES

FORMAT = "sra-ckpt-v1"
MANIFEST_FORMAT = "sra-manifest-v1"
CKPT_DIR = "checkpoints"
META = "meta.json"
MANIFEST = "manifest.json"
REQUIRED_FILES = ("model.safetensors", "ema.safetensors", "optimizer.pt")
_STEP_RE = re.compile(r"^step-(\d+)$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 8 << 20  # hashing reads 8 MiB at a time: memory stays flat for multi-GB files
_MAX_SAFETENSORS_HEADER = 100_000_000  # safetensors' own limit; larger "lengths" are not headers


# -- RNG -------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors/lists only (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -- safe loading ----------------------------------------------------------------------------------
def _clean_line(text: str) -> str:
    """The first informative line of a library's error text, without advice we must not give
    (torch suggests ``weights_only=False``, i.e. running the file's code)."""
    for line in text.splitlines():
        line = line.strip()
        low = line.lower()
        if line and not any(w in low for w in ("weights_only", "weights only", "trusted source")):
            return line[:200]
    return ""


def _torch_load_problem(exc: BaseException) -> str:
    """What a failed ``torch.load(weights_only=True)`` means, in our words."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text:
        code = re.search(r"GLOBAL ([\w.]+)", text)
        if code:
            return (f"refused: it references code ({code.group(1)}), which is never run; only "
                    "tensors and plain data are loaded")
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        reason = _clean_line(detail.group(1)) if detail else ""
        return f"not a tensors-only torch file ({reason or 'unreadable pickle data'})"
    if isinstance(exc, EOFError) or "Ran out of input" in text:
        return "truncated (the data ends early)"
    if "zip archive" in text or "central directory" in text or "PytorchStreamReader" in text:
        return "truncated or corrupt (not a complete torch zip archive)"
    line = _clean_line(text)
    return f"not a tensors-only torch file ({type(exc).__name__}{': ' + line if line else ''})"


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


def _load_pt(path: Path) -> Any:
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
        why = _clean_line(str(exc)) or type(exc).__name__
        raise SraError(f"{path}: not a readable safetensors file ({why})") from None


def _check_state_dict(sd: Any, source: str) -> dict[str, torch.Tensor]:
    """``sd`` if it is a non-empty ``{name: tensor}`` dict, else a one-line error."""
    if not isinstance(sd, dict) or not sd:
        raise SraError(f"{source} holds no state dict (got {type(sd).__name__})")
    bad = next((k for k, v in sd.items()
                if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise SraError(f"{source} is not a state dict (entry {bad!r} is a {type(sd[bad]).__name__})")
    return sd


def all_finite(module: nn.Module) -> bool:
    """Whether every parameter and buffer is finite."""
    return all(torch.isfinite(t).all() for t in module.state_dict().values() if t.is_floating_point())


def _contiguous_cpu(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


# -- JSON and hashes -------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
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


def _write_json_durable(path: Path, obj: dict) -> None:
    """Write ``obj`` to ``path`` via a temporary file, fsynced, then renamed (never torn)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def _in_manifest(p: Path) -> bool:
    # meta.json is written after the manifest; temporaries and dotfiles are not part of the data
    return (p.is_file() and p.name not in (META, MANIFEST) and not p.name.startswith(".")
            and not p.name.endswith(".tmp"))


def write_manifest(ckpt_dir: str | Path) -> dict:
    """Hash every file of ``ckpt_dir`` (except meta.json) into ``manifest.json``; returns it.

    Call it once every file is in place (every process's ``rng-<rank>.pt`` included) and before
    meta.json. Cost: SHA-256 reads every byte once (≈1 GB/s per core, plus the fsync), so an
    SiT-XL checkpoint (~11 GB with the optimizer) takes ~10 s on the main process; the other
    processes wait at the next barrier, well inside the usual collective timeouts.
    """
    d = Path(ckpt_dir)
    files = {}
    for p in sorted(d.iterdir()):
        if _in_manifest(p):
            size, digest = file_sha256(p, fsync=True)
            files[p.name] = {"size": size, "sha256": digest}
    manifest = {"format": MANIFEST_FORMAT, "algorithm": "sha256", "files": files}
    _write_json_durable(d / MANIFEST, manifest)
    return manifest


# -- our checkpoints -------------------------------------------------------------------------------
def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run (those with ``meta.json``), oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_RE.match(p.name)) and (p / META).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives (or would live) in ``run_dir``."""
    return Path(run_dir) / CKPT_DIR / f"step-{step:07d}"


def checkpoint_step(path: str | Path) -> int:
    """The step of a checkpoint dir from its name (``step-0001000`` → 1000)."""
    m = _STEP_RE.match(Path(path).name)
    if m is None:
        raise SraError(f"{path}: not a checkpoint directory name (expected step-NNNNNNN)")
    return int(m.group(1))


def write_checkpoint_files(
    tmp_dir: Path, *, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer,
    scaler_state: dict | None, meta: dict,
) -> None:
    """Write the main process's files into ``tmp_dir``, then ``manifest.json``, ``meta.json`` last.

    Call it after every process has written its ``rng-<rank>.pt`` into ``tmp_dir`` (a barrier
    before): the manifest hashes what is in the folder at that moment.
    """
    save_file(_contiguous_cpu(model.state_dict()), tmp_dir / "model.safetensors")
    save_file(_contiguous_cpu(ema.state_dict()), tmp_dir / "ema.safetensors")
    torch.save(optimizer.state_dict(), tmp_dir / "optimizer.pt")
    if scaler_state:
        torch.save(scaler_state, tmp_dir / "scaler.pt")
    write_manifest(tmp_dir)
    # meta.json vouches for the manifest, which vouches for every other file
    _, manifest_sha = file_sha256(tmp_dir / MANIFEST)
    _write_json_durable(tmp_dir / META, dict(meta, format=FORMAT, manifest_sha256=manifest_sha))


def finalize_checkpoint(tmp_dir: Path, final_dir: Path) -> None:
    """Atomically move a complete temporary checkpoint into place."""
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)


def prune_checkpoints(run_dir: str | Path, keep_last: int, milestone_every: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints and every ``milestone_every``-th step."""
    ckpts = list_checkpoints(run_dir)
    removed = []
    for p in ckpts[: max(0, len(ckpts) - keep_last)]:
        step = int(_STEP_RE.match(p.name).group(1))
        if milestone_every > 0 and step % milestone_every == 0:
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def read_meta(ckpt_dir: str | Path) -> dict:
    """A checkpoint's ``meta.json``; missing or corrupt → one-line :class:`SraError`."""
    return _read_json(Path(ckpt_dir) / META)


def _read_manifest(d: Path, meta: dict) -> dict[str, dict] | None:
    """The manifest's ``files`` (validated), or None for checkpoints written before manifests."""
    path = d / MANIFEST
    expected = meta.get("manifest_sha256")
    if not path.exists():
        if expected is not None:  # meta.json says there was one
            raise SraError(f"{path}: missing")
        return None
    manifest = _read_json(path)
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise SraError(f"{path}: corrupt (no 'files' table)")
    for name, entry in files.items():
        ok = (isinstance(name, str) and name == Path(name).name and name not in ("", ".", "..")
              and isinstance(entry, dict) and isinstance(entry.get("size"), int)
              and entry["size"] >= 0 and isinstance(entry.get("sha256"), str)
              and _SHA256_RE.match(entry["sha256"]))
        if not ok:
            raise SraError(f"{path}: corrupt (bad entry {name!r})")
    missing = [n for n in REQUIRED_FILES if n not in files]
    if missing:
        raise SraError(f"{path}: corrupt (does not list {missing[0]})")
    if expected is not None and file_sha256(path)[1] != expected:
        raise SraError(f"{path}: checksum mismatch (not the manifest meta.json was written with)")
    return files


def _hash_set(hashes: bool | Iterable[str], names: Iterable[str]) -> set[str]:
    names = set(names)
    if hashes is True:
        return names
    if hashes is False:
        return set()
    return names & set(hashes)


def verify_checkpoint(path: str | Path, *, hashes: bool | Iterable[str] = True) -> None:
    """Raise a one-line :class:`SraError` naming the file unless checkpoint dir ``path`` is intact.

    With a ``manifest.json``: meta.json and the manifest parse, the manifest is the one meta.json
    was written with, every listed file exists with its recorded size (a short one is reported
    as ``truncated: N of M bytes``), and the files picked by ``hashes`` (True: all, False: none,
    or an iterable of file names) have their recorded SHA-256. Without a manifest (checkpoints
    from before manifests): the required files exist, the safetensors headers are consistent with
    the file sizes, and the ``.pt`` files picked by ``hashes`` load with ``weights_only=True``.
    The verdict does not depend on the calling process (every rank's RNG file is checked).
    """
    d = Path(path)
    if not d.is_dir():
        raise SraError(f"{d}: not a checkpoint directory" if d.exists() else f"{d}: not found")
    meta = read_meta(d)
    files = _read_manifest(d, meta)
    if files is None:
        _verify_by_parsing(d, hashes)
        return
    for name in sorted(files):  # sizes first: cheap, and the clearest message for a short file
        p, want = d / name, files[name]["size"]
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            raise SraError(f"{p}: missing (listed in {MANIFEST})") from None
        if size < want:
            raise SraError(f"{p}: truncated: {size} of {want} bytes")
        if size != want:
            raise SraError(f"{p}: wrong size: {size} bytes, {MANIFEST} says {want}")
    for name in sorted(_hash_set(hashes, files)):
        p, want = d / name, files[name]["sha256"]
        got = file_sha256(p)[1]
        if got != want:
            raise SraError(f"{p}: checksum mismatch (sha256 {got[:12]}…, {MANIFEST} says "
                           f"{want[:12]}…): the file is corrupt")


def _verify_by_parsing(d: Path, hashes: bool | Iterable[str]) -> None:
    """Verification of a checkpoint without manifest: what can be checked by reading the files."""
    for name in REQUIRED_FILES:
        if not (d / name).is_file():
            raise SraError(f"{d / name}: missing")
    for name in ("model.safetensors", "ema.safetensors"):
        check_safetensors(d / name)
    pts = sorted(p.name for p in d.glob("*.pt"))
    for name in sorted(_hash_set(hashes, pts)):
        _load_pt(d / name)


@dataclass
class TrainingState:
    """Everything needed to resume, loaded into memory before any of it is applied."""

    path: Path
    meta: dict
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optimizer: dict
    scaler: dict | None  # None: no scaler.pt (not an fp16 run)
    rng: dict | None  # None: no rng-<rank>.pt for this process (e.g. more processes than saved)

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def load_training_state(path: str | Path, process_index: int = 0, *,
                        verify: bool = True) -> TrainingState:
    """Verify checkpoint dir ``path`` (``verify=False`` skips this, e.g. where the main process
    has verified it already) and load all of it: model and EMA state dicts, optimizer state,
    scaler state or None, this process's RNG state or None, meta. Any failure is a one-line
    :class:`SraError` naming the file. Host memory: about the checkpoint's size at once."""
    d = Path(path)
    if verify:
        if (d / MANIFEST).exists():
            verify_checkpoint(d)
        else:  # parsing is the check here: don't parse the (big) optimizer state twice
            verify_checkpoint(d, hashes=[p.name for p in d.glob("*.pt") if p.name != "optimizer.pt"])
    meta = read_meta(d)
    step, data = meta.get("step"), meta.get("data")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0 or not isinstance(data, dict):
        raise SraError(f"{d / META}: corrupt (no valid 'step' and 'data' entries)")
    model = _check_state_dict(load_safetensors(d / "model.safetensors"), str(d / "model.safetensors"))
    ema = _check_state_dict(load_safetensors(d / "ema.safetensors"), str(d / "ema.safetensors"))
    optimizer = _load_pt(d / "optimizer.pt")
    if not (isinstance(optimizer, dict) and {"state", "param_groups"} <= set(optimizer)):
        raise SraError(f"{d / 'optimizer.pt'}: not an optimizer state (no 'state'/'param_groups')")
    scaler = None
    if (d / "scaler.pt").exists():
        scaler = _load_pt(d / "scaler.pt")
        if not isinstance(scaler, dict):
            raise SraError(f"{d / 'scaler.pt'}: not a grad-scaler state ({type(scaler).__name__})")
    rng = None
    rng_file = d / f"rng-{process_index}.pt"
    if rng_file.exists():
        rng = _load_pt(rng_file)
        if not (isinstance(rng, dict) and {"torch", "numpy", "python"} <= set(rng)):
            raise SraError(f"{rng_file}: not an RNG state (expected torch/numpy/python entries)")
    return TrainingState(path=d, meta=meta, model=model, ema=ema, optimizer=optimizer,
                         scaler=scaler, rng=rng)


def _reason(exc: Exception, d: Path) -> str:
    """``exc``'s message with the checkpoint's own path dropped (``ema.safetensors: truncated …``)."""
    return str(exc).replace(f"{d}{os.sep}", "").replace(str(d), d.name)


def find_resumable_state(
    run_dir: str | Path, process_index: int = 0, *, verify: bool = True,
) -> tuple[TrainingState | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint of ``run_dir`` that verifies and loads, loaded, and the
    newer ones skipped as damaged with why (``[(path, "ema.safetensors: truncated: …")]``).
    (None, skipped) when none loads. Damaged checkpoints are left in place (the run's next
    checkpoint at that step replaces one)."""
    skipped: list[tuple[Path, str]] = []
    for d in reversed(list_checkpoints(run_dir)):
        try:
            return load_training_state(d, process_index, verify=verify), skipped
        except (SraError, OSError) as exc:
            skipped.append((d, _reason(exc, d)))
    return None, skipped


def find_resumable(
    run_dir: str | Path, process_index: int = 0,
) -> tuple[Path | None, list[tuple[Path, str]]]:
    """Like :func:`find_resumable_state` but returns the checkpoint's path (it loads each
    candidate fully to decide; prefer :func:`find_resumable_state` to not load twice)."""
    state, skipped = find_resumable_state(run_dir, process_index)
    return (state.path if state is not None else None), skipped


# -- architecture from weights ---------------------------------------------------------------------
def config_from_state_dict(sd: dict[str, torch.Tensor], num_heads: int | None = None,
                           family: str | None = None, source: str | None = None) -> ModelConfig:
    """Infer a :class:`ModelConfig` from a state dict's names and shapes (release or ours).
    ``source`` (the file) prefixes the error message."""
    where = f"{source}: " if source else ""
    try:
        w = sd["x_embedder.proj.weight"]  # (D, C, p, p)
        hidden, in_ch, patch = w.shape[0], w.shape[1], w.shape[2]
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        tokens = sd["pos_embed"].shape[1]
        out = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
        num_classes = sd["y_embedder.embedding_table.weight"].shape[0] - 1
        head = sd.get("ap_head.linear1.weight")
        head_dim = None if head is None else head.shape[0]
    except (KeyError, ValueError, IndexError, TypeError, AttributeError, ZeroDivisionError) as exc:
        raise SraError(f"{where}not a SiT/DiT state dict (missing or odd entry: {exc})") from None
    grid = int(round(math.sqrt(tokens)))
    if num_heads is None:
        known = {(d, h): n for d, h, n in SIZES.values()}
        num_heads = known.get((depth, hidden), max(1, hidden // 64))
    fam = family or ("DiT" if out == 2 * in_ch else "SiT")
    return ModelConfig(
        family=fam, depth=depth, hidden_size=hidden, num_heads=num_heads, patch_size=patch,
        input_size=grid * patch, in_channels=in_ch, num_classes=num_classes,
        qk_norm="blocks.0.attn.q_norm.weight" in sd,
        projector_dim=None if head is None or head_dim == 2 * hidden else head_dim,
        use_head=head is not None,
    )


def load_state_dict_strict(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` whose failure is one readable line."""
    _check_state_dict(sd, f"checkpoint {source}")
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [k for k in own if k in sd and tuple(own[k].shape) != tuple(sd[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} shape mismatches (e.g. {k}: checkpoint "
                         f"{tuple(sd[k].shape)} vs model {tuple(own[k].shape)})")
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise SraError(f"checkpoint {source} does not fit this architecture: " + "; ".join(parts))
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied into the parameter
        raise SraError(f"checkpoint {source} does not load: {_clean_line(str(exc))}") from None


def _resolve(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if p.is_dir() and not (p / META).is_file():
        latest = latest_checkpoint(p)
        if latest is None:
            raise SraError(f"{p} holds no complete checkpoint (expected {CKPT_DIR}/step-*/{META})")
        return latest
    return p


def _verify_in_checkpoint(p: Path) -> None:
    """A weights file passed on its own that sits in one of our checkpoint dirs is checked against
    that dir's manifest (size and hash), so a damaged copy is not used silently."""
    d = p.parent
    if not ((d / MANIFEST).is_file() and (d / META).is_file()):
        return
    files = _read_manifest(d, read_meta(d))
    if files and p.name in files:
        entry = files[p.name]
        size = p.stat().st_size
        if size != entry["size"]:
            what = "truncated" if size < entry["size"] else "wrong size"
            raise SraError(f"{p}: {what}: {size} of {entry['size']} bytes")
        if file_sha256(p)[1] != entry["sha256"]:
            raise SraError(f"{p}: checksum mismatch ({MANIFEST} disagrees): the file is corrupt")


def load_weights(path: str | Path, weights: str = "ema") -> tuple[dict[str, torch.Tensor], dict]:
    """A state dict and what is known about it, from: a run dir (latest checkpoint), one of our
    checkpoint dirs, a release ``.pt`` (``model``/``ema``/``args``), or a bare ``.pt``/
    ``.safetensors`` state dict. ``weights`` picks ``ema`` or ``model`` where both exist.
    A checkpoint dir is verified first (sizes of all files, hash of the weights file read)."""
    if weights not in ("ema", "model"):
        raise SraError(f"unknown weights {weights!r}; allowed: ema, model")
    p = _resolve(path)
    if p.is_dir():
        name = f"{weights}.safetensors"
        verify_checkpoint(p, hashes=[name])
        meta = read_meta(p)
        sd = _check_state_dict(load_safetensors(p / name), str(p / name))
        return sd, {"source": "sra", "meta": meta, "path": str(p)}
    if p.suffix == ".safetensors":
        _verify_in_checkpoint(p)
        return _check_state_dict(load_safetensors(p), str(p)), {"source": "state_dict", "path": str(p)}
    obj = safe_torch_load(p)
    if isinstance(obj, dict) and ("ema" in obj or "model" in obj):
        key = weights if obj.get(weights) is not None else "model"
        sd = _check_state_dict(obj.get(key), f"{p} (entry {key!r})")
        args = obj.get("args")
        args = vars(args) if isinstance(args, argparse.Namespace) else args
        info = {"source": "release", "path": str(p), "args": args if isinstance(args, dict) else {},
                "steps": obj.get("steps"), "epoch": obj.get("epoch")}
        return sd, info
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _check_state_dict(obj, str(p)), {"source": "state_dict", "path": str(p)}
    raise SraError(f"{p} is neither an sra checkpoint, a release checkpoint nor a state dict")


def load_model(
    path: str | Path, weights: str = "ema", device: str | torch.device = "cpu",
    with_head: bool = False,
) -> tuple[DiffusionTransformer, dict]:
    """A ready model (eval mode) and its info (``model_config``, ``data_info``, ``path_type``, …)."""
    sd, info = load_weights(path, weights)
    cfg = None
    if info["source"] == "sra":
        run_cfg = info["meta"].get("config")
        model_dict = run_cfg.get("model") if isinstance(run_cfg, dict) else None
        where = Path(info["path"]) / META
        if not isinstance(model_dict, dict):
            raise SraError(f"{where}: corrupt (no model config under 'config.model')")
        try:
            cfg = ModelConfig.from_dict(model_dict)
        except (TypeError, ValueError) as exc:
            raise SraError(f"{where}: corrupt model config ({exc})") from None
        info["data_info"] = run_cfg.get("data_info")
        flow = run_cfg.get("flow")
        info["path_type"] = flow.get("path_type", "linear") if isinstance(flow, dict) else "linear"
    else:
        args = info.get("args", {})
        heads = None
        if isinstance(args.get("model"), str):
            from sra.models.registry import parse_name

            try:
                _, size, _ = parse_name(args["model"])
                heads = SIZES[size][2]
            except SraError:
                heads = None
        cfg = config_from_state_dict(sd, num_heads=heads, source=info["path"])
        info["path_type"] = args.get("path_type", "linear")
        res = args.get("resolution")
        if res:
            info["data_info"] = {"kind": "moments", "channels": cfg.in_channels,
                                 "size": cfg.input_size, "num_classes": cfg.num_classes,
                                 "latent_scale": 0.18215, "latent_bias": 0.0, "resolution": res}
    if not with_head and "ap_head.linear1.weight" in sd:
        sd = {k: v for k, v in sd.items() if not k.startswith("ap_head.")}
    from dataclasses import replace

    cfg = replace(cfg, use_head=with_head and cfg.use_head)
    with torch.device("meta"):
        model = build_model(cfg)
    model = model.to_empty(device="cpu")
    load_state_dict_strict(model, sd, str(info["path"]))
    info["model_config"] = cfg
    return model.to(device).eval(), info
