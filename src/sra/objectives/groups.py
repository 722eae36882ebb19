"""Token groups at two noise levels with SRA on top: dual-time scheduling (DTS) and attention
separation (AS), the SRA authors' follow-up (docs/method.md §9). SiT (flow matching) only.

Each image's T tokens are split at random into groups of fixed sizes (a mask ratio r gives the
ratios [r, 1 − r], counted as the authors' code counts them, see ``group_sizes``). With DTS every group draws its own time t_g; the input token of a group is the patch of
α_{t_g}·x + σ_{t_g}·ε (one ε per image) and its target that patch's velocity, and every token is
conditioned on its own group's time (the model computes one modulation per group and gathers it).
With AS a token attends only to tokens of its own group. The EMA teacher's input follows one of
three strategies (``teacher_t``):

- ``self_flow``: the whole image at τ = the cleanest group's time, min_g t_g;
- ``same``: exactly the student's mixed input and per-token times;
- ``sra``: each group at its own SRA teacher time clamp(t_g − t_max·U, 0, 1), mixed per token.

``teacher_mask`` also gives the teacher the groups' attention separation. Alignment, when on, is
SRA's: the student's block-s tokens through the head against the teacher's block-t tokens.

A step reads nothing back from the device: the group sizes are host ints fixed per run, the
tables that deal tokens into groups are built once per device, and the number of full samples
is drawn on the host (Python's ``random``, seeded per process and saved in checkpoints).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from sra.errors import SraError, check_choice
from sra.models.layers import group_onehot
from sra.models.transformer import TokenGroups
from sra.objectives.denoising import FlowMatching
from sra.objectives.sra import (AlignConfig, FeatureTerm, LossOutput, add_term, align_loss,
                               align_weight, check_label_dropout, drop_labels, term_blocks)

TEACHER_TIMES = ("self_flow", "same", "sra")


@dataclass(frozen=True)
class GroupConfig:
    """Every switch of the follow-up's recipe (its flag names in comments)."""

    mask_ratios: tuple[float, ...] = ()  # --mask-ratio; () or one r ∉ (0, 1): one group (plain SRA)
    dual_time: bool = True  # --dual-time-scheduling: each group draws its own t
    attention_separation: bool = True  # --attention-separation
    full_sample_prob: float = 0.0  # --full-sample-prob: a sample stays one group with this prob.
    teacher_t: str = "sra"  # --teacher-t: self_flow | same | sra
    teacher_mask: bool = True  # --teacher-mask: the teacher gets attention separation too
    # The reference code's self_flow + teacher-mask feeds groups ≥ 1 the clean latent while still
    # embedding τ; reproduce it only on purpose.
    self_flow_clean_compat: bool = False
    # Three more switches toward the reference code (docs/method.md §9.2), defaults ours:
    full_sample_group: int = 0  # --full-sample-group: the group a full sample's tokens join (1 there)
    self_flow_tau_all_groups: bool = False  # --self-flow-tau-all-groups: τ = min over every group
    teacher_undropped_labels: bool = False  # --teacher-undropped-labels: teacher sees labels undropped

    def __post_init__(self) -> None:
        object.__setattr__(self, "mask_ratios", tuple(float(r) for r in self.mask_ratios))
        check_choice("teacher time (--teacher-t)", self.teacher_t, TEACHER_TIMES)
        if len(self.mask_ratios) > 1 and any(r <= 0 for r in self.mask_ratios):
            raise SraError(f"several mask ratios must all be > 0, got {list(self.mask_ratios)}")
        if not 0.0 <= self.full_sample_prob <= 1.0:
            raise SraError(f"full-sample-prob must be in [0, 1], got {self.full_sample_prob}")
        check_choice("full-sample group (--full-sample-group)", self.full_sample_group, (0, 1))
        if self.self_flow_clean_compat and not (self.teacher_t == "self_flow" and self.teacher_mask):
            raise SraError("the self_flow clean-latent compat option needs --teacher-t self_flow "
                           "and --teacher-mask")

    @property
    def active(self) -> bool:
        """Whether tokens are split into two or more groups at all."""
        r = self.mask_ratios
        return len(r) > 1 or (len(r) == 1 and 0.0 < r[0] < 1.0)


