"""Settings, result and output-folder names of ``sra preprocess encode`` (no work is done here).

Output folder ``dest``::

    encode.json            the run's settings (a resumed run must match them)
    progress/shard-*.json  one per finished work shard: rows, labels, skipped inputs
    vae-sd/                the release layout (NNNNN/img-mean-std-NNNNNNNN.npy + dataset.json)
    packed/                the packed layout (see :mod:`sra.data.packed`)
    skipped.json           every skipped input with its reason

Shared by the orchestration (:mod:`sra.data.encode`) and the shard writer
(:mod:`sra.data.encode_shards`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from sra.atomic import atomic_write_text
from sra.data.base import SD_VAE_SCALE
from sra.data.formats import DEFAULT_SHARD_SIZE
from sra.data.images import SMALL_POLICIES
from sra.data.vae import DEFAULT_VAE, VAE_DTYPES
from sra.errors import SraError, check_choice

LAYOUTS = ("release", "packed")
RUN_FILE = "encode.json"
PROGRESS_DIR = "progress"
SKIPPED_FILE = "skipped.json"


@dataclass
class EncodeConfig:
    """Settings of :func:`sra.data.encode.encode_images`."""

    source: str  # images layout (folder/ZIP with dataset.json) or, with crop=True, a raw tree
    dest: str
    vae: str = DEFAULT_VAE  # hub id or local folder (AutoencoderKL)
    resolution: int | None = None  # required with crop; otherwise checked against the images
    crop: bool = False  # ADM-crop raw images on the fly (skips the images/ step)
    small: str = "upscale"  # with crop: inputs below the resolution are upscaled or skipped
    flip: bool = False  # also encode horizontally flipped copies (files N..2N-1)
    batch_size: int = 64
    workers: int = 4  # image-decoding DataLoader workers per process
    shard_size: int = DEFAULT_SHARD_SIZE
    layouts: tuple[str, ...] = LAYOUTS
    latent_scale: float = SD_VAE_SCALE  # stored with the packed data
    dtype: str = "float32"  # VAE compute dtype; stored latents are always float32
    limit: int | None = None  # only the first N inputs
    progress: bool = True


@dataclass
class EncodeReport:
    """What :func:`sra.data.encode.encode_images` did (totals cover earlier, resumed-from runs too)."""

    dest: str
    total_images: int
    encoded_images: int
    samples: int  # latent files / packed rows (2× encoded images with flip)
    shards: int
    shards_reused: int  # finished by an earlier run
    skipped: list[tuple[str, str]] = field(default_factory=list)
    upscaled: list[str] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0  # this run, this process
    release_dir: str | None = None
    packed_dir: str | None = None


def check_config(cfg: EncodeConfig) -> None:
    """Raise :class:`SraError` for a setting no encode can run with."""
    check_choice("VAE dtype", cfg.dtype, VAE_DTYPES)
    check_choice("--small policy", cfg.small, SMALL_POLICIES)
    if not cfg.layouts:
        raise SraError(f"--layouts needs at least one of: {', '.join(LAYOUTS)}")
    for layout in cfg.layouts:
        check_choice("layout", layout, LAYOUTS)
    for name in ("batch_size", "shard_size"):
        if getattr(cfg, name) <= 0:
            raise SraError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(cfg, name)}")
    if cfg.workers < 0:
        raise SraError(f"--workers must be ≥ 0, got {cfg.workers}")
    if not cfg.latent_scale > 0:
        raise SraError(f"--latent-scale must be positive, got {cfg.latent_scale}")


def progress_path(dest: str, k: int) -> str:
    """The progress record of work shard ``k`` (its existence marks the shard finished)."""
    return os.path.join(dest, PROGRESS_DIR, f"shard-{k:05d}.json")


def write_record(path: str, obj: object) -> None:
    """Write ``obj`` as compact JSON, atomically (compact: ``dataset.json`` holds an entry per
    image)."""
    atomic_write_text(path, json.dumps(obj))


def report_dict(report: EncodeReport) -> dict:
    """The report as a JSON-friendly dict (skip lists shortened to their count and first few)."""
    d = asdict(report)
    d["skipped_count"], d["skipped"] = len(report.skipped), [list(s) for s in report.skipped[:20]]
    d["upscaled_count"], d["upscaled"] = len(report.upscaled), report.upscaled[:20]
    return d
