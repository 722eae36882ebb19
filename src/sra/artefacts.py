"""External files by short name: the registry of known artefacts, and fetching any of them.

Wherever a command takes a file it also takes

- a registry name (``sra-sit-xl2-256``, ``imagenet256``, ``inception-2015-12-05``; ``sra
  artefacts`` lists them),
- ``hf://owner/repo/path/in/repo`` (``@revision`` after the repo optional) — fetched with
  ``huggingface_hub`` into its usual cache (``HF_HOME``, resume, ``HF_HUB_OFFLINE=1``);
  ``hf://owner/repo`` alone is an ``sra export`` folder uploaded there;
  ``https://huggingface.co/owner/repo/resolve/rev/path`` URLs go the same way;
- any other ``https://`` / ``http://`` URL — downloaded once into ``$SRA_CACHE_DIR/downloads``
  with a progress bar, resumed from a partial file (HTTP Range), checked against the size and
  SHA-256 the registry knows, and renamed into place only when complete.

Offline (``HF_HUB_OFFLINE=1`` or ``SRA_OFFLINE=1``) a cached copy is used and anything else is one
clear error line; so is a 404, a size or hash mismatch, or a network failure.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from sra.errors import SraError, first_line
from sra.oserrors import as_write_error, writing

CACHE_ENV = "SRA_CACHE_DIR"
OFFLINE_ENVS = ("SRA_OFFLINE", "HF_HUB_OFFLINE")
CHUNK = 1 << 20  # download and hash 1 MiB at a time
TIMEOUT_S = 60
_HF_URL = re.compile(r"^https://huggingface\.co/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
EXPORT_FILES = ("config.json", "model.safetensors", "README.md")  # what `sra export` writes
_ADM = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet"


@dataclass(frozen=True)
class Artefact:
    """A file the project knows by name. ``size``/``sha256`` are checked when published."""

    name: str
    url: str  # https://… or hf://owner/repo/path
    kind: str  # checkpoint | reference | inception
    about: str
    size: int | None = None
    sha256: str | None = None  # a prefix is allowed (torch-fidelity publishes 8 hex digits)


ARTEFACTS: dict[str, Artefact] = {a.name: a for a in (
    Artefact("sra-sit-xl2-256", "hf://DyJiang/SRA/sitxl-sra-res256-ep800.pt", "checkpoint",
             "SiT-XL/2 + SRA, ImageNet 256×256, 800 epochs (the release; FID 1.58 with CFG)"),
    Artefact("sra-sit-xl2-512", "hf://DyJiang/SRA/sitxl-sra-res512-ep400.pt", "checkpoint",
             "SiT-XL/2 + SRA, ImageNet 512×512, 400 epochs (the release; FID 2.07 with CFG)"),
    Artefact("imagenet256", f"{_ADM}/256/VIRTUAL_imagenet256_labeled.npz", "reference",
             "ADM reference batch, ImageNet 256×256 (10K images + FID/sFID statistics)"),
    Artefact("imagenet512", f"{_ADM}/512/VIRTUAL_imagenet512.npz", "reference",
             "ADM reference batch, ImageNet 512×512 (10K images + FID/sFID statistics)"),
    Artefact("inception-2015-12-05",
             "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
             "weights-inception-2015-12-05-6726825d.pth", "inception",
             "Inception-v3 of the ADM suite, torch-fidelity's port of the TF graph",
             sha256="6726825d"),
)}


def offline() -> bool:
    """Whether downloads are off (``SRA_OFFLINE`` or ``HF_HUB_OFFLINE`` set to a true value)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in OFFLINE_ENVS)


