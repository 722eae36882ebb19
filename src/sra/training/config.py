"""Training configuration: :class:`TrainConfig` composes the leaves' own config dataclasses
(model, flow, alignment — SRA's EMA teacher or REPA's encoder —, Dispersive Loss, optimizer, EMA,
data, sampler)
with the loop's; named presets; the resolved JSON saved per run. Nothing below the training layer
imports this file.

Every number the training loop uses lives in one of these dataclasses. A preset is a complete :class:`TrainConfig`;
command-line flags override single fields; the resolved result is written to
``RUN/config.json`` and into every checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any

from sra.data import DataConfig
from sra.data.base import DataInfo
from sra.errors import SraError, check_choice
from sra.models import ModelConfig, model_config
from sra.models.registry import ModelSpec
from sra.objectives.denoising import FlowConfig
from sra.objectives.dispersive import DispersiveConfig
from sra.objectives.groups import GroupConfig
from sra.objectives.repa import ALIGN_TARGETS, EncoderAlignConfig
from sra.objectives.sra import AlignConfig
from sra.sampling.config import SamplerConfig
from sra.training.ema import EMAConfig
from sra.training.fid import FIDConfig
from sra.training.optim import OptimConfig

MIXED_PRECISION = ("no", "fp16", "bf16")


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
    eval_samples: int = 500  # … with the --fid-* sampler and seed → eval_digits.json
    # Seconds any collective may wait (NCCL's watchdog): the main process alone writes, hashes
    # and verifies checkpoints and fetches artefacts while the others wait.
    dist_timeout: int = 3600

    def __post_init__(self) -> None:
        check_choice("mixed precision", self.mixed_precision, MIXED_PRECISION)
        check_choice("report-to", self.report_to, ("tensorboard", "wandb", "none"))
        for name in ("global_batch_size", "gradient_accumulation_steps", "max_train_steps",
                     "dist_timeout"):
            if getattr(self, name) < 1:
                raise SraError(f"{name.replace('_', '-')} must be ≥ 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class TrainConfig:
    """A complete training run."""

    model: ModelSpec = ModelSpec()
    flow: FlowConfig = FlowConfig()
    align: AlignConfig = AlignConfig()  # SRA: the EMA teacher's tokens (align_target "ema")
    align_target: str = "ema"  # "ema" (SRA, or vanilla) | "encoder" (REPA)
    encoder_align: EncoderAlignConfig = EncoderAlignConfig()  # REPA (align_target "encoder")
    groups: GroupConfig = GroupConfig()  # token groups (dual-time / attention separation); off
    dispersive: DispersiveConfig = DispersiveConfig()  # Dispersive Loss on raw tokens; off (λ 0)
    optim: OptimConfig = OptimConfig()
    ema: EMAConfig = EMAConfig()
    data: DataConfig = DataConfig()
    loop: LoopConfig = LoopConfig()
    fid: FIDConfig = FIDConfig()  # quality while training (--fid-*); off
    output_dir: str = "runs"
    exp_name: str = "sra"
    init_from: str | None = None  # initialise weights from a checkpoint (ours or the release's)

    def __post_init__(self) -> None:
        check_choice("alignment target (--align-target)", self.align_target, ALIGN_TARGETS)
        if self.uses_encoder and self.groups.active:
            raise SraError("token groups (--mask-ratio) work with the EMA teacher only, not with "
                           "--align-target encoder")

    @property
    def uses_encoder(self) -> bool:
        """REPA: an external encoder is the target (and the EMA teacher never runs)."""
        return self.align_target == "encoder" and self.encoder_align.active

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


def resolve_model_config(cfg: TrainConfig, info: DataInfo) -> ModelConfig:
    """The network's config from the registry name, custom dims and the data's shape."""
    spec = cfg.model
    overrides = dict(input_size=info.size, in_channels=info.channels, num_classes=info.num_classes,
                     qk_norm=spec.qk_norm, use_head=cfg.align.active)
    if cfg.align_target == "encoder":
        from sra.encoders import encoder_width

        rep = cfg.encoder_align
        overrides.update(use_head=rep.active)
        if rep.active:  # the REPA projector ends in the encoder's width
            conv = rep.projector == "conv"  # iREPA's convolution has no hidden width
            overrides.update(head="repa-conv" if conv else "repa", head_out=encoder_width(rep.encoder),
                             projector_dim=None if conv else rep.projector_dim)
    for name in ("depth", "hidden_size", "num_heads", "patch_size"):
        if getattr(spec, name) is not None:
            overrides[name] = getattr(spec, name)
    mcfg = model_config(spec.name, **overrides)
    if cfg.groups.active and mcfg.family != "SiT":
        raise SraError(f"token groups (--mask-ratio) are for SiT models only, not {spec.name}")
    if cfg.uses_encoder:
        mcfg.check_blocks([cfg.encoder_align.student_block], what="block-out-s")
    elif cfg.align_target == "ema" and cfg.align.active:
        mcfg.check_blocks([cfg.align.teacher_block], what="block-out-t")
    if cfg.dispersive.active:
        mcfg.check_blocks([cfg.dispersive.block_for(mcfg.depth)], what="--dispersive-block")
    return mcfg


def resolved_config(cfg: TrainConfig, model_cfg: ModelConfig, info: DataInfo, world: int,
                    micro_batch: int, compute_unit: str) -> dict:
    """What ``config.json`` and every checkpoint record: the config with the model's resolved
    dims, the data's description, the launch's shape and the unit of ``compute_s``."""
    d = cfg.to_dict()
    d["model"] = model_cfg.to_dict()
    d["model"]["name"] = cfg.model.name
    d["data_info"] = info.to_dict()
    d["num_processes"] = world
    d["micro_batch_per_process"] = micro_batch
    d["compute_unit"] = compute_unit  # what metrics.jsonl's compute_s counts
    return d


def dataset_options(cfg: TrainConfig) -> dict:
    """Extra ``build_dataset`` arguments: REPA needs the raw image of every latent."""
    return dict(with_images=cfg.uses_encoder, image_dir=cfg.data.image_dir)


def open_dataset(cfg: TrainConfig):
    """The run's dataset (with the raw images beside latents when the objective needs them)."""
    from sra.data import build_dataset

    return build_dataset(cfg.data.data_dir, cfg.data.resolution, **dataset_options(cfg))


