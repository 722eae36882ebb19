"""Our run format on disk: where checkpoints live, their manifest, and checking them.

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
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from sra.atomic import atomic_write_json
from sra.checkpoints.safe import check_safetensors, file_sha256, load_pt_required, read_json
from sra.errors import SraError

FORMAT = "sra-ckpt-v1"
MANIFEST_FORMAT = "sra-manifest-v1"
CKPT_DIR = "checkpoints"
META = "meta.json"
MANIFEST = "manifest.json"
REQUIRED_FILES = ("model.safetensors", "ema.safetensors", "optimizer.pt")
STEP_RE = re.compile(r"^step-(\d+)$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run (those with ``meta.json``), oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_RE.match(p.name)) and (p / META).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives (or would live) in ``run_dir``."""
    return Path(run_dir) / CKPT_DIR / f"step-{step:07d}"


def checkpoint_step(path: str | Path) -> int:
    """The step of a checkpoint dir from its name (``step-0001000`` → 1000)."""
    m = STEP_RE.match(Path(path).name)
    if m is None:
        raise SraError(f"{path}: not a checkpoint directory name (expected step-NNNNNNN)")
    return int(m.group(1))


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
    atomic_write_json(d / MANIFEST, manifest, fsync=True)
    return manifest


def read_meta(ckpt_dir: str | Path) -> dict:
    """A checkpoint's ``meta.json``; missing or corrupt → one-line :class:`SraError`."""
    return read_json(Path(ckpt_dir) / META)


def read_manifest(d: Path, meta: dict) -> dict[str, dict] | None:
    """The manifest's ``files`` (validated), or None for checkpoints written before manifests."""
    path = d / MANIFEST
    expected = meta.get("manifest_sha256")
    if not path.exists():
        if expected is not None:  # meta.json says there was one
            raise SraError(f"{path}: missing")
        return None
    manifest = read_json(path)
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
    files = read_manifest(d, meta)
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
        load_pt_required(d / name)


def verify_member(p: Path) -> None:
    """A weights file passed on its own that sits in one of our checkpoint dirs is checked against
    that dir's manifest (size and hash), so a damaged copy is not used silently."""
    d = p.parent
    if not ((d / MANIFEST).is_file() and (d / META).is_file()):
        return
    files = read_manifest(d, read_meta(d))
    if files and p.name in files:
        entry = files[p.name]
        size = p.stat().st_size
        if size != entry["size"]:
            what = "truncated" if size < entry["size"] else "wrong size"
            raise SraError(f"{p}: {what}: {size} of {entry['size']} bytes")
        if file_sha256(p)[1] != entry["sha256"]:
            raise SraError(f"{p}: checksum mismatch ({MANIFEST} disagrees): the file is corrupt")
