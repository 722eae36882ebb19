"""The one dataset interface that training, sampling and evaluation see.

Every dataset yields ``(x, y)``: ``x`` a float32 tensor and ``y`` an int class label, and
carries a :class:`DataInfo` describing what ``x`` is:

- ``kind == "moments"``: ``x`` is a VAE posterior ``mean‖std`` of shape (2C, H, W); each training
  step draws ``z = (mean + std·ε) · scale + bias`` (see :func:`draw_latents`).
- ``kind == "pixels"``: ``x`` already is the model input, (C, H, W) in [-1, 1] (the bundled
  digits); :func:`draw_latents` returns it unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

SD_VAE_SCALE = 0.18215  # Stable Diffusion VAE latent scale used by the release (bias 0).


@dataclass(frozen=True)
class DataInfo:
    """What a dataset's samples are; stored inside packed data and in every run config."""

    kind: str  # "moments" or "pixels"
    channels: int  # model input channels (C; a moments sample holds 2C)
    size: int  # spatial size of the model input (latent H == W)
    num_classes: int
    latent_scale: float = SD_VAE_SCALE
    latent_bias: float = 0.0
    resolution: int | None = None  # image resolution in pixels (None for pixel-space data)

    def to_dict(self) -> dict:
        return asdict(self)


def draw_latents(
    x: torch.Tensor, info: DataInfo, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Turn a batch of dataset samples into model inputs.

    moments (N, 2C, H, W) → z = (mean + std·ε)·scale + bias, (N, C, H, W); pixels pass through.
    """
    if info.kind == "pixels":
        return x
    mean, std = x.float().chunk(2, dim=1)
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * eps) * info.latent_scale + info.latent_bias


def decode_scale(z: torch.Tensor, info: DataInfo) -> torch.Tensor:
    """Undo the latent scale/bias (what goes into the VAE decoder)."""
    return (z - info.latent_bias) / info.latent_scale
