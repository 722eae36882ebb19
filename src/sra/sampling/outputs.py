"""The output directory of a sampling job: its files, the config check, and resume bookkeeping.

Layout::

    sampling_config.json        resolved config; written at the start (complete: false), final at the end
    samples/000000.png …        format png | both (RGB, one per sample, named by global index)
    shards/batch-000000.npz     format npz | both: one per finished batch; removed once assembled
    samples.npz                 format npz | both: arr_0 uint8 (N, H, W, 3) (ADM suite), labels (N,)
    grid.png                    the first samples as one image (written by the caller's grid writer)
    .sra-lock                   the job's directory lock (sra.runlock): one job per directory

Every file is written to ``NAME.tmp`` and renamed into place, so a killed job leaves only
complete files (and ``.tmp`` leftovers, removed at the end of the next run). A batch whose files
all exist is done; a directory holding another config's samples is refused.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm.auto import tqdm

from sra.atomic import atomic_path, atomic_write_text
from sra.data.adm_npz import write_adm_npz
from sra.errors import SraError
from sra.runlock import LOCK_NAME

FORMAT = "sra-samples-v1"
CONFIG_NAME = "sampling_config.json"
NPZ_NAME = "samples.npz"
GRID_NAME = "grid.png"
PNG_DIR = "samples"
SHARD_DIR = "shards"
PNG_COMPRESS_LEVEL = 4  # lossless either way; lower is faster to write


# -- files of one batch ---------------------------------------------------------------------------
def png_path(out: Path, i: int) -> Path:
    return out / PNG_DIR / f"{i:06d}.png"


def shard_path(out: Path, k: int) -> Path:
    return out / SHARD_DIR / f"batch-{k:06d}.npz"


def write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG", compress_level=PNG_COMPRESS_LEVEL)


def read_png(path: Path) -> np.ndarray:
    """uint8 (H, W, 3)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def write_shard(path: Path, images: np.ndarray, labels: np.ndarray, start: int) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, images=images, labels=labels, start=np.int64(start))


def save_batch(out: Path, k: int, start: int, images: np.ndarray, labels: np.ndarray,
               want_png: bool, want_npz: bool) -> None:
    """The files of finished batch ``k`` (samples start…): its PNGs and/or its shard."""
    if want_png:
        for j, image in enumerate(images):
            write_png(png_path(out, start + j), image)
    if want_npz:
        write_shard(shard_path(out, k), images, labels, start)


def batch_done(out: Path, k: int, start: int, stop: int, want_png: bool, want_npz: bool,
               npz_complete: bool) -> bool:
    """Whether batch ``k`` needs no sampling: its PNGs exist, and its images are in the finished
    npz, its shard, or (with both formats) the PNGs that can rebuild the npz."""
    png_ok = all(png_path(out, i).is_file() for i in range(start, stop)) if want_png else True
    npz_ok = (not want_npz) or npz_complete or shard_path(out, k).is_file() or (want_png and png_ok)
    return png_ok and npz_ok


# -- assembly -----------------------------------------------------------------------------------
def assemble_npz(out: Path, batches: list[tuple[int, int]], labels: np.ndarray, grid_size: int,
                 progress: bool) -> tuple[list[int], np.ndarray]:
    """Write ``samples.npz`` (with ``labels``, one per sample) from every batch's shard (or its
    PNGs) in index order and remove the shards. Returns the image shape [H, W, 3] and the first
    ``grid_size`` images (n, H, W, 3)."""
    grid: list[np.ndarray] = []

    def batch_images() -> Iterator[np.ndarray]:
        for k, (start, stop) in enumerate(tqdm(batches, desc="assembling", unit="batch",
                                               disable=not progress)):
            shard = shard_path(out, k)
            if shard.is_file():
                with np.load(shard) as z:
                    images = z["images"]
            else:
                images = np.stack([read_png(png_path(out, i)) for i in range(start, stop)])
            if len(grid) < grid_size:
                grid.extend(images[: grid_size - len(grid)])
            yield images

    shards = sorted((out / SHARD_DIR).glob("batch-*.npz"))
    chunks = batch_images()
    first = next(chunks)  # fixes the image shape of arr_0's header
    image_shape = list(first.shape[1:])
    write_adm_npz(out / NPZ_NAME, itertools.chain([first], chunks), len(labels), tuple(image_shape),
                  labels)
    for p in shards:
        p.unlink()
    return image_shape, np.stack(grid) if grid else np.zeros((0, *image_shape), np.uint8)


def first_pngs(out: Path, n: int) -> np.ndarray:
    """The PNGs of samples 0…n−1, uint8 (n, H, W, 3)."""
    return np.stack([read_png(png_path(out, i)) for i in range(n)])


def remove_leftovers(out: Path, sub: str) -> None:
    """Delete the ``.tmp`` files a killed run left in ``out/sub``."""
    for p in (out / sub).glob("*.tmp"):
        p.unlink()


# -- the config record ----------------------------------------------------------------------------
def normalize(obj: Any) -> Any:
    """JSON round trip: tuples → lists, so stored and fresh configs compare equal."""
    return json.loads(json.dumps(obj))


def read_config(out: Path) -> dict | None:
    p = out / CONFIG_NAME
    if not p.is_file():
        return None
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise SraError(f"cannot read {p} ({exc}); remove it or use another output dir") from None


def write_config(out: Path, doc: dict) -> None:
    atomic_write_text(out / CONFIG_NAME, json.dumps(doc, indent=2))


def check_output_dir(out: Path, identity: dict) -> dict | None:
    """The previous run's config if it matches; refuse foreign or different-config content."""
    prev = read_config(out)
    if prev is None:
        if out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()):
            raise SraError(f"output dir {out} is not empty and holds no {CONFIG_NAME}; "
                           "use a new or empty --output-dir")
        return None
    old = prev.get("identity", {})
    if prev.get("format") != FORMAT or old != identity:
        diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        raise SraError(f"output dir {out} holds samples of a different config (differs in: "
                       f"{', '.join(diff) or 'format'}); use another --output-dir or the same settings")
    return prev


def vae_id(name: str) -> str:
    """A local VAE folder by absolute path (so resuming from another cwd matches), else the hub id."""
    return os.path.abspath(name) if os.path.isdir(name) else name
