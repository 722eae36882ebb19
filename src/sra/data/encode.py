"""``sra preprocess encode``: images → SD-VAE posterior mean‖std, batched, sharded, resumable.

Output folder ``dest``::

    encode.json            the run's settings (a resumed run must match them)
    progress/shard-*.json  one per finished work shard: rows, labels, skipped inputs
    vae-sd/                the release layout (NNNNN/img-mean-std-NNNNNNNN.npy + dataset.json)
    packed/                the packed layout (see :mod:`sra.data.packed`)
    skipped.json           every skipped input with its reason

The input images (``images/`` of the release layout, or a raw tree with ``crop=True``) are cut
into work shards of ``shard_size`` consecutive inputs; under ``accelerate launch`` process ``r``
of ``W`` takes shards ``r, r+W, …``. A shard is done when its progress file exists (written
after its packed file is complete), so an interrupted run resumes at the first unfinished shard.
Latent file ``k`` is input ``k`` (its horizontal flip, if asked for, is file ``N + k``), so a
skipped input leaves a gap and labels stay aligned by construction.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from sra.data.base import SD_VAE_SCALE
from sra.data.crop import to_rgb
from sra.data.images import SMALL_POLICIES, VAE_DOWNSAMPLE, check_resolution, load_and_crop
from sra.data.packed import ShardWriter, moments_info, shard_name, write_packed_header
from sra.data.release import RELEASE_DIR, latent_name
from sra.data.sources import LABELS_FILE, ImageSource, open_image_source
from sra.data.vae import DEFAULT_VAE, VAE_DTYPES, encode_moments, load_vae
from sra.errors import SraError, check_choice

log = logging.getLogger("sra.data")

LAYOUTS = ("release", "packed")
DEFAULT_SHARD_SIZE = 20000  # inputs per work shard / packed file (~650 MB of 256px latents)
RUN_FILE = "encode.json"
PROGRESS_DIR = "progress"
PACKED_DIR = "packed"
SKIPPED_FILE = "skipped.json"
_PROBE_TRIES = 64  # inputs tried to find one readable image for the resolution check
# Settings a resumed run must share with the run it continues (batch size / workers may change).
_RUN_KEYS = ("source", "num_images", "resolution", "vae", "dtype", "crop", "small", "flip",
             "shard_size", "layouts", "latent_scale")


@dataclass
class EncodeConfig:
    """Settings of :func:`encode_images`."""

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
    """What :func:`encode_images` did (totals cover earlier, resumed-from runs too)."""

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


class _ShardImages(torch.utils.data.Dataset):
    """Decode (and optionally crop) the inputs of one shard; failures come back as reasons."""

    def __init__(self, source: ImageSource, indices: range, resolution: int, crop: bool, small: str):
        self.source, self.indices = source, indices
        self.resolution, self.crop, self.small = resolution, crop, small

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[int, np.ndarray | None, str | None, bool]:
        i = self.indices[j]
        if self.crop:
            arr, reason, upscaled = load_and_crop(self.source, i, self.resolution, self.small)
            return i, arr, reason, upscaled
        try:
            image = self.source.read(i)
        except Exception as exc:  # a corrupt input is a counted skip, never a dead run
            return i, None, f"unreadable ({type(exc).__name__}: {exc})", False
        if image.size != (self.resolution, self.resolution):
            return i, None, (f"size {image.width}x{image.height}, expected "
                             f"{self.resolution}x{self.resolution}"), False
        try:
            return i, np.asarray(to_rgb(image)), None, False
        except Exception as exc:
            return i, None, f"cannot convert ({type(exc).__name__}: {exc})", False


def _keep_list(batch: list) -> list:
    return batch


def _probe_resolution(source: ImageSource) -> tuple[int, int]:
    """(width, height) of the first readable input."""
    for i in range(min(len(source), _PROBE_TRIES)):
        try:
            return source.read(i).size
        except Exception:
            continue
    raise SraError(f"none of the first {min(len(source), _PROBE_TRIES)} images in {source.path} "
                   "can be read")


def _resolve_resolution(cfg: EncodeConfig, source: ImageSource) -> int:
    if cfg.crop:
        if cfg.resolution is None:
            raise SraError("--crop needs --resolution (e.g. 256 or 512)")
        check_resolution(cfg.resolution)
        return cfg.resolution
    w, h = _probe_resolution(source)
    if cfg.resolution is not None:
        check_resolution(cfg.resolution)
        if (w, h) != (cfg.resolution, cfg.resolution):
            raise SraError(f"images in {source.path} are {w}x{h} but --resolution is "
                           f"{cfg.resolution}; crop them first (sra preprocess images) or pass --crop")
        return cfg.resolution
    if w != h or w % VAE_DOWNSAMPLE:
        raise SraError(f"images in {source.path} are {w}x{h}; encode needs square images with a side "
                       f"divisible by {VAE_DOWNSAMPLE}: run `sra preprocess images` or pass "
                       "--crop --resolution")
    return w


def _write_json(path: str, obj: object) -> None:
    with open(path + ".partial", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".partial", path)


def _check_config(cfg: EncodeConfig) -> None:
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


def _run_record(cfg: EncodeConfig, source: ImageSource, resolution: int) -> dict:
    return {
        "source": os.path.abspath(cfg.source), "num_images": len(source), "resolution": resolution,
        "vae": cfg.vae, "dtype": cfg.dtype, "crop": cfg.crop, "small": cfg.small, "flip": cfg.flip,
        "shard_size": cfg.shard_size, "layouts": sorted(cfg.layouts),
        "latent_scale": cfg.latent_scale, "num_classes": source.num_classes,
        "labeled": source.labels is not None,
    }


def _check_dest(cfg: EncodeConfig, record: dict) -> bool:
    """Read-only check (every process runs it): True if ``dest`` holds an earlier run of the
    same settings, False if it is new or empty; SraError otherwise."""
    run_path = os.path.join(cfg.dest, RUN_FILE)
    if os.path.isfile(run_path):
        with open(run_path) as f:
            old = json.load(f)
        diff = [f"{k}: {old.get(k)!r} → {record[k]!r}" for k in _RUN_KEYS if old.get(k) != record[k]]
        if diff:
            raise SraError(f"{cfg.dest} holds an encode with other settings ({'; '.join(diff)}); "
                           "use a new --dest to start over")
        return True
    if os.path.exists(cfg.dest) and not os.path.isdir(cfg.dest):
        raise SraError(f"--dest {cfg.dest} exists and is not a folder")
    if os.path.isdir(cfg.dest) and os.listdir(cfg.dest):
        raise SraError(f"--dest {cfg.dest} is not empty and holds no {RUN_FILE}; use an empty or new folder")
    return False


def _create_dest(cfg: EncodeConfig, record: dict) -> None:
    os.makedirs(os.path.join(cfg.dest, PROGRESS_DIR), exist_ok=True)
    _write_json(os.path.join(cfg.dest, RUN_FILE), record)


def _progress_path(dest: str, k: int) -> str:
    return os.path.join(dest, PROGRESS_DIR, f"shard-{k:05d}.json")


def _encode_shard(
    k: int, cfg: EncodeConfig, source: ImageSource, vae, resolution: int,
    sample_shape: tuple[int, ...], bar,
) -> dict:
    """Encode work shard ``k``; returns (and writes, last) its progress record."""
    n = len(source)
    indices = range(k * cfg.shard_size, min(n, (k + 1) * cfg.shard_size))
    data = _ShardImages(source, indices, resolution, cfg.crop, cfg.small)
    loader = torch.utils.data.DataLoader(
        data, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers,
        collate_fn=_keep_list, persistent_workers=False,
    )
    release_root = os.path.join(cfg.dest, RELEASE_DIR) if "release" in cfg.layouts else None
    writer = None
    if "packed" in cfg.layouts:
        os.makedirs(os.path.join(cfg.dest, PACKED_DIR), exist_ok=True)
        writer = ShardWriter(os.path.join(cfg.dest, PACKED_DIR, shard_name(k)), sample_shape)
    record: dict = {"shard": k, "start": indices.start, "stop": indices.stop, "index": [],
                    "labels": [], "skipped": [], "upscaled": [], "sample_shape": list(sample_shape)}
    made: set[str] = set()
    try:
        for batch in loader:
            good = []
            for i, arr, reason, upscaled in batch:
                if arr is None:
                    record["skipped"].append([source.names[i], reason])
                    log.warning("skipped %s: %s", source.names[i], reason)
                else:
                    good.append((i, arr))
                    if upscaled:
                        record["upscaled"].append(source.names[i])
            bar.update(len(batch))
            if not good:
                continue
            ids = [i for i, _ in good]
            pixels = torch.from_numpy(np.stack([a for _, a in good])).permute(0, 3, 1, 2)  # (B, 3, H, W)
            parts = [(encode_moments(vae, pixels).cpu().numpy(), ids)]
            if cfg.flip:
                parts.append((encode_moments(vae, pixels.flip(-1)).cpu().numpy(), [n + i for i in ids]))
            for moments, numbers in parts:  # moments: (B, 2C, h, w)
                if moments.shape[1:] != sample_shape:
                    raise SraError(f"VAE {cfg.vae} gives latents of shape {moments.shape[1:]}, "
                                   f"expected {sample_shape} (a ÷{VAE_DOWNSAMPLE} SD-style VAE)")
                if release_root is not None:
                    for row, number in zip(moments, numbers):
                        path = os.path.join(release_root, latent_name(number))
                        folder = os.path.dirname(path)
                        if folder not in made:
                            os.makedirs(folder, exist_ok=True)
                            made.add(folder)
                        np.save(path, row)
                if writer is not None:
                    writer.append(moments)
                record["index"].extend(int(x) for x in numbers)
                record["labels"].extend(source.label(i) for i in ids)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    record["rows"] = writer.close() if writer is not None else len(record["index"])
    _write_json(_progress_path(cfg.dest, k), record)  # last: marks the shard finished
    return record


def _finalize(cfg: EncodeConfig, records: list[dict], sample_shape: tuple[int, ...], record_run: dict) -> None:
    """Write the release ``dataset.json``, the packed header and ``skipped.json``."""
    index = np.array([x for r in records for x in r["index"]], dtype=np.int64)
    labels = np.array([x for r in records for x in r["labels"]], dtype=np.int64)
    if index.size == 0:
        first = next((s for r in records for s in r["skipped"]), ["?", "?"])
        raise SraError(f"none of the {record_run['num_images']} images in {cfg.source} could be "
                       f"encoded (first problem: {first[0]}: {first[1]})")
    unlabeled = not record_run["labeled"]
    if "release" in cfg.layouts:
        order = np.argsort(index, kind="stable")
        entries = None if unlabeled else [[latent_name(int(index[j])), int(labels[j])] for j in order]
        _write_json(os.path.join(cfg.dest, RELEASE_DIR, LABELS_FILE), {"labels": entries})
    if "packed" in cfg.layouts:
        info = moments_info(sample_shape, record_run["num_classes"], cfg.latent_scale)
        shards = [(shard_name(r["shard"]), r["rows"]) for r in records]
        write_packed_header(
            os.path.join(cfg.dest, PACKED_DIR), shards, labels, index, info, sample_shape,
            extra={"source": record_run["source"], "vae": cfg.vae, "flip": cfg.flip,
                   "vae_dtype": cfg.dtype},
        )
    skipped = [s for r in records for s in r["skipped"]]
    _write_json(os.path.join(cfg.dest, SKIPPED_FILE), {"count": len(skipped), "skipped": skipped})


def encode_images(cfg: EncodeConfig) -> EncodeReport:
    """Encode every input image to VAE moments in the release and/or packed layout (resumable)."""
    from accelerate import PartialState
    from tqdm import tqdm

    _check_config(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # Without GPUs accelerate only forms a process group when asked for CPU processes.
    state = PartialState(cpu=world > 1 and not torch.cuda.is_available())
    if state.num_processes != world:
        raise SraError(f"launched as {world} processes but accelerate sees {state.num_processes}; "
                       "they would write the same shards (check the accelerate/torchrun set-up)")
    source = open_image_source(cfg.source, limit=cfg.limit)
    resolution = _resolve_resolution(cfg, source)
    record_run = _run_record(cfg, source, resolution)
    resuming = _check_dest(cfg, record_run)  # all processes: an error stops every one of them
    state.wait_for_everyone()
    if state.is_main_process and not resuming:
        _create_dest(cfg, record_run)
    state.wait_for_everyone()

    num_shards = -(-len(source) // cfg.shard_size)
    done = {k for k in range(num_shards) if os.path.isfile(_progress_path(cfg.dest, k))}
    mine = [k for k in range(num_shards) if k % state.num_processes == state.process_index and k not in done]
    if done and state.is_main_process:
        log.info("resuming: %d of %d shards already encoded", len(done), num_shards)

    encoded_now, seconds = 0, 0.0
    if mine:
        vae = load_vae(cfg.vae, device=state.device, dtype=cfg.dtype)
        t0 = time.perf_counter()  # throughput of the encode itself, not of loading the VAE
        latent_channels = int(vae.config.latent_channels)
        side = resolution // VAE_DOWNSAMPLE
        sample_shape = (2 * latent_channels, side, side)
        todo = sum(min(len(source), (k + 1) * cfg.shard_size) - k * cfg.shard_size for k in mine)
        bar = tqdm(total=todo, desc=f"encode[{state.process_index}]", unit="img",
                   disable=not (cfg.progress and state.is_main_process))
        try:
            for k in mine:
                rec = _encode_shard(k, cfg, source, vae, resolution, sample_shape, bar)
                encoded_now += (rec["stop"] - rec["start"]) - len(rec["skipped"])
        finally:
            bar.close()
        seconds = time.perf_counter() - t0
    state.wait_for_everyone()

    records = []
    for k in range(num_shards):
        path = _progress_path(cfg.dest, k)
        if not os.path.isfile(path):
            raise SraError(f"shard {k} of {cfg.dest} is unfinished (a process failed?); rerun to resume")
        with open(path) as f:
            records.append(json.load(f))
    packed_dir = os.path.join(cfg.dest, PACKED_DIR)
    if state.is_main_process:
        _finalize(cfg, records, tuple(records[0]["sample_shape"]), record_run)
    state.wait_for_everyone()

    skipped = [(s[0], s[1]) for r in records for s in r["skipped"]]
    encoded = sum((r["stop"] - r["start"]) - len(r["skipped"]) for r in records)
    if skipped and state.is_main_process:
        log.warning("%d of %d images skipped (listed in %s)", len(skipped), len(source),
                    os.path.join(cfg.dest, SKIPPED_FILE))
    return EncodeReport(
        dest=cfg.dest, total_images=len(source), encoded_images=encoded,
        samples=sum(r["rows"] for r in records), shards=num_shards, shards_reused=len(done),
        skipped=skipped, upscaled=[u for r in records for u in r["upscaled"]], seconds=seconds,
        images_per_second=encoded_now / seconds if encoded_now and seconds > 0 else 0.0,
        release_dir=os.path.join(cfg.dest, RELEASE_DIR) if "release" in cfg.layouts else None,
        packed_dir=packed_dir if "packed" in cfg.layouts else None,
    )


def report_dict(report: EncodeReport) -> dict:
    """The report as a JSON-friendly dict (skip lists shortened to their count and first few)."""
    d = asdict(report)
    d["skipped_count"], d["skipped"] = len(report.skipped), [list(s) for s in report.skipped[:20]]
    d["upscaled_count"], d["upscaled"] = len(report.upscaled), report.upscaled[:20]
    return d