def build_objective(cfg: TrainConfig, mcfg: ModelConfig):
    """The run's objective: SRA (or vanilla), SRA on token groups when ``groups`` is on, or
    REPA with the encoder built here and injected (objectives never import ``sra.encoders``);
    each with the Dispersive Loss term on its student's raw tokens when ``dispersive`` is on."""
    from sra.objectives import SRAObjective, make_process
    from sra.objectives.dispersive import build_term
    from sra.objectives.groups import DualTimeObjective

    process = make_process(mcfg.family, cfg.flow)
    extra = build_term(cfg.dispersive, mcfg.depth)
    if cfg.align_target == "encoder":
        if not cfg.uses_encoder:  # λ = 0 or switched off: plain denoising, nothing loaded
            return SRAObjective(process, replace(cfg.align, enabled=False),
                                cfg.data.label_dropout, mcfg.num_classes, extra)
        from sra.encoders import build_encoder
        from sra.objectives.repa import EncoderAlignObjective

        rep = cfg.encoder_align
        encoder = build_encoder(rep.encoder, rep.encoder_weights, rep.encoder_resolution)
        return EncoderAlignObjective(process, rep, cfg.data.label_dropout, mcfg.num_classes,
                                     encoder, grid=mcfg.grid_size, extra=extra)
    if cfg.groups.active:
        return DualTimeObjective(process, cfg.groups, cfg.align, cfg.data.label_dropout,
                                 mcfg.num_classes, grid=mcfg.grid_size, patch=mcfg.patch_size,
                                 extra=extra)
    return SRAObjective(process, cfg.align, cfg.data.label_dropout, mcfg.num_classes, extra)


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
    # The quality curve of the laptop demo: the digit classifier's FD of 500 EMA samples every
    # 500 steps (Heun 25 steps, no guidance: the convergence study's metric).
    fid=FIDConfig(every=500, samples=500, batch_size=250,
                  sampler=SamplerConfig(mode="heun", steps=25)),
    exp_name="digits-sra",
)

# The release's recipes (docs/method.md §4.4); ImageNet 256 px latents.
_SIT_XL = TrainConfig(
    model=ModelSpec(name="SiT-XL/2"),
    align=AlignConfig(student_block=8, teacher_block=20, t_max=0.2, loss_type="cos", weight=0.5),
    exp_name="sit-xl2-sra",
)
# REPA (docs/method.md §9.3): SiT-XL/2, block 8 through a 2048-wide projector toward DINOv2-B/14 tokens of
# the clean 224 px image, λ 0.5. The SRA fields stay the XL recipe's (used with --align-target ema).
_SIT_XL_REPA = replace(
    _SIT_XL, align_target="encoder", exp_name="sit-xl2-repa",
    encoder_align=EncoderAlignConfig(encoder="dinov2-vit-b14", student_block=8, weight=0.5,
                                     projector_dim=2048))
