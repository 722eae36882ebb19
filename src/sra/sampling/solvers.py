"""The solver table: every entry has the signature
``solve(model_fn, noise, y, cfg, *, generator=None, progress=False) -> x0``."""

from __future__ import annotations

import torch
import torch.nn as nn

from sra.errors import SraError
from sra.sampling.config import DDPM_MODES, FLOW_MODES, SamplerConfig
from sra.sampling.flow import ode_sample, sde_sample
from sra.sampling.guidance import ModelFn, guided


def _ddpm_solver(ancestral: bool):
    def solve(model_fn: ModelFn, noise, y, cfg: SamplerConfig, *, generator=None, progress=False):
        from sra.diffusion.ddpm import DDPMConfig, GaussianDiffusion
        from sra.sampling.ddpm import ddim_sample, ddpm_sample

        diffusion = GaussianDiffusion(DDPMConfig()).respaced(cfg.steps)
        if ancestral:
            return ddpm_sample(model_fn, diffusion, noise, y, generator=generator, progress=progress)
        return ddim_sample(model_fn, diffusion, noise, y, eta=cfg.ddim_eta, generator=generator,
                           progress=progress)

    return solve


SOLVERS = {
    "euler": ode_sample,
    "heun": ode_sample,
    "sde": sde_sample,
    "ddpm": _ddpm_solver(ancestral=True),
    "ddim": _ddpm_solver(ancestral=False),
}


@torch.no_grad()
def generate(
    model: nn.Module, noise: torch.Tensor, y: torch.Tensor, cfg: SamplerConfig, *,
    generator: torch.Generator | None = None, progress: bool = False,
) -> torch.Tensor:
    """Samples (N, C, H, W) from a :class:`~sra.models.DiffusionTransformer` (or anything with
    its ``config``), guidance per ``cfg``; the solver must match the model family."""
    mcfg = model.config
    allowed = FLOW_MODES if mcfg.family == "SiT" else DDPM_MODES
    if cfg.mode not in allowed:
        raise SraError(f"sampling mode {cfg.mode!r} does not fit a {mcfg.family} model; "
                       f"allowed: {', '.join(allowed)}")
    if y.min() < 0 or y.max() > mcfg.num_classes:
        raise SraError(f"labels must be in 0..{mcfg.num_classes} ({mcfg.num_classes} = null label)")
    time_scale = 1.0 if mcfg.family == "SiT" else 1000.0
    model_fn = guided(model, cfg, null_label=mcfg.num_classes, learn_sigma=mcfg.learn_sigma,
                      time_scale=time_scale)
    out = SOLVERS[cfg.mode](model_fn, noise, y, cfg, generator=generator, progress=progress)
    return out[:, : mcfg.in_channels]
