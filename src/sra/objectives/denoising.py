"""Denoising objectives: how a family noises data, picks times, and scores a prediction.

Both families expose the same small interface so that the SRA objective is written once:

- ``sample_t(n, device)``: training times (SiT: float in [0, 1]; DiT: integer step 0..T−1);
- ``teacher_t(t, t_max)``: the SRA teacher's less noisy time for the same sample;
- ``noisy(x0, eps, t)``: the network input at time t;
- ``loss(pred, x0, eps, t, x_t)``: per-sample denoising loss (N,).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sra.diffusion.ddpm import mean_flat
from sra.diffusion.paths import TIME_SAMPLERS, get_path, sample_time
from sra.errors import check_choice

PREDICTIONS = ("v",)  # the release trains SiT with v-prediction only


@dataclass(frozen=True)
class FlowConfig:
    """SiT flow matching (docs/method.md §3.1)."""

    path_type: str = "linear"  # linear | cosine
    prediction: str = "v"
    weighting: str = "uniform"  # time sampler: uniform | lognormal

    def __post_init__(self) -> None:
        get_path(self.path_type)
        check_choice("prediction", self.prediction, PREDICTIONS)
        check_choice("weighting", self.weighting, TIME_SAMPLERS)


class FlowMatching:
    """x_t = α_t·x + σ_t·ε with a velocity target; t = 0 data, t = 1 noise."""

    family = "SiT"

    def __init__(self, config: FlowConfig = FlowConfig()):
        self.config = config
        self.path = get_path(config.path_type)

    def sample_t(self, n: int, device: torch.device | str) -> torch.Tensor:
        return sample_time(self.config.weighting, n, self.path, device)

    def teacher_t(self, t: torch.Tensor, t_max: float) -> torch.Tensor:
        """t_T = clamp(t − t_max·U(0, 1), 0, 1), per sample (docs/method.md §4.1)."""
        return (t - t_max * torch.rand_like(t)).clamp(0.0, 1.0)

    def noisy(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.path.interpolate(x0, eps, t)

    def loss(self, pred, x0, eps, t, x_t) -> torch.Tensor:
        target = self.path.velocity(x0, eps, t)
        return mean_flat((pred.float() - target.float()) ** 2)


class DDPMProcess:
    """DiT: DDPM with learned-range variance and the hybrid loss (MSE(ε) + VB), docs/method.md §3.2."""

    family = "DiT"

    def __init__(self, diffusion=None):
        from sra.diffusion.ddpm import DDPMConfig, GaussianDiffusion

        # Training builds its timesteps itself (randint in range, clamped teacher steps), so the
        # range check, which reads t on the host every call, is off here.
        self.diffusion = diffusion if diffusion is not None else GaussianDiffusion(
            DDPMConfig(check_timesteps=False))
        self.num_steps = self.diffusion.num_timesteps

    def sample_t(self, n: int, device: torch.device | str) -> torch.Tensor:
        return torch.randint(0, self.num_steps, (n,), device=device)

    def teacher_t(self, t: torch.Tensor, t_max: float) -> torch.Tensor:
        """t_T = clamp(t − U_int[0, t_max·T), 1, T − 1) (docs/method.md §4.1)."""
        gap_max = max(1, int(round(t_max * self.num_steps)))
        gap = torch.randint(0, gap_max, t.shape, device=t.device)
        return (t - gap).clamp(1, self.num_steps - 1)

    def noisy(self, x0, eps, t):
        return self.diffusion.q_sample(x0, t, eps)

    def loss(self, pred, x0, eps, t, x_t) -> torch.Tensor:
        return self.diffusion.training_losses(pred.float(), x0, x_t, t, eps)["loss"]


def make_process(family: str, flow: FlowConfig | None = None):
    """The denoising process of a model family ("SiT" → flow matching, "DiT" → DDPM)."""
    check_choice("model family", family, ("SiT", "DiT"))
    return FlowMatching(flow or FlowConfig()) if family == "SiT" else DDPMProcess()