# The digits positive control: the same run as `digits`, aligned (block 2, as SRA's student) with a
# separately trained digit classifier's 4×4 conv map; the projector is 2·D wide like SRA's head.
_DIGITS_REPA = replace(
    _DIGITS, align_target="encoder", exp_name="digits-repa",
    encoder_align=EncoderAlignConfig(encoder="digits-classifier", student_block=2, weight=0.5,
                                     projector_dim=256))
# iREPA (docs/method.md §9.4): REPA's XL recipe with one 3×3 conv as the projector, z-scored
# encoder tokens (α 0.6) and λ 1.0 (its ldm/configs/irepa.yaml); the digits one toward the same
# digit classifier as digits-repa (the positive control).
_IREPA = dict(projector="conv", target_norm="zscore", zscore_alpha=0.6, weight=1.0)
_SIT_XL_IREPA = replace(_SIT_XL_REPA, exp_name="sit-xl2-irepa",
                        encoder_align=replace(_SIT_XL_REPA.encoder_align, **_IREPA))
_DIGITS_IREPA = replace(_DIGITS_REPA, exp_name="digits-irepa",
                        encoder_align=replace(_DIGITS_REPA.encoder_align, **_IREPA))
# Dispersive Loss (docs/method.md §9.4), the paper's (JAX) recipe: InfoNCE-ℓ2, λ 0.5, τ 0.5 on
# block depth // 4, on vanilla SiT (no SRA head, no teacher). SiT-B/2: block 3.
_DISPERSIVE = DispersiveConfig(weight=0.5, tau=0.5, kind="infonce-l2", block=None)
# (SRA's fields are the B/2 recipe's, switched off: --use-alignment-loss true adds SRA on top.)
_SIT_B2_DISPERSIVE = TrainConfig(
    model=ModelSpec(name="SiT-B/2"), dispersive=_DISPERSIVE, exp_name="sit-b2-dispersive",
    align=AlignConfig(enabled=False, student_block=3, teacher_block=8, t_max=0.2, weight=0.2))
_DIGITS_DISPERSIVE = replace(_DIGITS, align=replace(_DIGITS.align, enabled=False),
                             dispersive=_DISPERSIVE, exp_name="digits-dispersive")
PRESETS: dict[str, TrainConfig] = {
    "digits": _DIGITS,
    "digits-vanilla": override(override(_DIGITS, "align.enabled", False), "exp_name", "digits-vanilla"),
    "digits-repa": _DIGITS_REPA,
    "digits-irepa": _DIGITS_IREPA,
    "digits-dispersive": _DIGITS_DISPERSIVE,
    "release-default": TrainConfig(exp_name="sra"),  # s = 4, t = 8
    "sit-xl2-256": _SIT_XL,
    "sit-xl2-512": replace(_SIT_XL, data=DataConfig(resolution=512), exp_name="sit-xl2-512-sra"),
    "sit-xl2-repa-256": _SIT_XL_REPA,
    "sit-xl2-irepa-256": _SIT_XL_IREPA,
    "sit-b2-dispersive": _SIT_B2_DISPERSIVE,
    # The paper's B/2 ablation recipe: blocks 3 → 8, t_max 0.2, λ 0.2.
    "sit-b2-256": TrainConfig(
        model=ModelSpec(name="SiT-B/2"),
        align=AlignConfig(student_block=3, teacher_block=8, t_max=0.2, weight=0.2),
        exp_name="sit-b2-sra",
    ),
    # The follow-up's recipe as its README / scripts/train.sh run it (not its argparse defaults):
    # mask ratio 0.25, dual-time scheduling, attention separation, SRA teacher times with the
    # teacher mask, alignment on, SiT-B/2, blocks 3 → 8, batch 256, fp16. Alignment uses our
    # per-token `cos` (that code computes it along the token axis: --loss-type cos-release).
    "sit-b2-dts-as": TrainConfig(
        model=ModelSpec(name="SiT-B/2"),
        align=AlignConfig(student_block=3, teacher_block=8, t_max=0.2, weight=0.5),
        groups=GroupConfig(mask_ratios=(0.25,), dual_time=True, attention_separation=True,
                           teacher_t="sra", teacher_mask=True),
        exp_name="sit-b2-dts-as",
    ),
    "digits-dts-as": replace(
        _DIGITS, exp_name="digits-dts-as",
        groups=GroupConfig(mask_ratios=(0.25,), dual_time=True, attention_separation=True,
                           teacher_t="sra", teacher_mask=True)),
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
