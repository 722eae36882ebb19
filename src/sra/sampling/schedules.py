"""The solvers' time grids, built in one place: a new grid is a new function here, not a solver edit.

Flow grids (SiT) are lists of times from t = 1 (noise) to the end time, as Python floats taken
from a float64 ``linspace`` (the solvers do their step arithmetic with them), built on the host
once per grid and reused. The DDPM grid (DiT) is the 1000-step schedule respaced to the wanted
step count: its ``timestep_map`` holds the original steps it keeps, and the solvers walk all of
its steps from the last to 0.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Sequence

import torch

from sra.sampling.config import SamplerConfig

if TYPE_CHECKING:
    from sra.diffusion.ddpm import GaussianDiffusion
    from sra.diffusion.schedule import DDPMConfig


@functools.lru_cache(maxsize=64)
def _linspace(start: float, end: float, n: int) -> tuple[float, ...]:
    """torch's float64 linspace as host floats, computed once per (start, end, n): a job builds
    its grid once whatever its number of batches, and its steps never touch a tensor for it."""
    return tuple(torch.linspace(start, end, n, dtype=torch.float64).tolist())


def ode_times(steps: int, end: float = 0.0) -> list[float]:
    """Uniform grid 1 → ``end`` with ``steps`` steps (steps + 1 times)."""
    return list(_linspace(1.0, float(end), int(steps) + 1))


def sde_times(steps: int, last_t: float) -> list[float]:
    """linspace(1, last_t, steps) then 0: steps − 1 Euler–Maruyama steps and a final mean step to 0
    (steps + 1 times)."""
    return list(_linspace(1.0, float(last_t), int(steps))) + [0.0]


def ddpm_schedule(steps: int | str | Sequence[int], base: "DDPMConfig | None" = None) -> "GaussianDiffusion":
    """The DDPM schedule of ``base`` (default: DiT's linear 1000 steps) respaced to ``steps``
    (a count, a section spec such as "ddim25", or per-section counts)."""
    from sra.diffusion.ddpm import GaussianDiffusion
    from sra.diffusion.schedule import DDPMConfig

    return GaussianDiffusion(base or DDPMConfig()).respaced(steps)


def sampler_grid(cfg: SamplerConfig) -> "list[float] | GaussianDiffusion":
    """The grid ``cfg.mode``'s solver walks: uniform for euler/heun, :func:`sde_times` for sde,
    :func:`ddpm_schedule` for ddpm/ddim."""
    if cfg.mode in ("euler", "heun"):
        return ode_times(cfg.steps)
    if cfg.mode == "sde":
        return sde_times(cfg.steps, cfg.sde_last_t)
    return ddpm_schedule(cfg.steps)
