"""Self-Representation Alignment (SRA), docs/method.md §1 and §4.

The student (the model being trained) sees x at time t; its tokens after block ``s`` go through
the projector head. The teacher (EMA copy, no gradient, stops after block ``t_blk``) sees the
SAME x and ε at an earlier, less noisy time t_T; its raw tokens after block ``t_blk`` are the
target. Total = denoise + λ(step)·align. With alignment off the teacher is never run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from sra.errors import SraError, check_choice

# Alignment distances between student (N, T, D) and teacher (N, T, D) tokens, computed in fp32.
#  cos           1 − cosine similarity of each token along the feature dim, averaged (the method)
#  cos-release   1 − cosine along the TOKEN axis (per channel across tokens): what the release's
#                code computes on (N, T, D) tensors; kept only for exact compatibility
#  cos-centered  `cos` after removing each image's mean token from both sides: the shared
#                residual component no longer dominates the angle (a documented variant)
#  sml1          smooth-L1 with β = AlignConfig.smooth_l1_beta (0.05 in the release)
#  l2, l1        mean squared / absolute error
LOSS_TYPES = ("cos", "cos-release", "cos-centered", "sml1", "l2", "l1")
SCHEDULES = ("constant", "exp-decay")


@dataclass(frozen=True)
class AlignConfig:
    """Everything that defines the alignment term. ``enabled=False`` is the vanilla baseline."""

    enabled: bool = True
    student_block: int = 4  # s  ("block-out-s", 1-indexed)
    teacher_block: int = 8  # t_blk ("block-out-t", > s)
    t_max: float = 0.2  # largest teacher time gap (fraction of the time range)
    loss_type: str = "cos"
    weight: float = 0.5  # λ (the release: 0.5 for cos; 0.2·decay for sml1 at 256 px)
    schedule: str = "constant"  # constant | exp-decay (see align_weight)
    decay_start: int = 0  # exp-decay: λ is constant up to this optimizer step…
    decay_steps: int = 1  # …then is multiplied by 0.1 every decay_steps steps
    smooth_l1_beta: float = 0.05
    # HASTE's early stop: λ = 0 after this many optimizer steps (None: never). The head then
    # gets zero gradients and the teacher is not run.
    until: int | None = None

    def __post_init__(self) -> None:
        check_choice("alignment loss type", self.loss_type, LOSS_TYPES)
        check_choice("alignment weight schedule", self.schedule, SCHEDULES)
        if not 0.0 < self.t_max <= 1.0:
            raise SraError(f"t_max must be in (0, 1], got {self.t_max}")
        if self.enabled and self.student_block >= self.teacher_block:
            raise SraError(
                f"block-out-s ({self.student_block}) must be smaller than block-out-t "
                f"({self.teacher_block}): the teacher's block must come later"
            )
        if self.student_block < 1:
            raise SraError(f"block-out-s must be ≥ 1, got {self.student_block}")
        if self.weight < 0 or self.decay_steps < 1 or self.decay_start < 0:
            raise SraError("alignment weight must be ≥ 0, decay_steps ≥ 1 and decay_start ≥ 0")
        check_until(self.until)

    @property
    def active(self) -> bool:
        """Whether the teacher runs at all (vanilla or λ = 0 never run it)."""
        return self.enabled and self.weight > 0


def align_weight(cfg: AlignConfig, step: int) -> float:
    """λ at optimizer step ``step``.

    ``exp-decay``: λ·0.1^((step − decay_start)/decay_steps) after ``decay_start``. The release's
    epoch rule (k = 1 up to epoch E₀, then k = (epoch − E₀)/P + 1, λ = λ₀·0.1^(k−1)) becomes
    decay_start = E₀·steps_per_epoch and decay_steps = P·steps_per_epoch; on ImageNet-1k at
    global batch 256 one epoch is 5005 steps, so 256 px (E₀ 149, P 1000) is decay_start 745745,
    decay_steps 5005000 and 512 px (E₀ 99, P 800) is 495495 and 4004000. The release moves in
    whole epochs; this moves every step (the two differ by less than one epoch's worth).
    With ``until`` (``--align-until``) λ is 0 from optimizer step ``until + 1`` on (``step`` is
    the number of steps already taken).
    """
    if not cfg.active or stopped(cfg.until, step):
        return 0.0
    if cfg.schedule == "constant" or step <= cfg.decay_start:
        return cfg.weight
    return cfg.weight * 0.1 ** ((step - cfg.decay_start) / cfg.decay_steps)


def check_until(until: int | None) -> None:
    """``--align-until`` must be a step count ≥ 0 (or unset)."""
    if until is not None and (isinstance(until, bool) or until < 0):
        raise SraError(f"--align-until must be an optimizer step ≥ 0, got {until}")


def stopped(until: int | None, step: int) -> bool:
    """Whether an alignment term switched off after ``until`` steps is off at ``step`` (the number
    of optimizer steps already taken): steps 1..until align, step until + 1 on does not."""
    return until is not None and step >= until


def centered_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-token cosine (N, T) after removing each image's mean token from both sides."""
    s = student - student.mean(dim=1, keepdim=True)
    t = teacher - teacher.mean(dim=1, keepdim=True)
    return F.cosine_similarity(s, t, dim=-1)


def align_loss(student: torch.Tensor, teacher: torch.Tensor, cfg: AlignConfig) -> torch.Tensor:
    """Scalar distance between student (N, T, D) and teacher (N, T, D) tokens, in fp32."""
    if student.shape != teacher.shape:
        raise SraError(f"student tokens {tuple(student.shape)} and teacher tokens "
                       f"{tuple(teacher.shape)} differ in shape")
    s, t = student.float(), teacher.float()
    kind = cfg.loss_type
    if kind == "cos":
        return (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    if kind == "cos-release":
        return (1 - F.cosine_similarity(s, t, dim=1)).mean()
    if kind == "cos-centered":
        return (1 - centered_cosine(s, t)).mean()
    if kind == "sml1":
        return F.smooth_l1_loss(s, t, beta=cfg.smooth_l1_beta)
    if kind == "l2":
        return F.mse_loss(s, t)
    return F.l1_loss(s, t)


def check_label_dropout(prob: float) -> float:
    """``prob`` if it is a valid label-dropout probability (``--cfg-prob``), else a one-line error."""
    if not 0.0 <= prob < 1.0:
        raise SraError(f"label dropout (cfg-prob) must be in [0, 1), got {prob}")
    return prob


def drop_labels(y: torch.Tensor, prob: float, null_label: int) -> torch.Tensor:
    """Replace each label by the null label with probability ``prob`` (classifier-free guidance)."""
    if prob <= 0:
        return y
    drop = torch.rand(y.shape, device=y.device) < prob
    return torch.where(drop, torch.full_like(y, null_label), y)


@dataclass
class LossOutput:
    """One step's losses (scalars) and detached diagnostics."""

    total: torch.Tensor
    denoise: torch.Tensor
    align: torch.Tensor
    weight: float
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


class FeatureTerm(Protocol):
    """A further term on the raw tokens of the objective's own forward pass (Dispersive Loss,
    ``sra.objectives.dispersive.DispersiveTerm``): the blocks it needs at a step, then its
    weighted value and logged statistics from the forward's ``features``."""

    def blocks(self, step: int) -> tuple[int, ...]: ...

    def __call__(self, features: dict[int, torch.Tensor], step: int,
                 like: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


def term_blocks(term: FeatureTerm | None, step: int) -> tuple[int, ...]:
    """The raw blocks ``term`` needs from the forward at ``step``."""
    return () if term is None else term.blocks(step)


def add_term(term: FeatureTerm | None, features: dict[int, torch.Tensor], step: int,
             total: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """``total`` plus ``term``'s weighted value; its statistics go into ``stats``."""
    if term is None:
        return total
    value, more = term(features, step, total)
    stats.update(more)
    return total + value


class SRAObjective:
    """Denoising loss of ``process`` plus λ·alignment between student and EMA teacher (plus an
    optional :class:`FeatureTerm` on the student's raw tokens, e.g. Dispersive Loss)."""

    def __init__(self, process, align: AlignConfig, label_dropout: float, num_classes: int,
                 extra: FeatureTerm | None = None):
        self.process = process
        self.align = align
        self.label_dropout = check_label_dropout(label_dropout)
        self.null_label = num_classes
        self.extra = extra

    def check_model(self, model_cfg) -> None:
        """Raise a clear error if the teacher's block does not exist in the model (a ModelConfig)."""
        if self.align.active:
            model_cfg.check_blocks([self.align.teacher_block], what="block-out-t")

    def __call__(
        self, model: nn.Module, teacher: nn.Module | None, x0: torch.Tensor, y: torch.Tensor,
        step: int = 0,
    ) -> LossOutput:
        """Losses for a batch of clean inputs ``x0`` (N, C, H, W) and labels ``y`` (N,)."""
        proc, cfg = self.process, self.align
        n = x0.shape[0]
        y = drop_labels(y, self.label_dropout, self.null_label)  # teacher sees the same labels
        t = proc.sample_t(n, x0.device)
        eps = torch.randn_like(x0)
        x_t = proc.noisy(x0, eps, t)
        weight = align_weight(cfg, step)
        raw = term_blocks(self.extra, step)
        if weight <= 0:
            out = model(x_t, t, y, return_blocks=raw)
            denoise = proc.loss(out.output, x0, eps, t, x_t).mean()
            stats: dict[str, torch.Tensor] = {}
            total = add_term(self.extra, out.features, step, denoise, stats)
            return LossOutput(total, denoise.detach(), denoise.new_zeros(()), 0.0, stats)
        if teacher is None:
            raise SraError("alignment is on but no teacher (EMA model) was given")

        out = model(x_t, t, y, return_blocks=raw, head_blocks=(cfg.student_block,))
        student = out.projected[cfg.student_block]  # (N, T, D), through the head
        denoise = proc.loss(out.output, x0, eps, t, x_t).mean()

        t_teacher = proc.teacher_t(t, cfg.t_max)
        with torch.no_grad():
            x_teacher = proc.noisy(x0, eps, t_teacher)  # same x0 and ε, less noise
            target = teacher(
                x_teacher, t_teacher, y, return_blocks=(cfg.teacher_block,),
                stop_after=cfg.teacher_block,
            ).features[cfg.teacher_block]  # (N, T, D)
        align = align_loss(student, target, cfg)
        total = denoise + weight * align
        with torch.no_grad():
            s32, t32 = student.float(), target.float()
            stats = {
                "student_norm": s32.norm(dim=-1).mean(),
                "teacher_norm": t32.norm(dim=-1).mean(),
                "cosine": F.cosine_similarity(s32, t32, dim=-1).mean(),
            }
            if cfg.loss_type == "cos-centered":  # the angle this loss actually pulls on
                stats["cosine_centered"] = centered_cosine(s32, t32).mean()
        total = add_term(self.extra, out.features, step, total, stats)
        return LossOutput(total, denoise.detach(), align.detach(), weight, stats)
