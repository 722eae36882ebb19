"""Tiny on-disk datasets for tests: release latents (+ images), packed latents, ZIPs of folders."""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np
from PIL import Image

from sra.data.formats import latent_name, moments_info, shard_name
from sra.data.packed import ShardWriter, write_packed_header


def zip_dir(src, dest) -> str:
    """``src``'s files in a stored ZIP at ``dest``, named by their POSIX paths under ``src``."""
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED) as zf:
        for root, _dirs, files in os.walk(src):
            for f in sorted(files):
                full = os.path.join(root, f)
                zf.write(full, os.path.relpath(full, src).replace(os.sep, "/"))
    return str(dest)


def release_data(root, n: int = 8, side: int = 4, images: bool = True, skip=(),
                 labels=None) -> None:
    """A release layout: vae-sd/ (mean‖std (8, side, side)) and, if asked, images/ (RGB PNGs of
    side·8 px); latent numbers in ``skip`` are missing (a skipped input leaves a gap). Labels are
    ``labels[k]`` for sample k (default k % 3), written as given (even out of range)."""
    rng = np.random.default_rng(0)
    lat, img = root / "vae-sd", root / "images"
    entries, img_entries = [], []
    for k in range(n):
        label = int(labels[k]) if labels is not None else k % 3
        px = rng.integers(0, 256, (side * 8, side * 8, 3), dtype=np.uint8)
        name = f"{k // 1000:05d}/img{k:08d}.png"
        if images:
            (img / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(px).save(img / name)
            img_entries.append([name, label])
        if k in skip:
            continue
        (lat / latent_name(k)).parent.mkdir(parents=True, exist_ok=True)
        moments = np.concatenate([rng.normal(size=(4, side, side)), np.full((4, side, side), 0.1)])
        np.save(lat / latent_name(k), moments.astype(np.float32))
        entries.append([latent_name(k), label])
    (lat / "dataset.json").write_text(json.dumps({"labels": entries}))
    if images:
        (img / "dataset.json").write_text(json.dumps({"labels": img_entries}))


def packed_data(root, n: int = 8, num_classes: int = 3, side: int = 4, shard_rows: int = 5) -> str:
    """A packed folder of ``n`` random mean‖std samples (8, side, side), labels k % num_classes,
    written through the library's own writer; returns its path."""
    root = str(root)
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    shape = (8, side, side)
    shards = []
    for k, start in enumerate(range(0, n, shard_rows)):
        writer = ShardWriter(os.path.join(root, shard_name(k)), shape)
        writer.append(rng.normal(size=(min(shard_rows, n - start), *shape)).astype(np.float32))
        shards.append((shard_name(k), writer.close()))
    labels = np.arange(n, dtype=np.int64) % num_classes
    write_packed_header(root, shards, labels, np.arange(n), moments_info(shape, num_classes), shape)
    return root
