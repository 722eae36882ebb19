"""Running an encode (``sra preprocess encode``): images → SD-VAE mean‖std, sharded, resumable.

This module runs the job: it checks the settings and the destination (a resumed run must match
the one it continues), splits the inputs into work shards among the processes and collects their
records into the report. Settings and the output folder's names are in
:mod:`sra.data.encode_config`; writing a shard and the final headers in :mod:`sra.data.encode_shards`.

The input images (``images/`` of the release layout, or a raw tree with ``crop=True``) are cut
into work shards of ``shard_size`` consecutive inputs; under ``accelerate launch`` process ``r``
of ``W`` takes shards ``r, r+W, …``. A shard is done when its progress file exists (written
after its packed file is complete), so an interrupted run resumes at the first unfinished shard.
"""

from __future__ import annotations

import json
import logging
import os
import time

import torch

from sra.data.encode_config import (
    PROGRESS_DIR, RUN_FILE, SKIPPED_FILE, EncodeConfig, EncodeReport, check_config, progress_path,
    report_dict, write_record,
)
from sra.data.encode_shards import encode_shard, finalize
from sra.data.formats import PACKED_DIR, RELEASE_DIR, VAE_DOWNSAMPLE
from sra.data.images import check_resolution
from sra.data.sources import ImageSource, open_image_source
from sra.data.vae import load_vae
from sra.errors import SraError

log = logging.getLogger("sra.data")

__all__ = ["EncodeConfig", "EncodeReport", "encode_images", "report_dict"]

_PROBE_TRIES = 64  # inputs tried to find one readable image for the resolution check
# Settings a resumed run must share with the run it continues (batch size / workers may change).
_RUN_KEYS = ("source", "num_images", "resolution", "vae", "dtype", "crop", "small", "flip",
             "shard_size", "layouts", "latent_scale")


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
    write_record(os.path.join(cfg.dest, RUN_FILE), record)


def encode_images(cfg: EncodeConfig) -> EncodeReport:
    """Encode every input image to VAE moments in the release and/or packed layout (resumable)."""
    from accelerate import PartialState
    from tqdm import tqdm

    check_config(cfg)
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
    done = {k for k in range(num_shards) if os.path.isfile(progress_path(cfg.dest, k))}
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
                rec = encode_shard(k, cfg, source, vae, resolution, sample_shape, bar)
                encoded_now += (rec["stop"] - rec["start"]) - len(rec["skipped"])
        finally:
            bar.close()
        seconds = time.perf_counter() - t0
    state.wait_for_everyone()

    records = []
    for k in range(num_shards):
        path = progress_path(cfg.dest, k)
        if not os.path.isfile(path):
            raise SraError(f"shard {k} of {cfg.dest} is unfinished (a process failed?); rerun to resume")
        with open(path) as f:
            records.append(json.load(f))
    packed_dir = os.path.join(cfg.dest, PACKED_DIR)
    if state.is_main_process:
        finalize(cfg, records, tuple(records[0]["sample_shape"]), record_run)
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
