"""Flow-matching interpolants x_t = α_t·x + σ_t·ε and the time samplers (SiT).

Time convention (the one used everywhere in ``sra`` for SiT): t ∈ [0, 1], **t = 0 is data and
t = 1 is pure noise**; samplers integrate from t = 1 down to t = 0. This module is the only
place where α, σ and their derivatives are written down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sra.errors import choice_error


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) → (N, 1, 1, …) to broadcast against ``like``; a time map that already has ``like``'s
    rank (e.g. (N, 1, H, W), one time per pixel for token groups) is used as it is. Keeps
    ``like``'s dtype."""
    if t.dim() == like.dim():
        return t.to(like.dtype)
    return t.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


@dataclass(frozen=True)
class Path:
    """An interpolant; subclasses define α, σ, α', σ' and the inverse of σ/α."""

    name: str = "base"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def d_alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def d_sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def t_from_ratio(self, r: torch.Tensor) -> torch.Tensor:
        """The time at which σ_t/α_t = r (used by the log-normal time sampler)."""
        raise NotImplementedError

    # -- derived quantities (no α/σ formulas below: only the four functions above) ------------
    def interpolate(self, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = α_t·x + σ_t·ε."""
        return _bcast(self.alpha(t), x) * x + _bcast(self.sigma(t), x) * eps

    def velocity(self, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The v-prediction target dx_t/dt = α'_t·x + σ'_t·ε."""
        return _bcast(self.d_alpha(t), x) * x + _bcast(self.d_sigma(t), x) * eps

    def score_from_velocity(self, v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """∇log p_t(x_t) from a velocity prediction.

        Solving x_t = αx + σε and v = α'x + σ'ε for ε gives ε = (α·v − α'·x_t)/(α·σ' − α'·σ), and
        score = −ε/σ. This equals the usual form (α/α'·v − x)/(σ² − α/α'·σ'·σ) (docs/method.md §3.1) but never divides by α'
        (which is 0 at t = 0 for the cosine path).
        """
        a, s = _bcast(self.alpha(t), x_t), _bcast(self.sigma(t), x_t)
        da, ds = _bcast(self.d_alpha(t), x_t), _bcast(self.d_sigma(t), x_t)
        eps = (a * v - da * x_t) / (a * ds - da * s)
        return -eps / s


@dataclass(frozen=True)
class LinearPath(Path):
    """α = 1 − t, σ = t (rectified flow / SiT "Linear")."""

    name: str = "linear"

    def alpha(self, t):
        return 1 - t

    def sigma(self, t):
        return t

    def d_alpha(self, t):
        return -torch.ones_like(t)

    def d_sigma(self, t):
        return torch.ones_like(t)

    def t_from_ratio(self, r):
        return r / (1 + r)


@dataclass(frozen=True)
class CosinePath(Path):
    """α = cos(πt/2), σ = sin(πt/2) (variance preserving, SiT "GVP")."""

    name: str = "cosine"

    def alpha(self, t):
        return torch.cos(t * (math.pi / 2))

    def sigma(self, t):
        return torch.sin(t * (math.pi / 2))

    def d_alpha(self, t):
        return -(math.pi / 2) * torch.sin(t * (math.pi / 2))

    def d_sigma(self, t):
        return (math.pi / 2) * torch.cos(t * (math.pi / 2))

    def t_from_ratio(self, r):
        return (2 / math.pi) * torch.atan(r)


PATHS: dict[str, Path] = {"linear": LinearPath(), "cosine": CosinePath()}
TIME_SAMPLERS = ("uniform", "lognormal")


def get_path(name: str) -> Path:
    """The interpolant called ``name`` (one of :data:`PATHS`)."""
    if name not in PATHS:
        raise choice_error("path type", name, PATHS)
    return PATHS[name]


def sample_time(
    kind: str, n: int, path: Path, device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Training times (N,) in [0, 1].

    ``uniform``: t ~ U(0, 1). ``lognormal``: σ_t/α_t = exp(N(0, 1)), i.e. t = s/(1+s) on the
    linear path and (2/π)·atan(s) on the cosine path (the release's "lognormal" weighting).
    """
    if kind == "uniform":
        return torch.rand(n, device=device, generator=generator)
    if kind == "lognormal":
        s = torch.exp(torch.randn(n, device=device, generator=generator))
        return path.t_from_ratio(s)
    raise choice_error("time sampler (weighting)", kind, TIME_SAMPLERS)
