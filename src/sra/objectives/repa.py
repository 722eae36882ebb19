"""REPA, the external-encoder baseline (docs/method.md §9.3), and iREPA's two changes to it
(§9.4): align the student's tokens with a frozen encoder's.

The student's tokens after block ``s`` go through the model's REPA projector (``ap_head``:
Linear(D, P)–SiLU–Linear(P, P)–SiLU–Linear(P, E), or with ``projector="conv"`` iREPA's one 3×3
convolution on the token grid) and are pulled toward a frozen encoder's patch tokens of the CLEAN
image, resized to the model's token grid (and with ``target_norm="zscore"`` normalised over the
token axis, :func:`spatial_zscore`):

    align = −mean over (n, token) of cos(h[n, τ, :], z[n, τ, :])   (per token, along features)
    total = denoise + λ·align

No EMA teacher runs (the ``teacher`` argument is accepted for a common signature and never
touched). The encoder is handed in by the trainer: objectives never import ``sra.encoders``; any
module with ``tokens(images) -> (N, T_enc, E)`` and ``width`` will do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from sra.errors import SraError, check_choice
from sra.objectives.sra import (FeatureTerm, LossOutput, add_term, check_label_dropout, check_until,
                               drop_labels, stopped, term_blocks)

ALIGN_TARGETS = ("ema", "encoder")  # --align-target: SRA's EMA teacher or REPA's encoder
PROJECTORS = ("mlp", "conv")  # --projector: REPA's MLP | iREPA's 3×3 convolution
TARGET_NORMS = ("none", "zscore")  # --target-norm: the encoder tokens as they are | iREPA's
ZSCORE_EPS = 1e-6  # added to the per-channel std (iREPA's constant)


@dataclass(frozen=True)
class EncoderAlignConfig:
    """REPA's alignment term. Used when ``TrainConfig.align_target == "encoder"``."""

    enabled: bool = True
    encoder: str = "dinov2-vit-b14"  # a name from the encoder registry (``sra.encoders``)
    encoder_weights: str | None = None  # local weights file (offline); None → the library's hub
    encoder_resolution: int | None = None  # encoder input size; None → the encoder's own
    student_block: int = 8  # s ("block-out-s", 1-indexed); REPA uses 8 for XL
    weight: float = 0.5  # λ
    projector_dim: int = 2048  # P, the projector's hidden width (the MLP's only)
    until: int | None = None  # --align-until: λ = 0 after this many optimizer steps
    projector: str = "mlp"  # mlp (REPA) | conv (iREPA: one 3×3 conv, padding 1, D → E)
    target_norm: str = "none"  # none (REPA) | zscore (iREPA: spatial_zscore of the targets)
    zscore_alpha: float = 0.6  # α of spatial_zscore (iREPA's ldm/train.py default)

    def __post_init__(self) -> None:
        check_choice("projector (--projector)", self.projector, PROJECTORS)
        check_choice("target normalisation (--target-norm)", self.target_norm, TARGET_NORMS)
        if self.student_block < 1:
            raise SraError(f"block-out-s must be ≥ 1, got {self.student_block}")
        if self.weight < 0:
            raise SraError(f"alignment weight must be ≥ 0, got {self.weight}")
        if self.projector_dim < 1:
            raise SraError(f"projector dim must be ≥ 1, got {self.projector_dim}")
        if self.encoder_resolution is not None and self.encoder_resolution < 1:
            raise SraError(f"encoder resolution must be ≥ 1, got {self.encoder_resolution}")
        check_until(self.until)

    @property
    def active(self) -> bool:
        """Whether the encoder (and the projector) are used at all."""
        return self.enabled and self.weight > 0


class TokenEncoder(Protocol):
    """What the objective needs of an encoder (``sra.encoders.Encoder`` is one)."""

    width: int

    def tokens(self, images: torch.Tensor) -> torch.Tensor: ...


