"""What the convergence study compares: the arms (overrides of the digits preset), the regimes
(a vanilla arm against one SRA arm, or against several arms: a "family" regime), the study-wide
settings, and each run's training config."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from common import ROOT

DEFAULT_WORK_DIR = Path("/tmp/sra-convergence")
DEFAULT_DOCS_DIR = ROOT / "docs"
BASE_PRESET = "digits"

# An arm is a list of (dotted config path, value) overrides of the digits preset. Vanilla arms turn
# alignment off; an SRA arm differs from its vanilla arm only in the `align.*` fields.
ARMS: dict[str, tuple[tuple[str, Any], ...]] = {
    "vanilla": (("align.enabled", False),),
    "sra": (),  # the preset: s=2 → t=4, cos, λ 0.5, t_max 0.2, patch 4 (16 tokens)
    "sra-centered": (("align.loss_type", "cos-centered"),),
    "sra-lam2": (("align.weight", 2.0),),
    "sra-centered-lam2": (("align.loss_type", "cos-centered"), ("align.weight", 2.0)),
    "sra-s1t4": (("align.student_block", 1),),
    "sra-s2t5": (("align.teacher_block", 5),),
    "sra-tmax04": (("align.t_max", 0.4),),
    "vanilla-p2": (("align.enabled", False), ("model.patch_size", 2)),
    "sra-p2": (("model.patch_size", 2),),
    "sra-p2-centered": (("model.patch_size", 2), ("align.loss_type", "cos-centered")),
    # The paper's SiT-B/2 recipe (12 blocks, s=3 → t=8, λ 0.2) on the digits data.
    # Vanilla arms name their SRA arm's blocks too (unused in training) so the token
    # diagnostics compare the same pair of blocks in both arms.
    "vanilla-d12": (("align.enabled", False), ("model.depth", 12), ("align.student_block", 3),
                    ("align.teacher_block", 8)),
    "sra-d12": (("model.depth", 12), ("align.student_block", 3), ("align.teacher_block", 8),
                ("align.weight", 0.2)),
    # A short EMA horizon (≈33 steps, ~2 % of the run, like the paper's 10k of 400k steps) for the
    # teacher AND the evaluated weights; the preset's warm-up gives ≈ step/9 (11 % of the run).
    "vanilla-ema97": (("align.enabled", False), ("ema.decay", 0.97)),
    "sra-ema97": (("ema.decay", 0.97),),
}


def _family_arms(prefix: str, base: tuple[tuple[str, Any], ...] = ()) -> dict[str, tuple]:
    """The self-alignment family on one base (extra overrides shared by all its arms): vanilla,
    SRA, dual-time groups + attention separation with two teacher inputs, the same groups without
    alignment, and REPA toward the digits-classifier encoder (the positive control). Every arm
    builds the backbone first from the seed, so one seed gives all arms the same initial backbone
    (heads, where any, are built after it) and the same data order."""
    groups = (("groups.mask_ratios", (0.25,)), ("groups.dual_time", True),
              ("groups.attention_separation", True))
    return {f"{prefix}{name}": base + arm for name, arm in {
        "vanilla": (("align.enabled", False),),
        "sra": (),
        # The follow-up's reference recipe (preset digits-dts-as): r 0.25, DTS, AS, SRA teacher
        # times, teacher mask.
        "dts-as": groups + (("groups.teacher_t", "sra"), ("groups.teacher_mask", True)),
        # The second candidate: the Self-Flow teacher (whole image at the cleanest group's time),
        # no teacher mask (the reference code's argparse default teacher input).
        "dts-sf": groups + (("groups.teacher_t", "self_flow"), ("groups.teacher_mask", False)),
        # The reference recipe with half the samples kept whole (one group, full attention): the
        # model also trains on the configuration it samples in.
        "dts-as-full": groups + (("groups.teacher_t", "sra"), ("groups.teacher_mask", True),
                                 ("groups.full_sample_prob", 0.5)),
        "dts-noalign": groups + (("align.enabled", False),),
        # REPA toward a separately trained digit classifier's 4×4 conv map (preset digits-repa).
        "repa": (("align_target", "encoder"), ("encoder_align.encoder", "digits-classifier"),
                 ("encoder_align.student_block", 2), ("encoder_align.weight", 0.5),
                 ("encoder_align.projector_dim", 256)),
    }.items()}


FAMILY_ARMS = ("vanilla", "sra", "dts-as", "dts-sf", "dts-as-full", "dts-noalign", "repa")
ARMS.update(_family_arms("fam-"))
ARMS.update(_family_arms("fam-p2-", (("model.patch_size", 2),)))


@dataclass(frozen=True)
class Regime:
    """One comparison: a vanilla arm against an SRA arm (same model, data, seeds, steps), or
    against several arms (``others`` non-empty: a multi-arm "family" regime, each arm compared
    with vanilla, paired by seed, at equal steps and at equal compute)."""

    name: str
    vanilla: str
    sra: str  # the (first) arm compared with vanilla
    description: str
    steps: int = 1500
    eval_every: int = 250
    others: tuple[str, ...] = ()  # further arms of a family regime
    control: str | None = None  # the positive control: must show a gain, else the harness is blind

    @property
    def arms(self) -> tuple[str, ...]:
        """Every arm compared with vanilla."""
        return (self.sra, *self.others)

    @property
    def is_family(self) -> bool:
        return bool(self.others)


def family_regime(name: str, prefix: str, description: str, steps: int = 1000,
                  eval_every: int = 125) -> Regime:
    """A multi-arm regime over the arms of :func:`_family_arms` with ``prefix``."""
    arms = [f"{prefix}{a}" for a in FAMILY_ARMS]
    return Regime(name, arms[0], arms[1], description, steps, eval_every, tuple(arms[2:]),
                  control=f"{prefix}repa")


REGIMES: dict[str, Regime] = {r.name: r for r in (
    Regime("headline", "vanilla", "sra",
           "digits preset as is: depth 6, width 128, patch 4 (16 tokens), s=2→t=4, cos, λ 0.5, t_max 0.2"),
    Regime("centered", "vanilla", "sra-centered",
           "as headline, loss cos-centered (each image's mean token removed before the cosine)"),
    Regime("lam2", "vanilla", "sra-lam2", "as headline, λ 2"),
    Regime("centered-lam2", "vanilla", "sra-centered-lam2", "as headline, cos-centered and λ 2"),
    Regime("s1t4", "vanilla", "sra-s1t4", "as headline, student block 1 → teacher block 4"),
    Regime("s2t5", "vanilla", "sra-s2t5", "as headline, student block 2 → teacher block 5"),
    Regime("tmax04", "vanilla", "sra-tmax04", "as headline, t_max 0.4"),
    Regime("patch2", "vanilla-p2", "sra-p2", "patch 2 (64 tokens), otherwise the preset"),
    Regime("patch2-centered", "vanilla-p2", "sra-p2-centered", "patch 2 (64 tokens), cos-centered"),
    Regime("deep", "vanilla-d12", "sra-d12",
           "the paper's B/2 recipe: depth 12, s=3 → t=8, λ 0.2 (width 128, patch 4 as the preset)"),
    Regime("ema97", "vanilla-ema97", "sra-ema97",
           "as headline, EMA decay capped at 0.97 (teacher ≈33 steps behind instead of ≈step/9)"),
    family_regime("family", "fam-", "The digits preset (16 tokens): vanilla, SRA, DTS + AS "
                  "(teacher sra + mask; teacher self_flow, no mask; half the samples whole), DTS + "
                  "AS without alignment, REPA toward the digits-classifier encoder"),
    family_regime("family-p2", "fam-p2-", "As family, patch 2 (64 tokens)"),
)}


@dataclass(frozen=True)
class StudyConfig:
    """Everything shared by all runs of a study invocation."""

    work_dir: Path = DEFAULT_WORK_DIR
    docs_dir: Path = DEFAULT_DOCS_DIR
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int | None = None  # None → each regime's own
    eval_every: int | None = None
    samples: int = 500  # class-balanced EMA samples per evaluation
    sampler_mode: str = "heun"
    sampler_steps: int = 25
    cfg_scale: float = 1.0  # 1.0 = unguided (the primary number, like the paper's "w/o guidance")
    jobs: int = 2
    threads_per_job: int = 1
    batch_size: int | None = None  # None → the preset's 128
    extra: tuple[tuple[str, Any], ...] = field(default_factory=tuple)  # overrides for every run


def run_key(arm: str, seed: int) -> str:
    """The name of a run's folder and result file."""
    return f"{arm}-s{seed}"


