"""Single images for figures: a file (or scikit-learn's bundled photo) → ADM center crop → tensor.

The crop is the one preprocessing uses (:func:`sra.data.crop.adm_center_crop`), so a figure sees
an image exactly as the model saw its training data.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from sra.data.crop import adm_center_crop, to_rgb
from sra.errors import SraError

# A real photo that ships inside scikit-learn (no download): the default figure input.
DEFAULT_PHOTO = "china.jpg"
SAMPLE_PREFIX = "sklearn:"  # how the bundled photos are named in saved settings


def open_image(path: str | None) -> tuple[Image.Image, str]:
    """A PIL image and a description of where it came from.

    ``path`` None (or ``sklearn:NAME``) opens one of scikit-learn's bundled sample photos
    (``china.jpg`` by default, or ``flower.jpg``).
    """
    if path is None or path.startswith(SAMPLE_PREFIX):
        name = DEFAULT_PHOTO if path is None else path[len(SAMPLE_PREFIX):]
        from sklearn.datasets import load_sample_image

        try:
            arr = load_sample_image(name)  # (H, W, 3) uint8
        except (AttributeError, ValueError):  # sklearn's InvalidParameterError is a ValueError
            raise SraError(
                f"unknown bundled photo {name!r}; allowed: {SAMPLE_PREFIX}china.jpg, {SAMPLE_PREFIX}flower.jpg"
            ) from None
        return Image.fromarray(arr), SAMPLE_PREFIX + name
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy(), path
    except (OSError, SyntaxError) as exc:  # PIL's errors for non-images / truncated files
        raise SraError(f"cannot read image {path}: {exc}") from None


def image_tensor(image: Image.Image, resolution: int, channels: int = 3) -> torch.Tensor:
    """ADM center crop to ``resolution``² → float32 (1, channels, res, res) in [-1, 1].

    ``channels`` 3 keeps RGB; 1 converts to grayscale (for 1-channel pixel-space models).
    """
    if channels not in (1, 3):
        raise SraError(f"images can feed 1- or 3-channel models only, got {channels} channels")
    arr = adm_center_crop(to_rgb(image), resolution)  # (res, res, 3) uint8
    if channels == 1:
        arr = np.array(Image.fromarray(arr).convert("L"))[..., None]  # (res, res, 1), writable
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float()  # (C, res, res)
    return (x / 127.5 - 1.0)[None]


def load_image_tensor(path: str | None, resolution: int, channels: int = 3) -> tuple[torch.Tensor, str]:
    """:func:`open_image` + :func:`image_tensor`: ((1, C, res, res) in [-1, 1], source)."""
    image, source = open_image(path)
    return image_tensor(image, resolution, channels), source
