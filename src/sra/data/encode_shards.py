"""Writing an encode's output: one work shard of images → latents on disk, then the final headers.

A work shard is ``shard_size`` consecutive inputs. Its latents go to the release layout (one
``.npy`` per image) and/or one packed shard file; its progress record is written last, so a
shard with a record is complete. Latent file ``k`` is input ``k`` (its horizontal flip, if asked
for, is file ``N + k``), so a skipped input leaves a gap and labels stay aligned by construction.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from sra.atomic import atomic_path
from sra.data.crop import to_rgb
from sra.data.encode_config import SKIPPED_FILE, EncodeConfig, progress_path, write_record
from sra.data.formats import (
    LABELS_FILE, PACKED_DIR, RELEASE_DIR, VAE_DOWNSAMPLE, latent_name, moments_info, shard_name,
)
from sra.data.images import load_and_crop
from sra.data.packed import ShardWriter, write_packed_header
from sra.data.sources import ImageSource
from sra.data.vae import encode_moments
from sra.errors import SraError

log = logging.getLogger("sra.data")


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


def encode_shard(
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
                        with atomic_path(path) as tmp, open(tmp, "wb") as f:
                            np.save(f, row)  # never a half-written latent, even on a full disk
                if writer is not None:
                    writer.append(moments)
                record["index"].extend(int(x) for x in numbers)
                record["labels"].extend(source.label(i) for i in ids)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    record["rows"] = writer.close() if writer is not None else len(record["index"])
    write_record(progress_path(cfg.dest, k), record)  # last: marks the shard finished
    return record


def finalize(cfg: EncodeConfig, records: list[dict], sample_shape: tuple[int, ...], run: dict) -> None:
    """Write the release ``dataset.json``, the packed header and ``skipped.json`` from every
    shard's progress record (``run``: the run's settings record, ``encode.json``)."""
    index = np.array([x for r in records for x in r["index"]], dtype=np.int64)
    labels = np.array([x for r in records for x in r["labels"]], dtype=np.int64)
    if index.size == 0:
        first = next((s for r in records for s in r["skipped"]), ["?", "?"])
        raise SraError(f"none of the {run['num_images']} images in {cfg.source} could be "
                       f"encoded (first problem: {first[0]}: {first[1]})")
    unlabeled = not run["labeled"]
    if "release" in cfg.layouts:
        order = np.argsort(index, kind="stable")
        entries = None if unlabeled else [[latent_name(int(index[j])), int(labels[j])] for j in order]
        write_record(os.path.join(cfg.dest, RELEASE_DIR, LABELS_FILE), {"labels": entries})
    if "packed" in cfg.layouts:
        info = moments_info(sample_shape, run["num_classes"], cfg.latent_scale)
        shards = [(shard_name(r["shard"]), r["rows"]) for r in records]
        write_packed_header(
            os.path.join(cfg.dest, PACKED_DIR), shards, labels, index, info, sample_shape,
            extra={"source": run["source"], "vae": cfg.vae, "flip": cfg.flip,
                   "vae_dtype": cfg.dtype},
        )
    skipped = [s for r in records for s in r["skipped"]]
    write_record(os.path.join(cfg.dest, SKIPPED_FILE), {"count": len(skipped), "skipped": skipped})
