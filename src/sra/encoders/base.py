"""The one interface every image encoder offers the trainer: clean images → patch tokens."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sra.errors import SraError


class Encoder(nn.Module):
    """A frozen image encoder (always in eval mode, no gradients).

    ``tokens(images)`` takes images in [-1, 1], (N, C, H, W) at any size, does the encoder's own
    resizing and normalisation, and returns its patch tokens (N, T_enc, E) with class/register
    tokens dropped. ``width`` is E; ``input_resolution`` the side the images are resized to.
    """

    name: str = "encoder"
    width: int
    input_resolution: int

    def freeze(self) -> "Encoder":
        """Eval mode, no gradients: an alignment target is never trained."""
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> "Encoder":
        # Dropout/batch-norm behaviour must not depend on the trainer's mode switches.
        return super().train(False)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def grid(self) -> int:
        """Side of the encoder's token grid at ``input_resolution``."""
        raise NotImplementedError


def resize_images(images: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """(N, C, H, W) → (N, C, size, size) (unchanged when already that size)."""
    if images.shape[-2:] == (size, size):
        return images
    align = None if mode == "nearest" else False
    return F.interpolate(images, size=(size, size), mode=mode, align_corners=align)


def to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey ↔ RGB: repeat one channel to three, or average three into one."""
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1:
        return images.expand(-1, channels, -1, -1)
    if channels == 1:
        return images.mean(dim=1, keepdim=True)
    raise SraError(f"cannot turn {c}-channel images into {channels} channels")
