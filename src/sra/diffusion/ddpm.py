"""The discrete-time Gaussian diffusion process (DDPM) of the DiT family: :class:`GaussianDiffusion`.

From a beta schedule (:mod:`sra.diffusion.schedule`) it gives what the DiT objective and the
DDPM/DDIM samplers need: the forward process ``q(x_t | x_0)``, the true posterior
``q(x_{t-1} | x_t, x_0)``, the model's reverse step ``p(x_{t-1} | x_t)`` with a learned-range
variance, the hybrid loss (MSE on ε + variational bound with the mean frozen, as in improved
DDPM / DiT; elementwise terms in :mod:`sra.diffusion.losses`) and respaced copies of itself
(:mod:`sra.diffusion.respace`).

Schedules are kept as float64 numpy arrays (the precision the products of 1000 alphas need);
values are gathered per sample, cast to float32 (float64 for float64 inputs) and broadcast.

Timestep conventions: every method of a :class:`GaussianDiffusion` takes indices into *its
own* schedule (``0 .. num_timesteps-1``). A respaced diffusion keeps ``timestep_map``, the
ORIGINAL step (0..999) of each of its indices; the model must always be fed original steps
(the samplers in :mod:`sra.sampling.ddpm` do the mapping).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
import torch

from sra.diffusion.losses import LOG_CLAMP, discretized_gaussian_log_likelihood, mean_flat, normal_kl
from sra.diffusion.respace import Respacing, respaced_betas, space_timesteps
from sra.diffusion.schedule import REFERENCE_STEPS, DDPMConfig, make_betas
from sra.errors import SraError

class PMeanVar(NamedTuple):
    """The model's reverse step p(x_{t-1} | x_t) and its x_0 estimate."""

    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    pred_x0: torch.Tensor


def _work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (never compute in half precision)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


