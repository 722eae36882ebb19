"""Model outputs → uint8 images (N, H, W, 3), the format of PNGs and of the ADM ``.npz``.

- data kind ``"pixels"``: the model output already is the image in [-1, 1];
- data kind ``"moments"``: the output is a scaled VAE latent; it is unscaled with
  :func:`sra.data.base.decode_scale` and decoded by a diffusers ``AutoencoderKL``.

Rounding to uint8 (``rounding``): the images are mapped with 255·(x + 1)/2 and clamped to
[0, 255], then

- ``"round"`` (our default): rounded to the nearest integer;
- ``"truncate"``: cut toward zero by the uint8 cast — what the REPA/SRA release's
  ``generate.py`` does (``clamp(255·(x+1)/2, 0, 255).to(uint8)``). It lowers every pixel by
  0.5 on average; use it to reproduce the release's numbers exactly. (DiT's ``sample_ddp.py``
  computes ``127.5·x + 128`` before its cast, which amounts to rounding.)
"""

from __future__ import annotations

import numpy as np
import torch

from sra.data.base import DataInfo, decode_scale
from sra.errors import SraError, check_choice

ROUNDINGS = ("round", "truncate")
DATA_KINDS = ("pixels", "moments")


def to_uint8(x: torch.Tensor, rounding: str = "round") -> np.ndarray:
    """Images (N, C, H, W) in [-1, 1] → uint8 (N, H, W, 3); one channel is repeated to three."""
    check_choice("rounding", rounding, ROUNDINGS)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise SraError(
            f"images to convert must be (N, 1|3, H, W), got shape {tuple(x.shape)}; a model whose "
            "output is not an image needs data kind 'moments' and a VAE"
        )
    # Same arithmetic as the release (255·(x+1)/2), so "truncate" reproduces it bit for bit.
    y = torch.clamp(255.0 * ((x.detach().float() + 1.0) / 2.0), 0, 255)
    if rounding == "round":
        y = torch.round(y)
    out = y.to(torch.uint8)  # the cast truncates the (non-negative) values
    if out.shape[1] == 1:
        out = out.expand(-1, 3, -1, -1)
    return out.permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, 3); sync point: once per batch


class ImageDecoder:
    """Turns sampler outputs into uint8 images per ``info`` (loading the VAE once, lazily)."""

    def __init__(self, info: DataInfo, vae: str | None = None, device: str | torch.device = "cpu",
                 rounding: str = "round", vae_batch_size: int | None = None) -> None:
        from sra.data.vae import DEFAULT_VAE

        check_choice("data kind", info.kind, DATA_KINDS)
        check_choice("rounding", rounding, ROUNDINGS)
        if vae_batch_size is not None and vae_batch_size < 1:
            raise SraError(f"VAE batch size must be ≥ 1, got {vae_batch_size}")
        self.info = info
        self.vae_name = vae or DEFAULT_VAE
        self.device = torch.device(device)
        self.rounding = rounding
        self.vae_batch_size = vae_batch_size
        self._vae = None

    @property
    def vae(self):
        """The ``AutoencoderKL`` (float32, eval), loaded at first use."""
        if self._vae is None:
            from sra.data.vae import load_vae

            self._vae = load_vae(self.vae_name, device=self.device)
        return self._vae

    def load(self) -> "ImageDecoder":
        """Load what decoding needs now (so a bad VAE path fails before any sampling)."""
        if self.info.kind == "moments":
            vae = self.vae
            want = vae.config.latent_channels
            if want != self.info.channels:
                raise SraError(
                    f"VAE {self.vae_name!r} has {want} latent channels but the model makes "
                    f"{self.info.channels}"
                )
        return self

    @torch.no_grad()
    def decode_float(self, z: torch.Tensor) -> torch.Tensor:
        """Sampler output (N, C, h, w) → images (N, 3|1, H, W) in about [-1, 1] (float32)."""
        if self.info.kind == "pixels":
            return z.float()
        vae = self.vae
        z = decode_scale(z.float(), self.info).to(self.device)
        step = self.vae_batch_size or z.shape[0]
        parts = [vae.decode(z[i:i + step]).sample.float() for i in range(0, z.shape[0], step)]
        return torch.cat(parts)

    def __call__(self, z: torch.Tensor) -> np.ndarray:
        """Sampler output (N, C, h, w) → uint8 (N, H, W, 3)."""
        return to_uint8(self.decode_float(z), self.rounding)
