"""The solver table and :func:`generate`: a :class:`SamplerConfig` → its grid, its solver, guidance.

Every entry of :data:`SOLVERS` has the signature
``solve(model_fn, noise, y, grid, cfg, *, generator=None, callback=None) -> x0``: it maps the
config's options onto one solver of :mod:`sra.sampling.flow` / :mod:`sra.sampling.ddpm`, which
walks ``grid`` (from :func:`sra.sampling.schedules.sampler_grid`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from sra.diffusion.ddpm import GaussianDiffusion
from sra.errors import SraError
from sra.sampling.callbacks import StepCallback, chain, progress_bar
from sra.sampling.config import DDPM_MODES, FLOW_MODES, SamplerConfig
from sra.sampling.ddpm import ddim_sample, ddpm_sample
from sra.sampling.flow import ode_sample, sde_sample
from sra.sampling.guidance import ModelFn, guided
from sra.sampling.schedules import sampler_grid

Solver = Callable[..., torch.Tensor]
_PROGRESS_NAMES = {"euler": "ode", "heun": "ode", "sde": "sde", "ddpm": "ddpm", "ddim": "ddpm"}


def _state_dtype(cfg: SamplerConfig) -> torch.dtype:
    return torch.float64 if cfg.state_dtype == "float64" else torch.float32


def _euler(model_fn: ModelFn, noise, y, grid, cfg: SamplerConfig, **kw: Any) -> torch.Tensor:
    return ode_sample(model_fn, noise, y, grid, state_dtype=_state_dtype(cfg), **kw)


def _heun(model_fn: ModelFn, noise, y, grid, cfg: SamplerConfig, **kw: Any) -> torch.Tensor:
    return ode_sample(model_fn, noise, y, grid, heun=True, state_dtype=_state_dtype(cfg), **kw)


def _sde(model_fn: ModelFn, noise, y, grid, cfg: SamplerConfig, **kw: Any) -> torch.Tensor:
    return sde_sample(model_fn, noise, y, grid, path_type=cfg.path_type, state_dtype=_state_dtype(cfg), **kw)


def _ddpm(model_fn: ModelFn, noise, y, grid, cfg: SamplerConfig, **kw: Any) -> torch.Tensor:
    return ddpm_sample(model_fn, grid, noise, y, **kw)


def _ddim(model_fn: ModelFn, noise, y, grid, cfg: SamplerConfig, **kw: Any) -> torch.Tensor:
    return ddim_sample(model_fn, grid, noise, y, eta=cfg.ddim_eta, **kw)


SOLVERS: dict[str, Solver] = {"euler": _euler, "heun": _heun, "sde": _sde, "ddpm": _ddpm, "ddim": _ddim}


def num_steps(grid: list[float] | GaussianDiffusion) -> int:
    """How many steps a solver takes on ``grid`` (= callback calls)."""
    return grid.num_timesteps if isinstance(grid, GaussianDiffusion) else len(grid) - 1


def check_labels(y: torch.Tensor, num_classes: int) -> None:
    """One-line error unless every label is in 0..num_classes (num_classes = the null label).

    Reads the values: call it on host labels where they are made or loaded, once per job
    (:func:`sra.sampling.fixed.sample_fixed` does; :func:`sra.sampling.seeding.make_labels` makes
    them in range), never inside a sampling step.
    """
    if y.numel() and (int(y.min()) < 0 or int(y.max()) > num_classes):
        raise SraError(f"labels must be in 0..{num_classes} ({num_classes} = null label)")


@torch.no_grad()
def generate(
    model: nn.Module, noise: torch.Tensor, y: torch.Tensor, cfg: SamplerConfig, *,
    generator: torch.Generator | None = None, progress: bool = False,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Samples (N, C, H, W) from a :class:`~sra.models.DiffusionTransformer` (or anything with
    its ``config``), guidance per ``cfg``; the solver must match the model family.
    ``callback(info)`` runs after every solver step (see :mod:`sra.sampling.callbacks`).

    No value of a device tensor is read: labels ``y`` (N,) on an accelerator are not range-checked
    here (that would be a host–device sync per batch) — check them on the host with
    :func:`check_labels` where they are made; CPU labels are checked here.
    """
    mcfg = model.config
    allowed = FLOW_MODES if mcfg.family == "SiT" else DDPM_MODES
    if cfg.mode not in allowed:
        raise SraError(f"sampling mode {cfg.mode!r} does not fit a {mcfg.family} model; "
                       f"allowed: {', '.join(allowed)}")
    if y.shape != noise.shape[:1]:
        raise SraError(f"labels must have shape ({noise.shape[0]},) like the noise batch, "
                       f"got {tuple(y.shape)}")
    if y.device.type == "cpu":  # host labels are read for free; device labels are checked where made
        check_labels(y, mcfg.num_classes)
    time_scale = 1.0 if mcfg.family == "SiT" else 1000.0
    model_fn = guided(model, cfg, null_label=mcfg.num_classes, learn_sigma=mcfg.learn_sigma,
                      time_scale=time_scale)
    grid = sampler_grid(cfg)
    if progress:
        callback = chain(callback, progress_bar(num_steps(grid), _PROGRESS_NAMES[cfg.mode]))
    out = SOLVERS[cfg.mode](model_fn, noise, y, grid, cfg, generator=generator, callback=callback)
    return out[:, : mcfg.in_channels]
