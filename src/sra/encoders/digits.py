"""The digits positive control: a pretrained digit classifier's 4×4 conv map as encoder tokens.

It is NOT the network that scores samples (:mod:`sra.eval.digits`, seed 0, width 16): a separate
classifier (seed 1, width 24) trained by the same code on first use and cached under its own file
name in ``$SRA_CACHE_DIR``. Its ``convs`` map (N, 48, 4, 4) before the classifier's Linear gives
16 tokens of width 48, one per patch of the digits preset's 4×4 token grid.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from sra.data.digits import DIGITS_SIZE
from sra.encoders.base import Encoder, resize_images, to_channels
from sra.eval.digits import DigitsClassifierConfig, cache_dir, load_digits_classifier

# Another seed AND width than the scoring classifier: the alignment target must not be the judge.
DIGITS_ENCODER_CONFIG = DigitsClassifierConfig(width=24, seed=1)
DIGITS_ENCODER_FILE = "digits_encoder_w24_seed1_v1.safetensors"
DIGITS_ENCODER_WIDTH = 2 * DIGITS_ENCODER_CONFIG.width  # channels of the second conv stage


def digits_encoder_path() -> Path:
    """Where the encoder's classifier is cached: ``cache_dir() / DIGITS_ENCODER_FILE``."""
    return cache_dir() / DIGITS_ENCODER_FILE


class DigitsConvEncoder(Encoder):
    """A digit classifier's conv stages, (N, 1, 16, 16) in [-1, 1] → tokens (N, 16, 2·width)."""

    def __init__(self, convs: nn.Module, name: str = "digits-classifier",
                 resolution: int = DIGITS_SIZE):
        super().__init__()
        self.convs = convs
        self.name = name
        self.input_resolution = resolution
        with torch.no_grad():  # one dummy pass: width and grid whatever the classifier's layout
            probe = convs(torch.zeros(1, 1, resolution, resolution))  # (1, E, g, g)
        self.width, self._grid = int(probe.shape[1]), int(probe.shape[-1])
        self.freeze()

    @property
    def grid(self) -> int:
        return self._grid

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        x = resize_images(to_channels(images.float(), 1), self.input_resolution, "bilinear")
        return self.convs(x).flatten(2).transpose(1, 2)  # (N, E, g, g) → (N, g², E)


def build_digits_encoder(name: str, resolution: int, weights: str | None = None) -> DigitsConvEncoder:
    """The cached encoder classifier (trained on first use), or one read from ``weights``."""
    if weights is not None:
        classifier = load_digits_classifier(weights, train_if_missing=False)
    else:
        classifier = load_digits_classifier(digits_encoder_path(), config=DIGITS_ENCODER_CONFIG)
    return DigitsConvEncoder(classifier.convs, name, resolution)
