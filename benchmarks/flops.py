"""Analytic FLOP counts of the transformer (forward, SRA training step) and model FLOPs
utilisation, for the throughput benchmarks.

FLOPs are counted from the architecture (multiply-accumulates, ×2 for FLOPs), see
:func:`forward_macs`. SiT-XL/2 at 256 px (32×32×4 latents) gives 118.6 GMAC per image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only a type: this module needs no import of the package
    from sra.models.registry import ModelConfig

H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM bf16 dense tensor-core peak (no sparsity)
SIT_XL2_256_GMAC = 118.6  # the DiT/SiT papers' forward cost of XL/2 at 256 px, per image


def block_macs(cfg: ModelConfig) -> int:
    """Multiply-accumulates of one adaLN-Zero block for one image.

    Per token: qkv 3D², attention projection D², MLP 2·(mlp_ratio·D²) (8D² at ratio 4), plus
    the attention itself, 2·T·D (q·kᵀ and attn·v over T keys); per image: adaLN Linear(D, 6D).
    Element-wise work (norms, softmax, GELU, modulation) is not counted, as is usual.
    """
    D, T = cfg.hidden_size, cfg.num_tokens
    mlp_hidden = int(D * cfg.mlp_ratio)
    per_token = 3 * D * D + D * D + 2 * D * mlp_hidden + 2 * T * D
    return T * per_token + D * 6 * D


def forward_macs(
    cfg: ModelConfig, *, blocks: int | None = None, final_layer: bool = True,
    head_tokens_blocks: int = 0,
) -> int:
    """MACs of one image's forward through the embedders, ``blocks`` blocks (all by default),
    optionally the final layer, and the SRA head on ``head_tokens_blocks`` blocks' tokens."""
    D, T, p = cfg.hidden_size, cfg.num_tokens, cfg.patch_size
    n_blocks = cfg.depth if blocks is None else blocks
    macs = T * (p * p * cfg.in_channels) * D  # patch-embedding conv
    macs += 256 * D + D * D  # time embedder MLP (frequency dim 256)
    macs += n_blocks * block_macs(cfg)
    if final_layer:
        macs += D * 2 * D + T * D * (p * p * cfg.out_channels)
    if head_tokens_blocks:
        hd = cfg.head_dim
        macs += head_tokens_blocks * T * (D * hd + hd * D)
    return macs


def train_step_flops(cfg: ModelConfig, teacher_blocks: int | None, *, full_teacher: bool = False,
                     use_head: bool = True) -> dict:
    """FLOPs per image of one SRA training step: 3 × the student's forward (forward + backward
    ≈ 2 × forward) plus the teacher's no-grad forward (blocks 1..t, no final layer; or the full
    network with ``full_teacher``). With ``teacher_blocks=None`` there is no teacher."""
    student = 2 * forward_macs(cfg, head_tokens_blocks=1 if use_head else 0)
    if teacher_blocks is None:
        teacher = 0
    elif full_teacher:
        teacher = 2 * forward_macs(cfg)
    else:
        teacher = 2 * forward_macs(cfg, blocks=teacher_blocks, final_layer=False)
    return {"student_fwd": student, "teacher_fwd": teacher, "step": 3 * student + teacher}


def mfu(flops_per_step: float, step_seconds: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the card's peak (None without a peak)."""
    if not peak_tflops or step_seconds <= 0:
        return None
    return flops_per_step / step_seconds / (peak_tflops * 1e12)