def resize_tokens(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """Encoder tokens (N, g·g, E) on a square grid → (N, grid·grid, E), row-major both sides.

    A smaller target grid is average-pooled (exact windows when g is a multiple of ``grid``,
    adaptive windows otherwise); a larger one is interpolated bilinearly; an equal one is
    returned as is.
    """
    n, t, e = tokens.shape
    g = math.isqrt(t)
    if g * g != t:
        raise SraError(f"encoder tokens ({t}) do not form a square grid")
    if g == grid:
        return tokens
    maps = tokens.transpose(1, 2).reshape(n, e, g, g)  # (N, E, g, g)
    if grid < g:
        maps = F.avg_pool2d(maps, g // grid) if g % grid == 0 else F.adaptive_avg_pool2d(maps, grid)
    else:
        maps = F.interpolate(maps, size=(grid, grid), mode="bilinear", align_corners=False)
    return maps.flatten(2).transpose(1, 2)  # (N, grid², E)


def spatial_zscore(f: torch.Tensor, alpha: float) -> torch.Tensor:
    """iREPA's normalisation of encoder tokens f (N, T, E) over the token axis, per channel:
    (f − α·mean_T f) / (std_T f + 1e-6), std with Bessel's correction (torch's default). In fp32."""
    f = f.float()
    return (f - alpha * f.mean(dim=1, keepdim=True)) / (f.std(dim=1, keepdim=True) + ZSCORE_EPS)


def image_floats(images: torch.Tensor) -> torch.Tensor:
    """uint8 images in 0..255 → float in [-1, 1]; float images (already [-1, 1]) pass through."""
    return images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images.float()


def negative_cosine(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """−mean over (n, token) of the per-token cosine along features, in fp32; (N, T, E) each."""
    if student.shape != target.shape:
        raise SraError(f"projected tokens {tuple(student.shape)} and encoder tokens "
                       f"{tuple(target.shape)} differ in shape")
    return -F.cosine_similarity(student.float(), target.float(), dim=-1).mean()


class EncoderAlignObjective:
    """Denoising loss of ``process`` plus λ·(−cosine) to a frozen encoder's clean-image tokens."""

    needs_images = True  # the loop passes the clean images as ``images=``

    def __init__(self, process, cfg: EncoderAlignConfig, label_dropout: float, num_classes: int,
                 encoder: nn.Module, grid: int, extra: FeatureTerm | None = None):
        self.process = process
        self.cfg = cfg
        self.extra = extra  # e.g. Dispersive Loss on the student's raw tokens
        self.label_dropout = check_label_dropout(label_dropout)
        self.null_label = num_classes
        self.encoder = encoder.eval().requires_grad_(False)
        self.grid = grid
        self._device: torch.device | None = None  # where the encoder's weights are now

    def check_model(self, model_cfg) -> None:
        """Raise a clear error if block s does not exist in the model (a ModelConfig)."""
        model_cfg.check_blocks([self.cfg.student_block], what="block-out-s")

    @torch.no_grad()
    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder's tokens of the clean images, on the model's grid (z-scored there with
        ``target_norm="zscore"``): (N, T, E)."""
        if self._device != images.device:  # host-side comparison only: no sync
            self.encoder.to(images.device)
            self._device = images.device
        z = resize_tokens(self.encoder.tokens(image_floats(images)), self.grid)
        return spatial_zscore(z, self.cfg.zscore_alpha) if self.cfg.target_norm == "zscore" else z

    def __call__(self, model: nn.Module, teacher: nn.Module | None, x0: torch.Tensor,
                 y: torch.Tensor, step: int = 0, *, images: torch.Tensor | None = None) -> LossOutput:
        """Losses for clean inputs ``x0`` (N, C, H, W), labels ``y`` (N,) and the clean images
        ``images`` (N, C', H', W'), uint8 or float in [-1, 1]. ``teacher`` is never run."""
        if images is None:
            raise SraError("the encoder alignment needs the clean images of the batch")
        proc, s = self.process, self.cfg.student_block
        n = x0.shape[0]
        y = drop_labels(y, self.label_dropout, self.null_label)
        t = proc.sample_t(n, x0.device)
        eps = torch.randn_like(x0)
        x_t = proc.noisy(x0, eps, t)
        weight = self.cfg.weight if self.cfg.active and not stopped(self.cfg.until, step) else 0.0
        raw = term_blocks(self.extra, step)
        if weight <= 0:
            out = model(x_t, t, y, return_blocks=raw)
            denoise = proc.loss(out.output, x0, eps, t, x_t).mean()
            stats: dict[str, torch.Tensor] = {}
            total = add_term(self.extra, out.features, step, denoise, stats)
            return LossOutput(total, denoise.detach(), denoise.new_zeros(()), 0.0, stats)

        out = model(x_t, t, y, return_blocks=raw, head_blocks=(s,))
        student = out.projected[s]  # (N, T, E), through the REPA projector
        denoise = proc.loss(out.output, x0, eps, t, x_t).mean()
        target = self.targets(images)  # (N, T, E), no grad
        align = negative_cosine(student, target)
        total = denoise + weight * align
        with torch.no_grad():
            s32, z32 = student.detach().float(), target.float()
            stats = {
                "student_norm": s32.norm(dim=-1).mean(),
                "target_norm": z32.norm(dim=-1).mean(),
                "cosine": -align.detach(),
            }
        total = add_term(self.extra, out.features, step, total, stats)
        return LossOutput(total, denoise.detach(), align.detach(), weight, stats)
