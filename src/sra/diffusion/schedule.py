"""The DDPM beta schedule: the numbers that define a process (:class:`DDPMConfig`) and its betas.

Betas are float64 numpy arrays: the products of 1000 alphas need that precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sra.errors import SraError, check_choice

BETA_SCHEDULES = ("linear", "cosine")
FIXED_VARIANCES = ("large", "small")
# Improved DDPM's linear schedule is defined for 1000 steps; other step counts scale the
# endpoints by REFERENCE_STEPS / num_steps so that the total noise stays comparable.
REFERENCE_STEPS = 1000
# Cosine schedule (improved DDPM): offset s and the cap on betas near t = T.
COSINE_OFFSET = 0.008
COSINE_MAX_BETA = 0.999


@dataclass
class DDPMConfig:
    """Numbers that define a DDPM process (defaults = DiT / improved DDPM)."""

    num_steps: int = 1000
    beta_schedule: str = "linear"
    # Endpoints of the linear schedule at 1000 steps (scaled by 1000/num_steps).
    beta_start: float = 1e-4
    beta_end: float = 0.02
    # Model outputs ε ‖ v (2C channels) with a learned-range variance; else ε only (C).
    learn_sigma: bool = True
    # Variance used when learn_sigma is False: "large" = β_t, "small" = posterior β̃_t.
    fixed_variance: str = "large"
    # Scale the VB term by num_steps/1000 (improved DDPM's hybrid loss; 1 at 1000 steps,
    # identical to DiT's loss there).
    rescale_vb: bool = True
    # Validate timestep tensors (one host sync per call; turn off for compiled graphs).
    check_timesteps: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.num_steps, (int, np.integer)) or self.num_steps < 1:
            raise SraError(f"num_steps must be a positive integer, got {self.num_steps!r}")
        check_choice("beta schedule", self.beta_schedule, BETA_SCHEDULES)
        check_choice("fixed variance", self.fixed_variance, FIXED_VARIANCES)
        if self.beta_schedule == "linear":
            lo, hi = self.scaled_beta_range()
            if not (0.0 < lo <= hi < 1.0):
                raise SraError(
                    f"linear betas must satisfy 0 < beta_start <= beta_end < 1 after scaling by "
                    f"{REFERENCE_STEPS}/num_steps; got [{lo}, {hi}] for num_steps={self.num_steps}"
                )

    def scaled_beta_range(self) -> tuple[float, float]:
        """Linear-schedule endpoints after the 1000/num_steps scaling."""
        scale = REFERENCE_STEPS / self.num_steps
        return self.beta_start * scale, self.beta_end * scale


def make_betas(config: DDPMConfig) -> np.ndarray:
    """The float64 beta schedule of ``config`` (length ``num_steps``)."""
    n = config.num_steps
    if config.beta_schedule == "linear":
        lo, hi = config.scaled_beta_range()
        return np.linspace(lo, hi, n, dtype=np.float64)
    # cosine: betas from the ratio of consecutive ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2)
    def alpha_bar(u: np.ndarray) -> np.ndarray:
        return np.cos((u + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2

    u = np.arange(n + 1, dtype=np.float64) / n
    ab = alpha_bar(u)
    return np.minimum(1.0 - ab[1:] / ab[:-1], COSINE_MAX_BETA)
