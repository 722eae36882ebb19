"""What a run shows about itself: EMA sample grids and the loss curves (its quality numbers are
:mod:`sra.training.fid`).

Everything here runs on the main process between optimizer steps, from the EMA weights, and
never touches the training RNG stream (sampling uses its own generators).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

from sra.data.base import DataInfo
from sra.errors import SraError
from sra.models import ModelConfig
from sra.sampling import SamplerConfig, sample_fixed

log = logging.getLogger("sra.train")

GRID_MIN_CELL = 64  # pixels: grid cells are enlarged (nearest) to at least this size
GRID_SEED = 1234  # fixed noise and labels: grids of one run are comparable across steps
SAMPLE_BATCH = 256
METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class MonitorConfig:
    """How the run looks at its own EMA."""

    grid_samples: int
    grid_sampler: SamplerConfig
    vae: str  # decodes latent grids (hub id or folder)


class Monitor:
    """Sample grids, curves and the digits evaluation of one run directory."""

    def __init__(self, run_dir: Path, cfg: MonitorConfig, model_cfg: ModelConfig, info: DataInfo,
                 path_type: str, device: torch.device, autocast) -> None:
        self.run_dir, self.cfg, self.model_cfg, self.info = run_dir, cfg, model_cfg, info
        self.device, self.autocast = device, autocast
        s = cfg.grid_sampler
        if model_cfg.family == "DiT" and s.mode not in ("ddpm", "ddim"):
            s = replace(s, mode="ddpm")
        self.sampler = replace(s, path_type=path_type)
        self._decoder = None
        self._latent_preview = False  # the VAE could not be loaded: show latent channels

    # -- samples --------------------------------------------------------------------------------
    @torch.no_grad()
    def ema_samples(self, ema: nn.Module, n: int, seed: int,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        """n EMA samples decoded to images in [-1, 1], (n, C, H, W); labels cycle the classes.
        Noise and labels follow :func:`sra.sampling.sample_fixed` (the scheme of ``sra sample``)."""
        z = sample_fixed(ema, n, seed=seed, sampler=self.sampler, labels=labels, batch_size=SAMPLE_BATCH,
                         device=self.device, autocast=self.autocast)
        return self._decode(z)

    def prepare(self) -> None:
        """Load the grids' decoder now (before training: a VAE download must not happen while
        other processes wait in a collective). Latents go through the VAE when it loads; when it
        cannot be loaded (no weights offline) grids show the first 3 latent channels instead."""
        from sra.sampling.decode import ImageDecoder

        if self._decoder is None and not self._latent_preview and self.cfg.grid_samples > 0:
            decoder = ImageDecoder(self.info, vae=self.cfg.vae, device=self.device)
            try:
                self._decoder = decoder.load()
            except SraError as exc:  # load_vae reports every loading failure as one SraError
                log.warning("%s; sample grids show latent channels instead", exc)
                self._latent_preview = True

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        """Model outputs → images in [-1, 1] (see :meth:`prepare`). Only the *loading* may fall
        back: an error while decoding is a real error."""
        self.prepare()
        if self._latent_preview:
            z = z[:, :3].float()
            lo = z.amin(dim=(1, 2, 3), keepdim=True)
            hi = z.amax(dim=(1, 2, 3), keepdim=True)
            return (z - lo) / (hi - lo).clamp_min(1e-8) * 2 - 1
        return self._decoder.decode_float(z).clamp(-1, 1).cpu()

    # -- outputs --------------------------------------------------------------------------------
    def grid(self, ema: nn.Module, tag: str) -> Path | None:
        """``samples/TAG.png``: an EMA sample grid with fixed noise and labels (None if off)."""
        from sra.viz.grid import save_grid

        n = self.cfg.grid_samples
        if n < 1:
            return None
        images = self.ema_samples(ema, n, seed=GRID_SEED)
        if images.shape[-1] < GRID_MIN_CELL:  # tiny images (digits): enlarge for viewing
            factor = math.ceil(GRID_MIN_CELL / images.shape[-1])
            images = torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest")
        return save_grid(images, self.run_dir / "samples" / f"{tag}.png",
                         nrow=int(math.ceil(math.sqrt(n))))

    def curves(self, title: str) -> Path | None:
        """``curves.png`` from ``metrics.jsonl`` (None before anything was logged)."""
        from sra.viz.curves import plot_curves

        metrics = self.run_dir / METRICS_FILE
        return plot_curves(metrics, self.run_dir / "curves.png", title=title) if metrics.exists() else None

    def snapshot(self, ema: nn.Module, step: int, title: str) -> None:
        """Grid and curves at ``step``."""
        grid = self.grid(ema, f"step-{step:07d}")
        curves = self.curves(title)
        wrote = [str(p) for p in (grid, curves) if p is not None]
        if wrote:
            log.info("wrote %s", " and ".join(wrote))
