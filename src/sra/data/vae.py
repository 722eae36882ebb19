"""The Stable Diffusion VAE (diffusers ``AutoencoderKL``): loading, and pixels → posterior moments.

diffusers is imported lazily (it is slow to import and only preprocessing/decoding need it).
"""

from __future__ import annotations

import os

import torch

from sra.errors import SraError, check_choice, first_line

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"  # encoder weights equal sd-vae-ft-mse's
VAE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_vae(name_or_path: str, device: torch.device | str = "cpu", dtype: str = "float32"):
    """An ``AutoencoderKL`` in eval mode without gradients, from a hub id or a local folder.

    A local folder may be the VAE itself (``config.json`` + weights) or a full Stable Diffusion
    pipeline folder with a ``vae/`` subfolder.
    """
    check_choice("VAE dtype", dtype, VAE_DTYPES)
    from diffusers import AutoencoderKL

    kwargs = {}
    if os.path.isdir(name_or_path) and not os.path.isfile(os.path.join(name_or_path, "config.json")):
        if os.path.isfile(os.path.join(name_or_path, "vae", "config.json")):
            kwargs["subfolder"] = "vae"
        else:
            raise SraError(f"VAE folder {name_or_path} has no config.json (nor vae/config.json)")
    try:
        vae = AutoencoderKL.from_pretrained(name_or_path, torch_dtype=VAE_DTYPES[dtype], **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise SraError(
            f"cannot load VAE {name_or_path!r} ({first_line(exc)}); pass a local folder saved with "
            "AutoencoderKL.save_pretrained, or a hub id reachable from this machine"
        ) from None
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode_moments(vae, pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (N, 3, H, W) → float32 posterior mean‖std (N, 2C, H/8, W/8).

    Pixels are mapped to [-1, 1] (x/127.5 − 1) as the release does before the VAE.
    """
    param = next(vae.parameters())
    x = pixels.to(param.device, non_blocking=True).float() / 127.5 - 1.0
    dist = vae.encode(x.to(param.dtype)).latent_dist
    return torch.cat([dist.mean, dist.std], dim=1).float()


def tiny_vae_config(latent_channels: int = 4) -> dict:
    """Config of a tiny ``AutoencoderKL`` with the SD geometry (÷8 latents), for tests/benchmarks."""
    return dict(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
        latent_channels=latent_channels, sample_size=32,
    )


def save_tiny_vae(path: str, seed: int = 0) -> str:
    """Build a randomly initialised tiny ``AutoencoderKL`` and ``save_pretrained`` it to ``path``."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the global RNG
        torch.manual_seed(seed)
        vae = AutoencoderKL(**tiny_vae_config())
    vae.save_pretrained(path)
    return path