def download_dir() -> Path:
    """Where plain URLs are cached: ``$SRA_CACHE_DIR/downloads`` (default ``~/.cache/sra``)."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sra"
    return Path(root).expanduser() / "downloads"


def is_remote(spec: str) -> bool:
    """Whether ``spec`` names something to fetch rather than a local path."""
    return spec.startswith(("hf://", "http://", "https://")) or spec in ARTEFACTS


def resolve(spec: str | os.PathLike, what: str = "file") -> Path:
    """A local path for ``spec``: an existing path as it is; a registry name, ``hf://`` or URL
    fetched (or found in the cache). ``what`` names the file in messages (e.g. "--ckpt")."""
    spec = os.fspath(spec)
    if not is_remote(spec):
        path = Path(spec).expanduser()
        if not path.exists():
            names = ", ".join(ARTEFACTS)
            raise FileNotFoundError(f"{what} not found: {spec} (a local path, a known name — "
                                    f"{names} — an hf://owner/repo/path or an https:// URL)")
        return path
    # A registry entry by name, or by its very URL (its size and hash are then checked too).
    art = ARTEFACTS.get(spec) or next((a for a in ARTEFACTS.values() if a.url == spec), None)
    url = art.url if art else spec
    m = _HF_URL.match(url)
    if m:
        url = f"hf://{m.group(1)}@{m.group(2)}/{m.group(3)}"
    if url.startswith("hf://"):
        path = _fetch_hf(url, what)
    else:
        path = _fetch_url(url, what, art)
    if art is not None and art.sha256 and url.startswith("hf://"):
        _check_file(path, art, url)
    return path


# -- Hugging Face Hub --------------------------------------------------------------------------------
def parse_hf(url: str) -> tuple[str, str | None, str]:
    """``hf://owner/repo[@rev]/path`` → (repo_id, revision or None, path in the repo)."""
    rest = url[len("hf://"):]
    parts = rest.split("/", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise SraError(f"bad hf:// address {url!r}; expected hf://owner/repo[@revision]/path")
    repo, revision = parts[1], None
    if "@" in repo:
        repo, revision = repo.split("@", 1)
    return f"{parts[0]}/{repo}", revision, parts[2] if len(parts) == 3 else ""


def hf_cache_dir() -> Path:
    """huggingface_hub's cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub`` (``~/.cache/huggingface``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    return Path(home).expanduser() / "hub"


def _fetch_hf(url: str, what: str) -> Path:
    """A file (or, with no/empty path, the whole repo snapshot) through huggingface_hub's cache."""
    import huggingface_hub as hf
    from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    repo_id, revision, path = parse_hf(url)
    # Read per call, not at import as huggingface_hub does: the environment of this run counts.
    kwargs = dict(revision=revision, endpoint=os.environ.get("HF_ENDPOINT") or None,
                  cache_dir=hf_cache_dir(), local_files_only=offline())
    try:
        if not path or path.endswith("/"):  # a folder: an `sra export` fetches by its file names
            files = [f"{path}{name}" for name in EXPORT_FILES]
            first = Path(hf.hf_hub_download(repo_id, files[0], **kwargs))
            for name in files[1:]:
                hf.hf_hub_download(repo_id, name, **kwargs)
            return first.parent
        return Path(hf.hf_hub_download(repo_id, path, **kwargs))
    except LocalEntryNotFoundError as exc:
        if offline():
            raise SraError(f"{what} {url}: not in the Hugging Face cache and downloads are off "
                           f"(offline); fetch it once online or pass a local file") from None
        cause = exc.__cause__ or exc.__context__ or exc  # what the Hub said, when it was reached
        raise SraError(f"{what} {url}: download failed and no cached copy exists "
                       f"({first_line(cause, with_type=True)})") from None
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise SraError(f"{what} {url}: not found on the Hub ({type(exc).__name__})") from None
    except (OSError, ValueError) as exc:  # network errors, HTTP errors, a full cache disk
        refused = as_write_error(exc, getattr(exc, "filename", None) or hf_cache_dir())
        if refused is not None:
            raise refused from None
        raise SraError(f"{what} {url}: download failed ({first_line(exc, with_type=True)})") from None


# -- plain URLs --------------------------------------------------------------------------------------
def cache_path(url: str) -> Path:
    """Where ``url`` is cached: the file name, prefixed by a short hash of the whole URL."""
    name = url.rstrip("/").rsplit("/", 1)[-1].split("?")[0] or "download"
    return download_dir() / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}"


def _fetch_url(url: str, what: str, art: Artefact | None) -> Path:
    target = cache_path(url)
    if target.is_file():
        return target  # verified before it was renamed into place
    if offline():
        raise SraError(f"{what} {url}: not in the cache ({target}) and downloads are off (offline)")
    part = target.with_name(target.name + ".part")
    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
    try:
        _download(url, part)
    except urllib.error.HTTPError as exc:
        raise SraError(f"{what} {url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        refused = as_write_error(exc, target)
        if refused is not None:  # a full or read-only disk: the partial file only takes space
            part.unlink(missing_ok=True)
            raise refused from None
        reason = getattr(exc, "reason", exc)
        raise SraError(f"{what} {url}: download failed ({first_line(str(reason)) or type(exc).__name__}); "
                       f"the partial file is kept and resumed next time") from None
    try:
        _check_file(part, art, url)
    except SraError:
        part.unlink()  # a wrong file must not be resumed either
        raise
    os.replace(part, target)
    return target


def _download(url: str, part: Path) -> None:
    """GET ``url`` into ``part``, continuing a partial file with an HTTP Range request."""
    from tqdm.auto import tqdm

    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code != 416 or not have:  # 416: nothing left to send — the part is complete
            raise
        return
    with resp:
        resumed = have and resp.status == 206
        if not resumed:
            have = 0  # the server ignored the range: start over
        total = resp.headers.get("Content-Length")
        total = int(total) + have if total is not None else None
        with open(part, "ab" if resumed else "wb") as f, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, desc=part.name[13:-5],
                disable=None) as bar:
            while chunk := resp.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    got = part.stat().st_size
    if total is not None and got < total:  # http.client ends a cut-off body quietly
        raise OSError(f"the connection closed after {got} of {total} bytes")


def _check_file(path: Path, art: Artefact | None, url: str) -> None:
    """Size and SHA-256 (or its published prefix) of a fetched file, when the registry has them."""
    if art is None:
        return
    size = path.stat().st_size
    if art.size is not None and size != art.size:
        raise SraError(f"{url}: got {size} bytes, expected {art.size}; the download is discarded")
    if art.sha256:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        if not h.hexdigest().startswith(art.sha256):
            raise SraError(f"{url}: SHA-256 {h.hexdigest()[:16]}… does not match the registry's "
                           f"{art.sha256[:16]}…; the download is discarded")
