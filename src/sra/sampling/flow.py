"""SiT solvers: Euler / Heun ODE and Euler–Maruyama SDE, all with one signature::

    solve(model_fn, noise, y, cfg, *, generator=None, progress=False) -> x0

``model_fn(x, t, y)`` returns the velocity; t is a (N,) tensor. Integration runs from t = 1
(noise) to t = 0 (data). The state is kept in ``cfg.state_dtype``; the network sees the
``noise`` dtype.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from sra.diffusion.paths import get_path
from sra.sampling.config import SamplerConfig
from sra.sampling.guidance import ModelFn


def _dtype(cfg: SamplerConfig) -> torch.dtype:
    return torch.float64 if cfg.state_dtype == "float64" else torch.float32


def _velocity(model_fn: ModelFn, x: torch.Tensor, t: float, y: torch.Tensor, net_dtype) -> torch.Tensor:
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=net_dtype)
    return model_fn(x.to(net_dtype), tt, y).to(x.dtype)


def ode_sample(
    model_fn: ModelFn, noise: torch.Tensor, y: torch.Tensor, cfg: SamplerConfig, *,
    generator: torch.Generator | None = None, progress: bool = False,
) -> torch.Tensor:
    """Euler (``mode="euler"``) or Heun (``"heun"``: second-order on every step but the last)
    on the uniform grid t = 1 → 0 with ``cfg.steps`` steps."""
    grid = torch.linspace(1.0, 0.0, cfg.steps + 1, dtype=torch.float64).tolist()
    x = noise.to(_dtype(cfg))
    heun = cfg.mode == "heun"
    for i in tqdm(range(cfg.steps), disable=not progress, desc="ode", leave=False):
        t_cur, t_next = grid[i], grid[i + 1]
        d_cur = _velocity(model_fn, x, t_cur, y, noise.dtype)
        x_next = x + (t_next - t_cur) * d_cur
        if heun and i < cfg.steps - 1:
            d_next = _velocity(model_fn, x_next, t_next, y, noise.dtype)
            x_next = x + (t_next - t_cur) * 0.5 * (d_cur + d_next)
        x = x_next
    return x.to(noise.dtype)


def sde_sample(
    model_fn: ModelFn, noise: torch.Tensor, y: torch.Tensor, cfg: SamplerConfig, *,
    generator: torch.Generator | None = None, progress: bool = False,
) -> torch.Tensor:
    """Euler–Maruyama on linspace(1, sde_last_t, steps), then one deterministic mean step to 0.

    The reverse SDE uses diffusion w(t) = 2t and drift v − ½·w·score(v); ``cfg.steps`` network
    evaluations in all (steps − 1 stochastic steps and the final mean step).
    """
    path = get_path(cfg.path_type)
    grid = torch.linspace(1.0, cfg.sde_last_t, cfg.steps, dtype=torch.float64).tolist() + [0.0]
    x = noise.to(_dtype(cfg))
    z_dtype = x.dtype if noise.dtype == torch.float64 else torch.float32

    def drift(x: torch.Tensor, t: float) -> tuple[torch.Tensor, float]:
        v = _velocity(model_fn, x, t, y, noise.dtype)
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
        w = 2.0 * t
        return v - 0.5 * w * path.score_from_velocity(v, x, tt), w

    for i in tqdm(range(cfg.steps - 1), disable=not progress, desc="sde", leave=False):
        t_cur, t_next = grid[i], grid[i + 1]
        dt = t_next - t_cur  # negative
        d, w = drift(x, t_cur)
        # float32 draws unless the caller's noise is float64: a seed then gives the same sample
        # with state_dtype float32 or float64 (only the precision of the state differs).
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=z_dtype).to(x.dtype)
        x = x + d * dt + (w * abs(dt)) ** 0.5 * z
    t_cur = grid[-2]
    d, _ = drift(x, t_cur)
    x = x + d * (0.0 - t_cur)  # last step returns the mean: no noise
    return x.to(noise.dtype)