class GaussianDiffusion:
    """A DDPM process over ``num_timesteps`` steps (possibly a respaced subset of the original).

    Build with ``GaussianDiffusion(DDPMConfig(...))``; ``respaced(...)`` derives samplers' grids.
    """

    def __init__(
        self,
        config: DDPMConfig | None = None,
        *,
        betas: np.ndarray | None = None,
        timestep_map: Sequence[int] | None = None,
    ) -> None:
        self.config = config if config is not None else DDPMConfig()
        betas = make_betas(self.config) if betas is None else np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) == 0 or np.any(betas <= 0) or np.any(betas >= 1):
            raise SraError("betas must be a non-empty 1-D array with values in (0, 1)")
        self.num_timesteps = int(len(betas))
        # Without a map the schedule is its own original (custom betas included).
        self.original_num_steps = self.num_timesteps if timestep_map is None else self.config.num_steps
        tm = list(range(self.num_timesteps)) if timestep_map is None else [int(s) for s in timestep_map]
        if len(tm) != self.num_timesteps:
            raise SraError(f"timestep_map has {len(tm)} entries for {self.num_timesteps} steps")
        self.timestep_map = np.asarray(tm, dtype=np.int64)
        if self.timestep_map.min() < 0 or self.timestep_map.max() >= self.original_num_steps:
            raise SraError(f"timestep_map values must lie in 0..{self.original_num_steps - 1}")

        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(self.alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        # posterior q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # β̃_0 = 0; its log is replaced by log β̃_1 so the learned range stays finite.
        if self.num_timesteps > 1:
            pv = np.append(self.posterior_variance[1], self.posterior_variance[1:])
        else:
            pv = np.maximum(self.posterior_variance, LOG_CLAMP)
        self.posterior_log_variance_clipped = np.log(pv)
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(self.alphas) / (1.0 - self.alphas_cumprod)
        self._cache: dict[tuple[str, str], torch.Tensor] = {}

    # ---- helpers ------------------------------------------------------------------------

    def __repr__(self) -> str:
        return (
            f"GaussianDiffusion(num_timesteps={self.num_timesteps}, original={self.original_num_steps}, "
            f"schedule={self.config.beta_schedule!r}, learn_sigma={self.config.learn_sigma})"
        )

    def _check_t(self, t: torch.Tensor, x: torch.Tensor, check_range: bool = True) -> None:
        """Integer (N,) timesteps; the range check costs a host sync, so callers that built
        ``t`` themselves (samplers, nested calls) skip it."""
        if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise SraError(f"timesteps must be an integer tensor with values in 0..{self.num_timesteps - 1}")
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise SraError(f"timesteps must have shape ({x.shape[0]},) to match the batch, got {tuple(t.shape)}")
        if check_range and self.config.check_timesteps and t.numel() > 0:
            lo, hi = (int(v) for v in torch.aminmax(t))  # sync point (callers' own t: check_t=False)
            if lo < 0 or hi >= self.num_timesteps:
                raise SraError(
                    f"timestep out of range ({lo}..{hi}); allowed: 0..{self.num_timesteps - 1}"
                )

    def gather(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``getattr(self, name)[t]`` as (N, 1, ..., 1) in the working dtype on x's device."""
        out = self._table(name, x.device)[t.to(x.device)].to(_work_dtype(x))
        return out.view(-1, *([1] * (x.ndim - 1)))

    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        """Schedule array ``name`` as a tensor on ``device`` (cached per device)."""
        key = (name, str(device))
        table = self._cache.get(key)
        if table is None:
            arr = torch.from_numpy(np.ascontiguousarray(getattr(self, name)))
            if arr.dtype == torch.float64 and device.type == "mps":
                arr = arr.float()  # MPS has no float64
            table = self._cache[key] = arr.to(device)
        return table

    def split_output(self, model_output: torch.Tensor, x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(ε, v) halves of a model output; v is None when the variance is fixed."""
        C = x_t.shape[1]
        want = 2 * C if self.config.learn_sigma else C
        if model_output.shape[0] != x_t.shape[0] or model_output.shape[1] != want or model_output.shape[2:] != x_t.shape[2:]:
            raise SraError(
                f"model output must have shape {(x_t.shape[0], want, *x_t.shape[2:])} "
                f"(learn_sigma={self.config.learn_sigma}), got {tuple(model_output.shape)}"
            )
        if self.config.learn_sigma:
            return model_output[:, :C], model_output[:, C:]
        return model_output, None

    # ---- forward process ----------------------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·noise (noise ~ N(0, I) when not given)."""
        self._check_t(t, x0)
        if noise is None:
            noise = torch.randn_like(x0)
        if noise.shape != x0.shape:
            raise SraError(f"noise shape {tuple(noise.shape)} must equal x0 shape {tuple(x0.shape)}")
        return self.gather("sqrt_alphas_cumprod", t, x0) * x0 + self.gather(
            "sqrt_one_minus_alphas_cumprod", t, x0
        ) * noise

    def q_posterior_mean_variance(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, *, check_t: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of the true posterior q(x_{t-1} | x_t, x0)."""
        self._check_t(t, x_t, check_t)
        if x0.shape != x_t.shape:
            raise SraError(f"x0 shape {tuple(x0.shape)} must equal x_t shape {tuple(x_t.shape)}")
        mean = self.gather("posterior_mean_coef1", t, x_t) * x0 + self.gather("posterior_mean_coef2", t, x_t) * x_t
        var = self.gather("posterior_variance", t, x_t).expand_as(x_t)
        logvar = self.gather("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, var, logvar

    # ---- reverse process ----------------------------------------------------------------

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 = (x_t − √(1−ᾱ)·ε)/√ᾱ."""
        return self.gather("sqrt_recip_alphas_cumprod", t, x_t) * x_t - self.gather(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        ) * eps

    def predict_eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """ε = (x_t/√ᾱ − x0)/√(1/ᾱ − 1)."""
        return (self.gather("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0) / self.gather(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )

    def model_log_variance(self, v: torch.Tensor | None, t: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """Log-variance of p(x_{t-1}|x_t): learned range frac·log β + (1−frac)·log β̃ or fixed."""
        if v is None:
            if self.config.fixed_variance == "small":
                return self.gather("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
            # "large": β_t, with β̃_1 at t = 0 (improved DDPM) so the decoder is not too wide.
            return self.gather("_fixed_large_log_variance", t, x_t).expand_as(x_t)
        min_log = self.gather("posterior_log_variance_clipped", t, x_t)
        max_log = self.gather("_log_betas", t, x_t)
        frac = (v + 1.0) / 2.0  # v ∈ [-1, 1] → [0, 1]
        return frac * max_log + (1.0 - frac) * min_log

    @property
    def _log_betas(self) -> np.ndarray:
        return np.log(self.betas)

    @property
    def _fixed_large_log_variance(self) -> np.ndarray:
        if self.num_timesteps == 1:
            return np.log(self.betas)
        return np.log(np.append(self.posterior_variance[1], self.betas[1:]))

    def p_mean_variance(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
        *,
        check_t: bool = True,
    ) -> PMeanVar:
        """Reverse step from a model output (N, 2C, ...) = ε ‖ v (or (N, C, ...) = ε).

        Returns mean, variance, log_variance (all (N, C, ...)) and pred_x0 (clamped to
        [-1, 1] when ``clip_denoised``). ``check_t=False`` skips the range check (its host
        sync) for callers that built ``t`` themselves.
        """
        self._check_t(t, x_t, check_t)
        eps, v = self.split_output(model_output, x_t)
        dtype = _work_dtype(x_t, model_output)
        x_t = x_t.to(dtype)
        eps = eps.to(dtype)
        v = None if v is None else v.to(dtype)
        log_var = self.model_log_variance(v, t, x_t)
        pred_x0 = self.predict_x0_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t, check_t=False)
        return PMeanVar(mean=mean, variance=torch.exp(log_var), log_variance=log_var, pred_x0=pred_x0)

    # ---- losses -------------------------------------------------------------------------

    def vb_terms_bpd(
        self,
        model_output: torch.Tensor,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
        *,
        check_t: bool = True,
    ) -> torch.Tensor:
        """Per-sample VB term in bits/dim: KL(q ‖ p) for t > 0, decoder NLL at t = 0. (N,)"""
        true_mean, _, true_logvar = self.q_posterior_mean_variance(x0, x_t, t, check_t=check_t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=clip_denoised, check_t=False)
        kl = mean_flat(normal_kl(true_mean, true_logvar, out.mean, out.log_variance)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(
            x0.to(out.mean.dtype), means=out.mean, log_scales=0.5 * out.log_variance
        )
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(
        self,
        model_output: torch.Tensor,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Hybrid loss from one model output at (x_t, t), where x_t = q_sample(x0, t, noise).

        Returns ``mse`` (mean-over-dims ε error), ``vb`` (VB term with the ε half detached, so
        only the variance half learns from it; scaled by num_steps/1000 when
        ``config.rescale_vb``; zeros when the variance is fixed) and ``loss = mse + vb``,
        each of shape (N,).
        """
        self._check_t(t, x_t)
        if noise.shape != x_t.shape or x0.shape != x_t.shape:
            raise SraError(
                f"x0, x_t and noise must share a shape, got {tuple(x0.shape)}, {tuple(x_t.shape)}, {tuple(noise.shape)}"
            )
        eps, v = self.split_output(model_output, x_t)
        dtype = _work_dtype(x_t, model_output)
        mse = mean_flat((noise.to(dtype) - eps.to(dtype)) ** 2)
        if v is None:
            vb = torch.zeros_like(mse)
        else:
            # Frozen mean: the VB term trains the variance only; ε is trained by the MSE alone.
            frozen = torch.cat([eps.detach(), v], dim=1)
            vb = self.vb_terms_bpd(frozen, x0, x_t, t, clip_denoised=False, check_t=False)
            if self.config.rescale_vb:
                vb = vb * (self.num_timesteps / REFERENCE_STEPS)
        return {"mse": mse, "vb": vb, "loss": mse + vb}

    # ---- respacing ----------------------------------------------------------------------

    def respaced(self, timesteps: Respacing) -> "GaussianDiffusion":
        """A diffusion over a subset of this one's steps (see :func:`space_timesteps`).

        Betas are recomputed so that ᾱ at every kept step equals this diffusion's ᾱ there;
        ``timestep_map`` of the result gives ORIGINAL steps (composed through this one's map).
        """
        keep = space_timesteps(self.num_timesteps, timesteps)
        return GaussianDiffusion(
            self.config, betas=respaced_betas(self.alphas_cumprod, keep),
            timestep_map=[int(self.timestep_map[i]) for i in keep],
        )
