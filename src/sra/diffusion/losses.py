"""Elementwise terms of the DDPM variational bound: Gaussian KL and the discretized decoder.

Values are elementwise; callers reduce with :func:`mean_flat`. Used by
:class:`sra.diffusion.ddpm.GaussianDiffusion` and by the denoising objectives.
"""

from __future__ import annotations

import math

import torch

from sra.errors import SraError

# Discretized decoder: data in [-1, 1] quantised to 256 levels → half bin width 1/255.
PIXEL_HALF_BIN = 1.0 / 255.0
# The decoder treats values beyond ±EDGE as the open-ended first/last bin.
PIXEL_EDGE = 0.999
LOG_CLAMP = 1e-12  # floor of probabilities/variances before a log, so no term is -inf


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions: (N, ...) → (N,)."""
    return x.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """Elementwise KL( N(mean1, e^logvar1) ‖ N(mean2, e^logvar2) ) in nats (broadcasting)."""
    return 0.5 * (
        logvar2 - logvar1 - 1.0 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Fast tanh approximation of the standard normal CDF (the one used by DDPM decoders)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Elementwise log-probability (nats) of data ``x`` in [-1, 1] quantised to 256 bins.

    Each value owns the interval x ± 1/255 under N(means, exp(log_scales)²); the first and
    last bins extend to −∞ and +∞ so the probabilities of the 256 bins sum to one.
    """
    if x.shape != means.shape or x.shape != log_scales.shape:
        raise SraError(
            f"x, means and log_scales must share a shape, got {tuple(x.shape)}, "
            f"{tuple(means.shape)}, {tuple(log_scales.shape)}"
        )
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_hi = approx_standard_normal_cdf(inv_std * (centered + PIXEL_HALF_BIN))
    cdf_lo = approx_standard_normal_cdf(inv_std * (centered - PIXEL_HALF_BIN))
    log_cdf_hi = torch.log(cdf_hi.clamp(min=LOG_CLAMP))
    log_one_minus_cdf_lo = torch.log((1.0 - cdf_lo).clamp(min=LOG_CLAMP))
    log_delta = torch.log((cdf_hi - cdf_lo).clamp(min=LOG_CLAMP))
    return torch.where(
        x < -PIXEL_EDGE, log_cdf_hi, torch.where(x > PIXEL_EDGE, log_one_minus_cdf_lo, log_delta)
    )
