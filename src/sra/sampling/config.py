"""Sampler settings (one dataclass for every solver) and the paper's named presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from sra.errors import SraError, check_choice

FLOW_MODES = ("euler", "heun", "sde")  # SiT
DDPM_MODES = ("ddpm", "ddim")  # DiT
MODES = FLOW_MODES + DDPM_MODES


@dataclass(frozen=True)
class SamplerConfig:
    """How to draw samples. Times follow :mod:`sra.diffusion.paths` (t = 1 noise → t = 0 data)."""

    mode: str = "sde"  # euler | heun | sde (SiT); ddpm | ddim (DiT)
    steps: int = 250  # solver steps / respaced DDPM steps
    cfg_scale: float = 1.0  # classifier-free guidance w; 1 = conditional model only
    guidance_low: float = 0.0  # guidance only while t ∈ [low, high] (DiT: step/T)
    guidance_high: float = 1.0
    guidance_channels: int | None = None  # DiT: None = all; 3 = the DiT release's first 3 only
    path_type: str = "linear"  # SiT interpolant the model was trained with
    sde_last_t: float = 0.04  # SDE: Euler–Maruyama down to here, then one mean step to 0
    state_dtype: str = "float32"  # "float64" keeps the state like the release does
    ddim_eta: float = 0.0

    def __post_init__(self) -> None:
        check_choice("sampling mode", self.mode, MODES)
        check_choice("state dtype", self.state_dtype, ("float32", "float64"))
        if self.steps < 1:
            raise SraError(f"sampling steps must be ≥ 1, got {self.steps}")
        if self.cfg_scale < 0:
            raise SraError(f"cfg scale must be ≥ 0, got {self.cfg_scale}")
        if not 0.0 <= self.guidance_low <= self.guidance_high <= 1.0:
            raise SraError(
                f"guidance interval must satisfy 0 ≤ low ≤ high ≤ 1, got [{self.guidance_low}, "
                f"{self.guidance_high}]"
            )
        if self.mode == "sde" and not 0.0 < self.sde_last_t < 1.0:
            raise SraError(f"sde_last_t must be in (0, 1), got {self.sde_last_t}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SamplerConfig":
        """From :meth:`to_dict`'s form; unknown keys are an error naming the allowed ones."""
        known = set(cls.__dataclass_fields__)
        bad = sorted(set(d) - known)
        if bad:
            raise SraError(f"unknown sampler settings {bad}; allowed: {', '.join(sorted(known))}")
        return cls(**d)


# The paper's evaluation settings (docs/method.md §5.3). "interval high 0.7" means guidance for t ≤ 0.7.
PRESETS: dict[str, SamplerConfig] = {
    "paper-256": SamplerConfig(mode="sde", steps=250, cfg_scale=1.8, guidance_high=0.7),
    "paper-512": SamplerConfig(mode="sde", steps=250, cfg_scale=2.5, guidance_high=0.7),
    "fid-noguidance": SamplerConfig(mode="sde", steps=250, cfg_scale=1.0),
    "ode-fast": SamplerConfig(mode="heun", steps=50),
    "dit-250": SamplerConfig(mode="ddpm", steps=250, cfg_scale=1.5),
}


def preset(name: str, **overrides) -> SamplerConfig:
    """A named sampler preset with overrides."""
    check_choice("sampler preset", name, PRESETS)
    return replace(PRESETS[name], **overrides)