@dataclass(frozen=True)
class RunSpec:
    """One training run: an arm, a seed, its length and evaluation interval."""

    arm: str
    seed: int
    steps: int
    eval_every: int

    @property
    def key(self) -> str:
        return run_key(self.arm, self.seed)


def arm_config(arm: str, extra: Sequence[tuple[str, Any]] = ()):
    """The preset with the arm's (and ``extra``) overrides applied."""
    from sra.training.config import override, preset

    cfg = preset(BASE_PRESET)
    for path, value in ARMS[arm] + tuple(extra):
        cfg = override(cfg, path, value)
    return cfg


def build_config(spec: RunSpec, study: StudyConfig):
    """The run's :class:`~sra.training.config.TrainConfig`: preset + arm overrides + evaluation plumbing."""
    from sra.training.config import override

    cfg = arm_config(spec.arm, study.extra)
    loop = {
        "max_train_steps": spec.steps, "checkpoint_steps": spec.eval_every,
        "keep_last": 10**6, "milestone_steps": spec.eval_every, "report_to": "none",
        "sample_steps": 0, "grid_samples": 1, "eval_digits": False, "seed": spec.seed,
    }
    if study.batch_size is not None:
        loop["global_batch_size"] = study.batch_size
    for name, value in loop.items():
        cfg = override(cfg, f"loop.{name}", value)
    cfg = override(cfg, "fid.every", 0)  # the study scores its checkpoints itself
    cfg = override(cfg, "output_dir", str(study.work_dir / "runs"))
    return override(cfg, "exp_name", spec.key)
