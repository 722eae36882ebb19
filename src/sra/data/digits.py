"""The bundled default dataset: scikit-learn's handwritten digits (1797 images, 10 classes).

The 8×8 images (values 0..16) are upsampled bilinearly to 16×16, one channel, pixel space in
[-1, 1]: small enough that a tiny SiT trains on a laptop CPU in minutes. No download: the data
ships inside scikit-learn.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from sra.data.base import DataInfo
from sra.data.checks import check_labels

DIGITS_SIZE = 16
DIGITS_CLASSES = 10


def load_digits_arrays(size: int = DIGITS_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """All digits as float32 (N, 1, size, size) in [-1, 1] and int64 labels (N,)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8)
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 2 - 1).numpy()
    return images, bunch.target.astype(np.int64)


class DigitsDataset(Dataset):
    """scikit-learn digits as a pixel-space dataset of (1, 16, 16) images in [-1, 1]."""

    def __init__(self, size: int = DIGITS_SIZE):
        images, labels = load_digits_arrays(size)
        self.images = torch.from_numpy(images)
        self.labels = torch.from_numpy(labels)
        self.labels_file = "scikit-learn's digits (sklearn.datasets.load_digits)"
        check_labels(labels, DIGITS_CLASSES, self.labels_file, "the digits 0..9")
        self.info = DataInfo(
            kind="pixels", channels=1, size=size, num_classes=DIGITS_CLASSES,
            latent_scale=1.0, latent_bias=0.0, resolution=None,
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])
