"""DDPM ancestral and DDIM samplers for DiT-style models (ε ‖ v outputs), on a given schedule.

``model_fn(x, t, y, t_host) -> (N, 2C, H, W)`` receives ORIGINAL integer steps (0..999), as the
(N,) tensor ``t`` and as the host number ``t_host``: the samplers walk every step of the (possibly
respaced) schedule ``diffusion`` — their time grid, built by
:func:`sra.sampling.schedules.ddpm_schedule` — from the last to 0 and look each index up in
``diffusion.timestep_map`` (a host array) before calling the model; no step reads the device.
``callback(info)`` is called after every step (see :mod:`sra.sampling.callbacks`). Guidance is
applied by wrapping the model into a ``model_fn`` (see ``sampling/guidance.py``, whose
:func:`cfg_combine` is the ε-only combination rule such a wrapper uses).
"""

from __future__ import annotations

from typing import Any

import torch

from sra.diffusion.ddpm import GaussianDiffusion, PMeanVar
from sra.errors import SraError
from sra.sampling.callbacks import StepCallback, chain, progress_bar
from sra.sampling.guidance import ModelFn


def _randn(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """N(0, I) like ``x``, drawn from ``generator`` (on its own device, then moved)."""
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


def _check_inputs(diffusion: GaussianDiffusion, noise: torch.Tensor, y: torch.Tensor | None) -> None:
    if noise.ndim < 2:
        raise SraError(f"noise must be batched (N, C, ...), got shape {tuple(noise.shape)}")
    if y is not None and y.shape[0] != noise.shape[0]:
        raise SraError(f"labels have batch {y.shape[0]} but noise has batch {noise.shape[0]}")
    if not isinstance(diffusion, GaussianDiffusion):
        raise SraError(f"diffusion must be a GaussianDiffusion, got {type(diffusion).__name__}")


def _model_step(model_fn: ModelFn, diffusion: GaussianDiffusion, x: torch.Tensor, i: int,
                y: torch.Tensor | None, clip_denoised: bool) -> tuple[torch.Tensor, PMeanVar]:
    """The model's reverse-step prediction at schedule index ``i``: ``(t, p_mean_variance)``."""
    step = int(diffusion.timestep_map[i])  # the original step, from the host table
    t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)  # (N,) schedule index
    t_model = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)  # (N,) original step
    out = model_fn(x, t_model, y, step)
    # check_t=False: t was built here in range, and the check would read t on the host (a sync).
    return t, diffusion.p_mean_variance(out, x, t, clip_denoised=clip_denoised, check_t=False)


def _steps(diffusion: GaussianDiffusion, progress: bool,
           callback: StepCallback | None) -> tuple[range, StepCallback | None]:
    """The schedule indices to walk (last → 0) and the callback (with a progress bar if asked)."""
    n = diffusion.num_timesteps
    return range(n - 1, -1, -1), chain(callback, progress_bar(n, "ddpm") if progress else None)


def _info(diffusion: GaussianDiffusion, i: int, x: torch.Tensor, step: PMeanVar) -> dict[str, Any]:
    n = diffusion.num_timesteps
    return {"i": n - 1 - i, "steps": n, "t": int(diffusion.timestep_map[i]),
            "t_next": int(diffusion.timestep_map[i - 1]) if i > 0 else -1, "x": x,
            "denoised": step.pred_x0}


@torch.no_grad()
def ddpm_sample(
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    noise: torch.Tensor,
    y: torch.Tensor | None,
    *,
    clip_denoised: bool = False,
    progress: bool = False,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Ancestral sampling x_T = noise → x_0 over the schedule of ``diffusion``.

    Each step draws x_{t-1} ~ N(mean, exp(log_variance)) from the model's reverse step; the
    last step (t = 0) returns the mean without noise. Returns x_0 in ``noise``'s dtype.
    """
    _check_inputs(diffusion, noise, y)
    indices, callback = _steps(diffusion, progress, callback)
    x = noise
    for i in indices:
        _, step = _model_step(model_fn, diffusion, x, i, y, clip_denoised)
        if i > 0:
            x = step.mean + torch.exp(0.5 * step.log_variance) * _randn(step.mean, generator)
        else:
            x = step.mean
        x = x.to(noise.dtype)
        if callback is not None:
            callback(_info(diffusion, i, x, step))
    return x


@torch.no_grad()
def ddim_sample(
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    noise: torch.Tensor,
    y: torch.Tensor | None,
    eta: float = 0.0,
    *,
    clip_denoised: bool = False,
    progress: bool = False,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DDIM sampling (deterministic for ``eta`` = 0; ``eta`` = 1 ≈ ancestral with β̃ variance).

    The model's variance half is ignored; x_{t-1} = √ᾱ_{t-1}·x̂0 + √(1−ᾱ_{t-1}−σ²)·ε̂ + σ·z
    with σ = eta·√((1−ᾱ_{t-1})/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_{t-1}); the last step returns x̂0.
    """
    _check_inputs(diffusion, noise, y)
    if not eta >= 0.0:
        raise SraError(f"ddim eta must be >= 0, got {eta!r}")
    indices, callback = _steps(diffusion, progress, callback)
    x = noise
    for i in indices:
        t, step = _model_step(model_fn, diffusion, x, i, y, clip_denoised)
        xw = x.to(step.pred_x0.dtype)
        # ε consistent with the (possibly clipped) x0 estimate
        eps = diffusion.predict_eps_from_x0(xw, t, step.pred_x0)
        ab = diffusion.gather("alphas_cumprod", t, xw)
        ab_prev = diffusion.gather("alphas_cumprod_prev", t, xw)
        sigma = eta * torch.sqrt((1.0 - ab_prev) / (1.0 - ab)) * torch.sqrt(1.0 - ab / ab_prev)
        mean = step.pred_x0 * torch.sqrt(ab_prev) + torch.sqrt((1.0 - ab_prev - sigma**2).clamp(min=0.0)) * eps
        if i > 0 and eta > 0:
            x = mean + sigma * _randn(mean, generator)
        else:
            x = mean
        x = x.to(noise.dtype)
        if callback is not None:
            callback(_info(diffusion, i, x, step))
    return x
