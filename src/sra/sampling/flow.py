"""SiT solvers on a given time grid: Euler / Heun ODE and Euler–Maruyama SDE, one signature::

    solve(model_fn, noise, y, times, *, generator=None, callback=None, **options) -> x0

``model_fn(x, t, y, t_host)`` returns the velocity; t is a (N,) tensor and ``t_host`` the same
time as a Python float (see :data:`sra.sampling.guidance.ModelFn`; no step reads a tensor on the
host). ``times`` runs from t = 1 (noise) toward t = 0 (data); :mod:`sra.sampling.schedules`
builds the grids. The state is kept in ``state_dtype``; the network sees the ``noise`` dtype.
``callback(info)`` is called after every step (see :mod:`sra.sampling.callbacks`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from sra.diffusion.paths import get_path
from sra.errors import SraError
from sra.sampling.callbacks import StepCallback
from sra.sampling.guidance import ModelFn

Times = Sequence[float] | torch.Tensor


def _as_times(times: Times) -> list[float]:
    """Python floats (the step arithmetic uses them as scalars); at least one step. Grids are host
    data (:mod:`sra.sampling.schedules`); a tensor grid is read once here, before any step."""
    out = times.tolist() if isinstance(times, torch.Tensor) else [float(t) for t in times]
    if len(out) < 2:
        raise SraError(f"a time grid needs at least 2 times (1 step), got {len(out)}")
    return out


def _velocity(model_fn: ModelFn, x: torch.Tensor, t: float, y: torch.Tensor,
              net_dtype: torch.dtype) -> torch.Tensor:
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=net_dtype)  # (N,), filled on the device
    return model_fn(x.to(net_dtype), tt, y, t).to(x.dtype)


def ode_sample(
    model_fn: ModelFn, noise: torch.Tensor, y: torch.Tensor, times: Times, *, heun: bool = False,
    state_dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Euler, or Heun (``heun``: second-order on every step but the last), over ``times``.
    ``generator`` is unused (the ODE draws no noise); it keeps the one solver signature."""
    grid = _as_times(times)
    steps = len(grid) - 1
    x = noise.to(state_dtype)
    for i in range(steps):
        t_cur, t_next = grid[i], grid[i + 1]
        d_cur = _velocity(model_fn, x, t_cur, y, noise.dtype)
        x_next = x + (t_next - t_cur) * d_cur
        if heun and i < steps - 1:
            d_next = _velocity(model_fn, x_next, t_next, y, noise.dtype)
            x_next = x + (t_next - t_cur) * 0.5 * (d_cur + d_next)
        x = x_next
        if callback is not None:
            callback({"i": i, "steps": steps, "t": t_cur, "t_next": t_next, "x": x, "velocity": d_cur})
    return x.to(noise.dtype)


def sde_sample(
    model_fn: ModelFn, noise: torch.Tensor, y: torch.Tensor, times: Times, *,
    path_type: str = "linear", state_dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None, callback: StepCallback | None = None,
) -> torch.Tensor:
    """Euler–Maruyama over ``times[:-1]``, then one deterministic mean step to ``times[-1]``.

    The reverse SDE uses diffusion w(t) = 2t and drift v − ½·w·score(v) (score from the velocity
    under the ``path_type`` interpolant); len(times) − 1 network evaluations in all.
    """
    path = get_path(path_type)
    grid = _as_times(times)
    steps = len(grid) - 1
    x = noise.to(state_dtype)
    z_dtype = x.dtype if noise.dtype == torch.float64 else torch.float32

    def drift(x: torch.Tensor, t: float) -> tuple[torch.Tensor, float, torch.Tensor]:
        v = _velocity(model_fn, x, t, y, noise.dtype)
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)  # (N,)
        w = 2.0 * t
        return v - 0.5 * w * path.score_from_velocity(v, x, tt), w, v

    for i in range(steps):
        t_cur, t_next = grid[i], grid[i + 1]
        dt = t_next - t_cur  # negative
        d, w, v = drift(x, t_cur)
        if i < steps - 1:
            # float32 draws unless the caller's noise is float64: a seed then gives the same sample
            # with state_dtype float32 or float64 (only the precision of the state differs).
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=z_dtype).to(x.dtype)
            x = x + d * dt + (w * abs(dt)) ** 0.5 * z
        else:
            x = x + d * dt  # the last step returns the mean: no noise
        if callback is not None:
            callback({"i": i, "steps": steps, "t": t_cur, "t_next": t_next, "x": x, "velocity": v})
    return x.to(noise.dtype)
