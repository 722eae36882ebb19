"""Latents paired with the raw image each was encoded from (REPA's encoder sees the clean image).

Items are ``(x, image, y)``: the latent sample as usual, the image as uint8 (3, H, W) at the
data's resolution, and the label. Where the images are, first match wins:

1. ``--image-dir`` (``DataConfig.image_dir``) when given;
2. ``images/`` or ``images.zip`` in the data folder or beside the latents (REPA's layout keeps
   ``images/`` beside ``vae-sd/``);
3. the image source recorded in an ``sra preprocess encode`` output's ``encode.json``.

Numbering: latent file number k is the k-th image of the sorted image listing — how ``sra
preprocess encode`` numbers what it encodes (a skipped input leaves a gap in the latents, never a
shift); for the release's gapless numbering it is the image of the same number. With an encode's
``flip``, latent N + k is image k mirrored. An image of another size than the data's resolution
(an encode with ``--crop`` read a raw tree) gets the same ADM center crop the encode applied.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from sra.data.crop import adm_center_crop, to_rgb
from sra.data.encode_config import RUN_FILE
from sra.data.formats import IMAGES_DIR
from sra.data.sources import ImageSource, open_image_source
from sra.errors import SraError


def _encode_record(roots: list[str]) -> dict:
    """The ``encode.json`` of the first root that has a readable one, else {}."""
    for root in roots:
        path = os.path.join(root, RUN_FILE)
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(record, dict):
            return record
    return {}


def find_images(spec: str, latent_root: str, image_dir: str | None = None) -> tuple[str, dict]:
    """(path of the image folder/ZIP, the encode record found or {}) for the latents at
    ``latent_root`` opened as ``spec``; one clear line naming what is missing otherwise."""
    roots = list(dict.fromkeys(os.path.abspath(p) for p in (spec, os.path.dirname(
        os.path.abspath(latent_root))) if os.path.isdir(p)))
    record = _encode_record(roots)
    if image_dir is not None:
        if not os.path.exists(image_dir):
            raise SraError(f"--image-dir {image_dir} does not exist (expected the raw images of "
                           f"{spec}: NNNNN/imgNNNNNNNN.png + dataset.json, a folder or ZIP)")
        return image_dir, record
    tried = []
    for root in roots:
        for name in (IMAGES_DIR, IMAGES_DIR + ".zip"):
            path = os.path.join(root, name)
            tried.append(path)
            if os.path.exists(path):
                return path, record
    source = record.get("source")
    if isinstance(source, str):
        tried.append(f"{source} (from {RUN_FILE})")
        if os.path.exists(source):
            return source, record
    raise SraError(
        f"{spec} has latents but not their raw images, which the encoder alignment "
        f"(--align-target encoder) needs: looked for {', '.join(tried)}; put the images made by "
        f"`sra preprocess images` there or pass --image-dir"
    )


class LatentsWithImages(Dataset):
    """A latent dataset whose items also carry their clean image: ``(x, image uint8, y)``."""

    def __init__(self, latents: Dataset, numbers: np.ndarray, images: ImageSource, flip: bool,
                 resolution: int, where: str):
        self.latents, self.images, self.resolution = latents, images, resolution
        self.info = latents.info  # type: ignore[attr-defined]
        self.numbers = np.asarray(numbers, dtype=np.int64)
        n = len(images)
        limit = 2 * n if flip else n
        if len(self.numbers) and int(self.numbers.max()) >= limit:
            bad = int(self.numbers.max())
            raise SraError(
                f"{where}: latent number {bad} has no image: {images.path} holds {n} images"
                + (f" (with flips: numbers up to {limit - 1})" if flip else "")
                + "; the images must be the ones the latents were encoded from")
        self.flip = flip
        if len(self.numbers):
            self.image(0)  # read one now: a wrong folder fails at start-up, not in a worker

    def __len__(self) -> int:
        return len(self.numbers)

    @property
    def labels(self):
        """The latents' labels (checked when they opened)."""
        return self.latents.labels  # type: ignore[attr-defined]

    @property
    def labels_file(self) -> str:
        return self.latents.labels_file  # type: ignore[attr-defined]

    def sample_name(self, i: int) -> str:
        """Where latent ``i`` lives."""
        return self.latents.sample_name(i)  # type: ignore[attr-defined]

    def image(self, i: int) -> torch.Tensor:
        """The clean image of sample ``i``, uint8 (3, res, res)."""
        k = int(self.numbers[i])
        mirrored = k >= len(self.images)
        k = k - len(self.images) if mirrored else k
        try:
            image = to_rgb(self.images.read(k))
        except Exception as exc:  # a corrupt image names itself
            raise SraError(f"cannot read image {self.images.path}/{self.images.names[k]} "
                           f"({type(exc).__name__}: {exc})") from None
        res = self.resolution
        arr = np.array(image) if image.size == (res, res) else adm_center_crop(image, res)
        if mirrored:
            arr = arr[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)  # (3, H, W)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        x, y = self.latents[i]
        return x, self.image(int(i)), y

    def __getitems__(self, indices) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        getitems = getattr(self.latents, "__getitems__", None)
        pairs = getitems(indices) if getitems else [self.latents[i] for i in indices]
        return [(x, self.image(int(i)), y) for i, (x, y) in zip(indices, pairs)]


def with_images(latents: Dataset, spec: str, image_dir: str | None = None) -> LatentsWithImages:
    """Pair a release or packed latent dataset with its raw images (see the module docstring)."""
    from sra.data.packed import PackedLatentDataset

    if isinstance(latents, PackedLatentDataset):
        root, numbers = latents.path, latents.index
        flip = bool(latents.header.get("flip"))
    else:
        root, numbers = latents.path, latents.file_numbers()  # type: ignore[attr-defined]
        flip = False
    path, record = find_images(spec, root, image_dir)
    flip = flip or bool(record.get("flip"))
    resolution = latents.info.resolution  # type: ignore[attr-defined]
    return LatentsWithImages(latents, numbers, open_image_source(path), flip, resolution, spec)
