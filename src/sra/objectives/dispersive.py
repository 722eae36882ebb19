"""Dispersive Loss (Wang & He, 2025; docs/method.md §9.4): spread one block's raw tokens of the
samples of a micro-batch apart, with no projector and no positive pairs.

z_i = the output tokens (T, D) of block b for sample i, flattened (d = T·D). Four kinds, as the
paper's Table 1 names them; InfoNCE-ℓ2 is the paper's and the default:

- ``infonce-l2``:  L = log( (1/N²) Σ_{i,j} exp(−‖z_i − z_j‖² / (d·τ)) ), all N² ordered pairs,
  the diagonal included (the authors' PyTorch code pads its ``pdist`` with zeros to N²);
- ``infonce-cos``: the same with −cos(z_i, z_j) in place of ‖z_i − z_j‖²/d;
- ``hinge``:       L = (1/N²) Σ_{i≠j} max(0, ε − ‖z_i − z_j‖²/d)²;
- ``covariance``:  every feature standardised over the batch, ẑ_im = (z_im − mean_i z_im) /
  √(var_i z_im + 1e-6) (biased moments, so N = 1 is defined); C = ẑᵀẑ / N; L = the mean of
  C_mn² over the d(d − 1) off-diagonal entries.

The loss is per call: with every process holding a micro-batch it is per process (per
micro-batch under gradient accumulation), as the authors compute it. The objectives add λ·L to
their total through :class:`DispersiveTerm`, on the raw tokens of their own forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sra.errors import SraError, check_choice
from sra.objectives.sra import check_until, stopped

DISPERSIVE_KINDS = ("infonce-l2", "infonce-cos", "hinge", "covariance")
COVARIANCE_EPS = 1e-6  # added to each feature's variance: identical samples stay finite


@dataclass(frozen=True)
class DispersiveConfig:
    """The dispersive term; off while ``weight`` is 0 (the default)."""

    weight: float = 0.0  # λ (the paper's JAX recipe: 0.5; the PyTorch release: 0.25)
    tau: float = 0.5  # τ of the InfoNCE kinds (JAX: 0.5; PyTorch release: 1)
    kind: str = "infonce-l2"
    block: int | None = None  # b, 1-indexed; None → depth // 4 (at least 1), the JAX recipe's
    epsilon: float = 1.0  # ε, the hinge's margin
    until: int | None = None  # --align-until: λ = 0 after this many optimizer steps

    def __post_init__(self) -> None:
        check_choice("dispersive loss kind (--dispersive-kind)", self.kind, DISPERSIVE_KINDS)
        if self.weight < 0:
            raise SraError(f"--dispersive-weight must be ≥ 0, got {self.weight}")
        if not self.tau > 0:
            raise SraError(f"--dispersive-tau must be > 0, got {self.tau}")
        if self.epsilon < 0:
            raise SraError(f"--disp-epsilon must be ≥ 0, got {self.epsilon}")
        if self.block is not None and (isinstance(self.block, bool) or self.block < 1):
            raise SraError(f"--dispersive-block must be ≥ 1, got {self.block}")
        check_until(self.until)

    @property
    def active(self) -> bool:
        return self.weight > 0

    def block_for(self, depth: int) -> int:
        """The block whose tokens are dispersed in a model of ``depth`` blocks."""
        return self.block if self.block is not None else max(1, depth // 4)


def _scaled_sq_distances(z: torch.Tensor) -> torch.Tensor:
    """(N, d) → (N, N) ‖z_i − z_j‖² / d, with an exact zero diagonal. Through the Gram matrix
    (N²·d work, no (N, N, d) tensor), on batch-centred rows: distances do not change and the
    norms that cancel are smaller."""
    c = z - z.mean(dim=0, keepdim=True)
    sq = (c * c).sum(dim=1)  # (N,)
    dist = (sq[:, None] + sq[None, :] - 2.0 * (c @ c.T)).clamp_min(0.0)  # (N, N)
    eye = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    return dist.masked_fill(eye, 0.0) / z.shape[1]


def _covariance(z: torch.Tensor) -> torch.Tensor:
    """Mean squared off-diagonal entry of the covariance of per-feature standardised z (N, d),
    from the (N, N) Gram matrix: Σ_{m≠n} C_mn² = ‖ẑẑᵀ‖_F² / N² − Σ_m C_mm²."""
    n, d = z.shape
    c = z - z.mean(dim=0, keepdim=True)
    zhat = c / torch.sqrt((c * c).mean(dim=0, keepdim=True) + COVARIANCE_EPS)  # (N, d)
    gram = zhat @ zhat.T  # (N, N)
    diag = (zhat * zhat).sum(dim=0) / n  # (d,) C_mm
    off = (gram * gram).sum() / (n * n) - (diag * diag).sum()
    return off.clamp_min(0.0) / max(d * (d - 1), 1)


def dispersive_loss(z: torch.Tensor, kind: str = "infonce-l2", tau: float = 0.5,
                    epsilon: float = 1.0) -> torch.Tensor:
    """The dispersive loss (a scalar) of tokens ``z`` (N, T, D), in fp32 (fp64 for fp64 input)
    whatever the autocast around it; see the module docstring for each ``kind``."""
    check_choice("dispersive loss kind", kind, DISPERSIVE_KINDS)
    if z.dim() != 3:
        raise SraError(f"dispersive loss expects tokens (N, T, D), got shape {tuple(z.shape)}")
    n = z.shape[0]
    with torch.autocast(z.device.type, enabled=False):  # the N×N products stay in fp32
        flat = z.reshape(n, -1).to(torch.promote_types(z.dtype, torch.float32))  # (N, d)
        if kind == "covariance":
            return _covariance(flat)
        log_pairs = 2.0 * math.log(n)  # log N²: the mean over all ordered pairs
        if kind == "infonce-cos":
            unit = F.normalize(flat, dim=1)
            return torch.logsumexp((unit @ unit.T).flatten() / tau, dim=0) - log_pairs
        dist = _scaled_sq_distances(flat)  # (N, N)
        if kind == "infonce-l2":
            return torch.logsumexp(-dist.flatten() / tau, dim=0) - log_pairs
        eye = torch.eye(n, dtype=torch.bool, device=z.device)  # i = j is left out
        return (F.relu(epsilon - dist) ** 2).masked_fill(eye, 0.0).sum() / (n * n)


class DispersiveTerm:
    """What an objective adds for the dispersive term: which raw blocks it needs at a step, and
    λ·L with its logged statistics (``dispersive``, the unweighted loss; ``dispersive_weight``)."""

    def __init__(self, cfg: DispersiveConfig, depth: int):
        self.cfg = cfg
        self.block = cfg.block_for(depth)  # checked against the model in resolve_model_config

    def weight(self, step: int) -> float:
        """λ at optimizer step ``step`` (steps already taken): 0 after ``until``."""
        return 0.0 if not self.cfg.active or stopped(self.cfg.until, step) else self.cfg.weight

    def blocks(self, step: int) -> tuple[int, ...]:
        """The raw blocks the forward must return at ``step`` (none while the term is off)."""
        return (self.block,) if self.weight(step) > 0 else ()

    def __call__(self, features: dict[int, torch.Tensor], step: int,
                 like: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(λ·L, stats) from the forward's raw ``features``; (0, zeros) while off. ``like`` is a
        scalar on the step's device (the zeros are made from it: no host copy)."""
        w = self.weight(step)
        if w <= 0:
            zero = like.detach().new_zeros(())
            return zero, {"dispersive": zero, "dispersive_weight": zero}
        cfg = self.cfg
        loss = dispersive_loss(features[self.block], cfg.kind, cfg.tau, cfg.epsilon)
        return w * loss, {"dispersive": loss.detach(), "dispersive_weight": loss.new_full((), w)}


def build_term(cfg: DispersiveConfig, depth: int) -> DispersiveTerm | None:
    """The term for a run, or None when it is off (λ = 0): the objectives then skip it."""
    return DispersiveTerm(cfg, depth) if cfg.active else None
