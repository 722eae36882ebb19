"""Image grids with PIL only (no matplotlib): sample sheets for training logs and ``sra sample``."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sra.atomic import atomic_path
from sra.errors import SraError

GRID_PADDING = 2  # pixels between tiles
GRID_BACKGROUND = 255  # white gutters


def images_to_uint8(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 (N, H, W, 3|1) or float (N, C, H, W) in [-1, 1] → uint8 (N, H, W, 3)."""
    if isinstance(images, torch.Tensor):
        if images.dtype == torch.uint8:
            images = images.cpu().numpy()
        else:
            if images.ndim != 4:
                raise SraError(f"float images must be (N, C, H, W), got shape {tuple(images.shape)}")
            x = ((images.detach().float().cpu() + 1.0) * 127.5).clamp(0, 255).round()
            images = x.to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise SraError(
            f"images must be uint8 (N, H, W, C) or a float tensor (N, C, H, W); got {arr.dtype} "
            f"of shape {arr.shape}"
        )
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.shape[-1] != 3:
        raise SraError(f"images need 1 or 3 channels, got {arr.shape[-1]} (shape {arr.shape})")
    return arr


def make_grid(images: np.ndarray | torch.Tensor, nrow: int | None = None,
              padding: int = GRID_PADDING) -> np.ndarray:
    """Tile images into one uint8 (H', W', 3) array; ``nrow`` images per row (default ⌈√N⌉)."""
    arr = images_to_uint8(images)
    n, h, w, _ = arr.shape
    if n == 0:
        raise SraError("cannot make a grid of zero images")
    ncol = nrow if nrow is not None else math.ceil(math.sqrt(n))
    if ncol < 1:
        raise SraError(f"nrow must be ≥ 1, got {nrow}")
    ncol = min(ncol, n)
    rows = math.ceil(n / ncol)
    grid = np.full((rows * (h + padding) + padding, ncol * (w + padding) + padding, 3),
                   GRID_BACKGROUND, dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, ncol)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[top:top + h, left:left + w] = arr[k]
    return grid


def save_grid(images: np.ndarray | torch.Tensor, path: str | os.PathLike,
              nrow: int | None = None) -> Path:
    """Save a grid PNG of uint8 (N, H, W, 3) images or a float (N, C, H, W) tensor in [-1, 1]."""
    path = Path(path)
    image = Image.fromarray(make_grid(images, nrow))
    with atomic_path(path) as tmp:  # never a torn PNG, also on a full disk
        image.save(tmp, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"))
    return path
