"""The feature-PCA figure's clean model input: an image (or a bundled digit) → the (1, C, H, W)
tensor a model takes, through the SD-VAE for latent models or cropped pixels for pixel models."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from sra.data.base import SD_VAE_SCALE
from sra.errors import SraError

VAE_FACTOR_FALLBACK = 8  # SD-VAE downsampling, used when no VAE is needed to know it


def input_kind(model_config, data_info: dict | None) -> str:
    """"latents" (SD-VAE) or "pixels": from the data info, else 4 input channels → latents."""
    if data_info:
        return "latents" if data_info.get("kind") == "moments" else "pixels"
    return "latents" if model_config.in_channels == 4 else "pixels"


def _vae_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _pixel_input(cfg, image: str | None, label: int,
                 resolution: int | None) -> tuple[torch.Tensor, dict]:
    """A pixel model's input: ``image`` cropped to the input size, or for one-channel models
    without ``image`` the first bundled digit of ``label``."""
    if resolution is not None and resolution != cfg.input_size:
        raise SraError(
            f"this pixel-space model takes {cfg.input_size}x{cfg.input_size} inputs; "
            f"--resolution {resolution} does not fit (omit it or pass {cfg.input_size})"
        )
    if image is None and cfg.in_channels == 1:
        from sra.data.digits import load_digits_arrays

        images, labels = load_digits_arrays(cfg.input_size)
        hits = np.flatnonzero(labels == label)
        if hits.size == 0:
            raise SraError(f"the bundled digits have no class {label} (0..9); pass --image")
        x0 = torch.from_numpy(images[hits[0]])[None]  # (1, 1, s, s) in [-1, 1]
        return x0, {"input": "pixels", "image": f"digits:{int(hits[0])} (first of class {label})",
                    "resolution": cfg.input_size, "vae": None}
    from sra.viz.images import load_image_tensor

    x0, source = load_image_tensor(image, cfg.input_size, cfg.in_channels)
    return x0, {"input": "pixels", "image": source, "resolution": cfg.input_size, "vae": None}


def _latent_input(cfg, info: dict, image: str | None, resolution: int | None,
                  get_vae: Callable[[], object]) -> tuple[torch.Tensor, dict]:
    """A latent model's input: ADM crop → VAE posterior MEAN → × latent scale + bias."""
    scale = float(info.get("latent_scale", SD_VAE_SCALE))
    bias = float(info.get("latent_bias", 0.0))
    res = resolution or info.get("resolution") or cfg.input_size * VAE_FACTOR_FALLBACK
    vae = get_vae()
    factor = _vae_factor(vae)
    if res % factor or res // factor != cfg.input_size:
        raise SraError(
            f"--resolution {res} does not fit the model: its {cfg.input_size}x{cfg.input_size} "
            f"latents need {cfg.input_size * factor}px images (VAE downsamples by {factor})"
        )
    if vae.config.latent_channels != cfg.in_channels:
        raise SraError(
            f"the VAE makes {vae.config.latent_channels}-channel latents but the model takes "
            f"{cfg.in_channels} channels"
        )
    from sra.viz.images import load_image_tensor

    pixels, source = load_image_tensor(image, res, 3)  # (1, 3, res, res) in [-1, 1]
    param = next(vae.parameters())
    with torch.no_grad():
        mean = vae.encode(pixels.to(param.device, param.dtype)).latent_dist.mean
    x0 = mean.float() * scale + bias  # (1, C, res/f, res/f)
    return x0, {"input": "latents", "image": source, "resolution": res,
                "latent_scale": scale, "latent_bias": bias}


def prepare_input(
    model_config,
    data_info: dict | None,
    image: str | None,
    label: int,
    resolution: int | None,
    get_vae: Callable[[], object],
) -> tuple[torch.Tensor, dict]:
    """The clean model input x0 (1, C, H, W) for one model and a description of how it was made.

    Latent models: ADM crop at ``resolution`` → VAE posterior MEAN (no sampling noise in the
    figure) → × latent scale + bias. Pixel models: the image cropped to the input size, or, for
    one-channel models without ``image``, the first bundled digit of ``label``. ``get_vae`` is
    called only for latent models.
    """
    if input_kind(model_config, data_info) == "pixels":
        return _pixel_input(model_config, image, label, resolution)
    return _latent_input(model_config, data_info or {}, image, resolution, get_vae)
