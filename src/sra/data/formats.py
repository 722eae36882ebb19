"""Names and geometry of the on-disk data layouts, shared by their readers and writers.

Three layouts (the first two are the edm2/release ones):

- images:  ``NNNNN/imgNNNNNNNN.png`` + ``dataset.json`` (written by ``sra preprocess images``);
- release latents (``vae-sd/``): ``NNNNN/img-mean-std-NNNNNNNN.npy`` + ``dataset.json``;
- packed latents (``packed/``): ``sra-packed.json`` header, ``labels.npy``, ``index.npy`` and
  ``shard-NNNNN.npy`` files (see :mod:`sra.data.packed`).

A leaf of :mod:`sra.data`: it imports nothing but :mod:`sra.data.base`, so every reader and
writer can use it without importing another.
"""

from __future__ import annotations

import os

from sra.data.base import SD_VAE_SCALE, DataInfo

VAE_DOWNSAMPLE = 8  # SD-VAE latent = image / 8: resolutions must be multiples of it
LABELS_FILE = "dataset.json"  # labels of an images or release folder/ZIP

IMAGES_DIR = "images"  # the raw images' folder (or ZIP stem) beside ``vae-sd/`` (REPA's layout)
RELEASE_DIR = "vae-sd"  # the release latents' folder (or ZIP stem) inside a data folder
PACKED_DIR = "packed"  # the packed latents' folder inside an ``encode`` output folder

DEFAULT_SHARD_SIZE = 20000  # rows per packed shard file / encode work shard (~650 MB at 256px)
PACKED_HEADER = "sra-packed.json"
PACKED_FORMAT = "sra-packed"
PACKED_VERSION = 1
LABELS_NAME = "labels.npy"
INDEX_NAME = "index.npy"


def image_name(index: int) -> str:
    """Release/edm2 name of image ``index``: ``NNNNN/imgNNNNNNNN.png`` (NNNNN = index // 1000)."""
    return f"{index // 1000:05d}/img{index:08d}.png"


def latent_name(index: int) -> str:
    """Release name of latent file ``index``: ``NNNNN/img-mean-std-NNNNNNNN.npy``."""
    return f"{index // 1000:05d}/img-mean-std-{index:08d}.npy"


def shard_name(k: int) -> str:
    """File name of packed shard ``k``."""
    return f"shard-{k:05d}.npy"


def is_packed(path: str) -> bool:
    """Whether ``path`` is a finished packed folder (its header is written last)."""
    return os.path.isfile(os.path.join(path, PACKED_HEADER))


def moments_info(sample_shape: tuple[int, ...], num_classes: int,
                 latent_scale: float | None = None) -> DataInfo:
    """DataInfo of VAE moments of shape (2C, h, w) (resolution = 8·h)."""
    c2, h, w = sample_shape
    return DataInfo(
        kind="moments", channels=c2 // 2, size=h, num_classes=int(num_classes),
        latent_scale=SD_VAE_SCALE if latent_scale is None else float(latent_scale),
        latent_bias=0.0, resolution=h * VAE_DOWNSAMPLE,
    )