def group_sizes(ratios: tuple[float, ...], num_tokens: int) -> list[int]:
    """Token counts per group, as the authors' code counts them: one ratio r ∈ (0, 1) → the
    ratios [r, 1 − r]; several → normalised to sum 1; otherwise one group. Group g gets
    ⌊r_g·T⌋ tokens, then the tokens still missing go one each to the groups with the largest
    fractional parts (ties: the lower group first). So r = 0.3, T = 16 gives [5, 11]."""
    if len(ratios) == 1:
        r = ratios[0]
        if not 0.0 < r < 1.0:
            return [num_tokens]
        ratios = (r, 1.0 - r)
    if not ratios:
        return [num_tokens]
    total = sum(ratios)
    # r_g·T in float32 as there (torch float32 tensors): near-ties such as 0.95·10 become exact
    # halves, which decides where the last token goes.
    exact = [float(np.float32(r / total) * np.float32(num_tokens)) for r in ratios]
    sizes = [int(np.floor(e)) for e in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: exact[i] - sizes[i], reverse=True)
    for i in by_remainder[: num_tokens - sum(sizes)]:
        sizes[i] += 1
    return sizes


def full_count(n: int, prob: float) -> int:
    """How many of ``n`` samples stay one group, each with probability ``prob``: a host draw
    (Python's ``random``, which accelerate seeds per process and checkpoints save), so no step
    reads a device value to size the full samples' sub-batch."""
    if prob <= 0.0:
        return 0
    if prob >= 1.0:
        return n
    return sum(random.random() < prob for _ in range(n))


class GroupSampler:
    """Draws a batch's token groups for sizes fixed per run; the table that deals tokens into
    groups is built once per device, so a draw does no host↔device copy."""

    def __init__(self, sizes: list[int], full_sample_prob: float = 0.0, full_group: int = 0):
        self.sizes, self.full_sample_prob, self.full_group = tuple(sizes), full_sample_prob, full_group
        self._tables: dict[torch.device, torch.Tensor] = {}

    def table(self, device: torch.device | str) -> torch.Tensor:
        """(T,) int64: the group of the token dealt at each rank of a sample's permutation."""
        device = torch.device(device)
        if device not in self._tables:  # once per run and device
            dealt = [g for g, k in enumerate(self.sizes) for _ in range(k)]
            self._tables[device] = torch.tensor(dealt, dtype=torch.long, device=device)
        return self._tables[device]

    def __call__(self, n: int, device: torch.device | str) -> TokenGroups:
        """A fresh random permutation per sample deals its tokens into groups of ``sizes``; each
        sample stays one group (``full_group``) with probability ``full_sample_prob``."""
        dealt = self.table(device)
        T = dealt.shape[0]
        order = torch.rand(n, T, device=dealt.device).argsort(dim=1)  # (N, T): one per sample
        ids = torch.empty(n, T, dtype=torch.long, device=dealt.device)
        ids.scatter_(1, order, dealt.expand(n, T))  # (N, T)
        k = full_count(n, self.full_sample_prob)
        rows = None
        if 0 < k < n:  # a uniformly random k-subset: the first k of a random batch order
            rows = torch.rand(n, device=dealt.device).argsort()  # (N,)
            ids.index_fill_(0, rows[:k], self.full_group)
        elif k == n:
            ids.fill_(self.full_group)
        return TokenGroups(ids, self.sizes, k, rows)


def time_map(t_groups: torch.Tensor, groups: torch.Tensor, grid: int, patch: int) -> torch.Tensor:
    """Per-pixel time (N, 1, H, W) from per-group times (N, G) and token groups (N, T): every
    pixel of a patch carries its token's group time (tokens are row-major over the grid)."""
    n = groups.shape[0]
    t_tok = torch.gather(t_groups, 1, groups)  # (N, T)
    t_img = t_tok.view(n, 1, grid, grid)
    return t_img.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)  # (N, 1, H, W)


