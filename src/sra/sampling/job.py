"""What a sampling job is: its settings (:class:`SampleJobConfig`) and how they resolve against
the checkpoint (the sampler, the data info)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch

from sra.data.base import DataInfo
from sra.errors import SraError, check_choice
from sra.sampling.config import DDPM_MODES, FLOW_MODES, PRESETS, SamplerConfig
from sra.sampling.decode import DATA_KINDS, ROUNDINGS
from sra.sampling.seeding import LABEL_MODES

FORMATS = ("png", "npz")
MIXED_PRECISIONS = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}
# Family defaults when neither a preset nor a mode is given.
FAMILY_DEFAULTS = {"SiT": SamplerConfig(mode="sde", steps=250), "DiT": SamplerConfig(mode="ddpm", steps=250)}


@dataclass(frozen=True)
class SampleJobConfig:
    """One sampling job. The sampler is ``sampler`` if given, else ``preset`` (or the family's
    default: SiT sde / DiT ddpm, 250 steps) with ``sampler_overrides`` applied; ``path_type``
    comes from the checkpoint unless overridden."""

    ckpt: str | None = None  # run dir, checkpoint dir, release .pt, or bare state dict
    num_samples: int = 50_000
    batch_size: int = 32  # per process; fixes the batches (and the SDE/DDPM noise streams)
    seed: int = 0
    labels: str = "balanced"  # balanced: every class N/K times; random: uniform draws
    class_label: int | None = None  # all samples of this class
    output_dir: str = "samples"
    formats: tuple[str, ...] = ("npz",)  # any of png, npz
    rounding: str = "round"  # round | truncate (the release truncates)
    vae: str | None = None  # diffusers AutoencoderKL hub id or folder; None → sd-vae-ft-ema
    vae_batch_size: int | None = None  # decode in chunks of this many latents (None: whole batch)
    weights: str = "ema"  # ema | model
    mixed_precision: str = "no"  # no | fp16 | bf16 (autocast around the network)
    allow_tf32: bool = True  # TF32 matmuls on CUDA (the release's generate.py default)
    preset: str | None = None
    sampler_overrides: dict[str, Any] = field(default_factory=dict)
    sampler: SamplerConfig | None = None
    data_kind: str | None = None  # override / supply the checkpoint's data info
    latent_scale: float | None = None
    latent_bias: float | None = None
    grid_size: int = 64  # samples in grid.png (0: none)
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", tuple(self.formats))
        if not self.formats or any(f not in FORMATS for f in self.formats):
            raise SraError(f"unknown output formats {self.formats!r}; allowed: png, npz (or both)")
        check_choice("label mode", self.labels, LABEL_MODES)
        check_choice("rounding", self.rounding, ROUNDINGS)
        check_choice("weights", self.weights, ("ema", "model"))
        check_choice("mixed precision", self.mixed_precision, MIXED_PRECISIONS)
        if self.data_kind is not None:
            check_choice("data kind", self.data_kind, DATA_KINDS)
        if self.preset is not None:
            check_choice("sampler preset", self.preset, PRESETS)
        if self.sampler is not None and (self.preset or self.sampler_overrides):
            raise SraError("give either a SamplerConfig or a preset/overrides, not both")
        known = {f.name for f in fields(SamplerConfig)}
        bad = sorted(set(self.sampler_overrides) - known)
        if bad:
            raise SraError(f"unknown sampler settings {bad}; allowed: {', '.join(sorted(known))}")
        for name in ("num_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise SraError(f"{name.replace('_', ' ')} must be ≥ 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise SraError(f"seed must be ≥ 0, got {self.seed}")
        if self.grid_size < 0:
            raise SraError(f"grid size must be ≥ 0, got {self.grid_size}")
        if self.latent_scale is not None and self.latent_scale <= 0:
            raise SraError(f"latent scale must be > 0, got {self.latent_scale}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sampler"] = self.sampler.to_dict() if self.sampler else None
        d["formats"] = list(self.formats)
        return d


def resolve_sampler(job: SampleJobConfig, family: str, ckpt_path_type: str | None,
                    ckpt_sampler: dict | None = None) -> SamplerConfig:
    """The sampler the job runs for a model of ``family`` (SraError if the mode does not fit).
    Without a preset, the checkpoint's own recommendation (an ``sra export``'s ``sampler``) is
    the base, else the family's default; explicit settings override either."""
    if job.sampler is not None:
        cfg = job.sampler
    else:
        if job.preset:
            base = PRESETS[job.preset]
        elif ckpt_sampler:
            base = SamplerConfig.from_dict(ckpt_sampler)
        else:
            base = FAMILY_DEFAULTS[family]
        over = dict(job.sampler_overrides)
        if "path_type" not in over and ckpt_path_type:
            over["path_type"] = ckpt_path_type
        cfg = replace(base, **over)
    allowed = FLOW_MODES if family == "SiT" else DDPM_MODES
    if cfg.mode not in allowed:
        raise SraError(f"sampling mode {cfg.mode!r} does not fit a {family} model; "
                       f"allowed: {', '.join(allowed)}")
    return cfg


def resolve_data_info(ckpt_info: dict | None, model_cfg, kind: str | None = None,
                      latent_scale: float | None = None, latent_bias: float | None = None) -> DataInfo:
    """The checkpoint's data info with overrides; what a bare state dict lacks must be given."""
    if ckpt_info is None and kind is None:
        raise SraError("the checkpoint carries no data info (a bare state dict?); pass "
                       "--data-kind pixels|moments (and --latent-scale for VAE latents)")
    known = {f.name for f in fields(DataInfo)}
    d = {k: v for k, v in (ckpt_info or {}).items() if k in known}
    d.setdefault("channels", model_cfg.in_channels)
    d.setdefault("size", model_cfg.input_size)
    d.setdefault("num_classes", model_cfg.num_classes)
    for key, value in (("kind", kind), ("latent_scale", latent_scale), ("latent_bias", latent_bias)):
        if value is not None:
            d[key] = value
    info = DataInfo(**d)
    check_choice("data kind", info.kind, DATA_KINDS)
    if info.channels != model_cfg.in_channels:
        raise SraError(f"data info says {info.channels} channels but the model takes {model_cfg.in_channels}")
    if info.kind == "pixels" and info.channels not in (1, 3):
        raise SraError(f"data kind 'pixels' needs a 1- or 3-channel model, this one has "
                       f"{info.channels} channels; use --data-kind moments with a VAE")
    return info
