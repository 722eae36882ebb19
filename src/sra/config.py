"""Training configuration: dataclasses, named presets, and the resolved JSON saved per run.

Every number the training loop uses lives here. A preset is a complete :class:`TrainConfig`;
command-line flags override single fields; the resolved result is written to
``RUN/config.json`` and into every checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from typing import Any

from sra.errors import SraError, check_choice
from sra.objectives.denoising import FlowConfig
from sra.objectives.sra import AlignConfig
from sra.sampling.config import SamplerConfig

MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass(frozen=True)
class ModelSpec:
    """Which network: a registry name plus the few fields that depend on the data."""

    name: str = "SiT-XL/2"
    qk_norm: bool = False
    fused_attn: bool = True
    # Custom dims for tiny models (None → from the registry name).
    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and clipping (the release's defaults)."""

    learning_rate: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    warmup_steps: int = 0  # linear LR warm-up (0: constant LR like the release)


@dataclass(frozen=True)
class EMAConfig:
    """EMA of the weights; the EMA model is also the SRA teacher."""

    decay: float = 0.9999
    # decay_n = min(decay, (1 + n)/(10 + n)): lets short runs leave the initial weights behind.
    warmup: bool = False


@dataclass(frozen=True)
class DataConfig:
    data_dir: str = "digits"  # "digits", a release vae-sd dir/ZIP, or a packed dir
    resolution: int | None = None  # image resolution (checked against the data); None → data's
    num_workers: int = 4
    label_dropout: float = 0.1  # --cfg-prob
    vae: str = "stabilityai/sd-vae-ft-ema"  # decodes latent sample grids (hub id or local path)


@dataclass(frozen=True)
class LoopConfig:
    """Batching, duration, logging, checkpointing and monitoring."""

    global_batch_size: int = 256  # over all processes and accumulation steps
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 400_000  # optimizer steps
    mixed_precision: str = "fp16"
    allow_tf32: bool = True
    seed: int = 0
    log_every: int = 10
    checkpoint_steps: int = 50_000
    keep_last: int = 2  # checkpoints kept besides milestones
    milestone_steps: int = 100_000  # checkpoints at multiples of this are never pruned
    sample_steps: int = 10_000  # EMA sample grid every this many steps (0: only at the end)
    grid_samples: int = 16
    grid_sampler: SamplerConfig = SamplerConfig(mode="euler", steps=50, cfg_scale=4.0)
    max_consecutive_skips: int = 25  # non-finite steps in a row before stopping
    compile: bool = False
    report_to: str = "tensorboard"  # tensorboard | wandb | none
    eval_digits: bool = True  # digits: classifier FD/accuracy of EMA samples at the end
    eval_samples: int = 500

    def __post_init__(self) -> None:
        check_choice("mixed precision", self.mixed_precision, MIXED_PRECISION)
        check_choice("report-to", self.report_to, ("tensorboard", "wandb", "none"))
        for name in ("global_batch_size", "gradient_accumulation_steps", "max_train_steps"):
            if getattr(self, name) < 1:
                raise SraError(f"{name.replace('_', '-')} must be ≥ 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class TrainConfig:
    """A complete training run."""

    model: ModelSpec = ModelSpec()
    flow: FlowConfig = FlowConfig()
    align: AlignConfig = AlignConfig()
    optim: OptimConfig = OptimConfig()
    ema: EMAConfig = EMAConfig()
    data: DataConfig = DataConfig()
    loop: LoopConfig = LoopConfig()
    output_dir: str = "runs"
    exp_name: str = "sra"
    init_from: str | None = None  # initialise weights from a checkpoint (ours or the release's)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


def _from_dict(cls, d: dict):
    kwargs = {}
    for f in fields(cls):
        if f.name not in d:
            continue
        v = d[f.name]
        default = f.default if f.default is not f.default_factory else None  # type: ignore[misc]
        if is_dataclass(default) and isinstance(v, dict):
            v = _from_dict(type(default), v)
        kwargs[f.name] = v
    return cls(**kwargs)


def config_from_dict(d: dict) -> TrainConfig:
    """Rebuild a :class:`TrainConfig` from its JSON form (unknown keys are ignored)."""
    return _from_dict(TrainConfig, d)


def override(cfg, path: str, value):
    """``replace`` a nested field by dotted path, e.g. ``override(cfg, "align.weight", 0.2)``."""
    head, _, rest = path.partition(".")
    if not rest:
        return replace(cfg, **{head: value})
    return replace(cfg, **{head: override(getattr(cfg, head), rest, value)})


# -- presets ---------------------------------------------------------------------------------------
# The bundled digits: a tiny SiT trained in pixel space that learns recognisable digits on a
# 2-core CPU in minutes (lr 2e-3 was needed; 3e-4 stays at chance within 1000 steps).
_DIGITS = TrainConfig(
    model=ModelSpec(name="SiT-S/4", depth=6, hidden_size=128, num_heads=4, patch_size=4),
    align=AlignConfig(student_block=2, teacher_block=4, t_max=0.2, loss_type="cos", weight=0.5),
    optim=OptimConfig(learning_rate=2e-3, warmup_steps=100),
    ema=EMAConfig(decay=0.999, warmup=True),
    data=DataConfig(data_dir="digits", num_workers=0),
    loop=LoopConfig(
        global_batch_size=128, max_train_steps=1500, mixed_precision="no", log_every=25,
        checkpoint_steps=500, keep_last=2, milestone_steps=0, sample_steps=500, grid_samples=100,
        grid_sampler=SamplerConfig(mode="heun", steps=25, cfg_scale=2.0),
    ),
    exp_name="digits-sra",
)

# The release's recipes (SPEC §3/§4); ImageNet 256 px latents.
_SIT_XL = TrainConfig(
    model=ModelSpec(name="SiT-XL/2"),
    align=AlignConfig(student_block=8, teacher_block=20, t_max=0.2, loss_type="cos", weight=0.5),
    exp_name="sit-xl2-sra",
)
PRESETS: dict[str, TrainConfig] = {
    "digits": _DIGITS,
    "digits-vanilla": override(override(_DIGITS, "align.enabled", False), "exp_name", "digits-vanilla"),
    "release-default": TrainConfig(exp_name="sra"),  # s = 4, t = 8
    "sit-xl2-256": _SIT_XL,
    "sit-xl2-512": replace(_SIT_XL, data=DataConfig(resolution=512), exp_name="sit-xl2-512-sra"),
    # The paper's B/2 ablation recipe: blocks 3 → 8, t_max 0.2, λ 0.2.
    "sit-b2-256": TrainConfig(
        model=ModelSpec(name="SiT-B/2"),
        align=AlignConfig(student_block=3, teacher_block=8, t_max=0.2, weight=0.2),
        exp_name="sit-b2-sra",
    ),
    "dit-xl2-256": TrainConfig(
        model=ModelSpec(name="DiT-XL/2"),
        align=AlignConfig(student_block=8, teacher_block=16, t_max=0.2, loss_type="sml1",
                          weight=0.4, schedule="exp-decay", decay_start=745_745,
                          decay_steps=5_005_000),
        exp_name="dit-xl2-sra",
    ),
}


def preset(name: str) -> TrainConfig:
    check_choice("preset", name, PRESETS)
    return PRESETS[name]