def present_min(t_groups: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(N,) the smallest time among the groups a sample actually has (a full sample has one)."""
    used = group_onehot(groups, t_groups.shape[1]).any(dim=1)  # (N, G)
    return torch.where(used, t_groups, torch.full_like(t_groups, float("inf"))).amin(dim=1)


class DualTimeObjective:
    """Flow-matching loss on token groups at their own times, plus λ·SRA alignment."""

    def __init__(self, process: FlowMatching, groups: GroupConfig, align: AlignConfig,
                 label_dropout: float, num_classes: int, grid: int, patch: int,
                 extra: FeatureTerm | None = None):
        if not isinstance(process, FlowMatching):
            raise SraError("token groups (--mask-ratio) are for SiT (flow matching) models only")
        self.process, self.groups, self.align = process, groups, align
        self.label_dropout, self.null_label = check_label_dropout(label_dropout), num_classes
        self.grid, self.patch, self.extra = grid, patch, extra
        self.sizes = group_sizes(groups.mask_ratios, grid * grid)
        self.sampler = GroupSampler(self.sizes, groups.full_sample_prob, groups.full_sample_group)

    def sample_times(self, n: int, device) -> torch.Tensor:
        """(N, G) times: one per group with DTS, else one per sample shared by its groups."""
        G = len(self.sizes)
        if self.groups.dual_time:
            return self.process.sample_t(n * G, device).view(n, G)
        return self.process.sample_t(n, device).unsqueeze(1).expand(n, G).contiguous()

    def teacher_inputs(self, x0, eps, x_t, t, groups: TokenGroups, t_max):
        """The teacher's (input, times, groups or None) for the configured strategy."""
        cfg, path = self.groups, self.process.path
        if cfg.teacher_t == "same":
            return x_t, t, groups
        if cfg.teacher_t == "sra":
            t_teacher = (t - t_max * torch.rand_like(t)).clamp(0.0, 1.0)  # (N, G)
            tmap = time_map(t_teacher, groups.ids, self.grid, self.patch)
            return path.interpolate(x0, eps, tmap), t_teacher, groups
        # self_flow: (N,) the cleanest time among the groups present (the reference: among all)
        tau = t.amin(dim=1) if cfg.self_flow_tau_all_groups else present_min(t, groups.ids)
        x_tau = path.interpolate(x0, eps, tau)
        if not cfg.teacher_mask:
            return x_tau, tau, None
        if cfg.self_flow_clean_compat:  # the reference's quirk: groups ≥ 1 see the clean latent
            later = time_map((torch.arange(t.shape[1], device=t.device) > 0).to(t.dtype)
                             .expand_as(t), groups.ids, self.grid, self.patch)
            x_tau = torch.where(later > 0, x0, x_tau)
        return x_tau, tau.unsqueeze(1).expand_as(t).contiguous(), groups

    def __call__(self, model: nn.Module, teacher: nn.Module | None, x0: torch.Tensor,
                 y: torch.Tensor, step: int = 0) -> LossOutput:
        """Losses for clean inputs ``x0`` (N, C, H, W) and labels ``y`` (N,)."""
        cfg, align, path = self.groups, self.align, self.process.path
        n = x0.shape[0]
        labels = y
        y = drop_labels(labels, self.label_dropout, self.null_label)
        y_teacher = labels if cfg.teacher_undropped_labels else y  # ours: the student's, as in SRA
        groups = self.sampler(n, x0.device)  # ids (N, T)
        t = self.sample_times(n, x0.device)  # (N, G)
        eps = torch.randn_like(x0)
        tmap = time_map(t, groups.ids, self.grid, self.patch)  # (N, 1, H, W)
        x_t = path.interpolate(x0, eps, tmap)
        target = path.velocity(x0, eps, tmap)
        weight = align_weight(align, step)
        heads = (align.student_block,) if weight > 0 else ()
        out = model(x_t, t, y, groups=groups, separate=cfg.attention_separation,
                    return_blocks=term_blocks(self.extra, step), head_blocks=heads)
        denoise = ((out.output.float() - target.float()) ** 2).mean()  # every token, its own target
        stats: dict[str, torch.Tensor] = {}
        if weight <= 0:
            total = add_term(self.extra, out.features, step, denoise, stats)
            return LossOutput(total, denoise.detach(), denoise.new_zeros(()), 0.0, stats)
        if teacher is None:
            raise SraError("alignment is on but no teacher (EMA model) was given")
        student = out.projected[align.student_block]  # (N, T, D), through the head
        with torch.no_grad():
            x_teacher, t_teacher, g_teacher = self.teacher_inputs(x0, eps, x_t, t, groups, align.t_max)
            kwargs = {} if g_teacher is None else dict(
                groups=g_teacher, separate=cfg.attention_separation and cfg.teacher_mask)
            target_tokens = teacher(x_teacher, t_teacher, y_teacher,
                                    return_blocks=(align.teacher_block,),
                                    stop_after=align.teacher_block, **kwargs
                                    ).features[align.teacher_block]  # (N, T, D)
        loss = align_loss(student, target_tokens, align)
        with torch.no_grad():
            stats["cosine"] = F.cosine_similarity(student.float(), target_tokens.float(), dim=-1).mean()
        total = add_term(self.extra, out.features, step, denoise + weight * loss, stats)
        return LossOutput(total, denoise.detach(), loss.detach(), weight, stats)
