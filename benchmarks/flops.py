"""Analytic FLOP counts of the transformer (forward, SRA training step, with or without token
groups) and model FLOPs utilisation, for the throughput benchmarks and ``gpu_check.py``.

FLOPs are counted from the architecture (multiply-accumulates, ×2 for FLOPs), see
:func:`forward_macs`. SiT-XL/2 at 256 px (32×32×4 latents) gives 118.6 GMAC per image.
Token groups (dual-time scheduling, attention separation) change two terms: attention over
Σ k_g² query–key pairs instead of T² (``attention_pairs``), and the adaLN modulation computed
once per group and handed to every token (``groups``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only a type: this module needs no import of the package
    from sra.models.registry import ModelConfig

H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM bf16 dense tensor-core peak (no sparsity)
# SXM cards whose bf16 dense peak is known here (the H200 is the H100's chip with more memory);
# PCIe and NVL parts run lower clocks and power, so they get no default (pass --peak-tflops).
BF16_DENSE_TFLOPS = {"H100": H100_BF16_DENSE_TFLOPS, "H200": H100_BF16_DENSE_TFLOPS}
_OTHER_FORMS = ("PCIe", "NVL")
SIT_XL2_256_GMAC = 118.6  # the DiT/SiT papers' forward cost of XL/2 at 256 px, per image


def peak_tflops(device_name: str) -> float | None:
    """The bf16 dense peak of a card named ``device_name`` (e.g. "NVIDIA H200"), or None."""
    if any(form in device_name for form in _OTHER_FORMS):
        return None
    for key, peak in BF16_DENSE_TFLOPS.items():
        if key in device_name:
            return peak
    return None


def group_attention_pairs(sizes: list[int] | tuple[int, ...]) -> int:
    """Query–key pairs per image and head when tokens attend within groups of ``sizes``
    (Σ k²)."""
    return sum(k * k for k in sizes)


def block_macs(cfg: ModelConfig, *, attention_pairs: int | None = None, groups: int = 1) -> int:
    """Multiply-accumulates of one adaLN-Zero block for one image.

    Per token: qkv 3D², attention projection D², MLP 2·(mlp_ratio·D²) (8D² at ratio 4); the
    attention itself, 2·D per query–key pair (q·kᵀ and attn·v): T² pairs, or
    ``attention_pairs`` (Σ k_g², attention separation). Per image: adaLN Linear(D, 6D) once per
    group; with ``groups`` > 1 each token also gets its group's modulation (a (T, G)·(G, 6D)
    product). Element-wise work (norms, softmax, GELU, modulation) is not counted, as is usual.
    """
    D, T = cfg.hidden_size, cfg.num_tokens
    pairs = T * T if attention_pairs is None else attention_pairs
    mlp_hidden = int(D * cfg.mlp_ratio)
    per_token = 3 * D * D + D * D + 2 * D * mlp_hidden
    handout = T * groups * 6 * D if groups > 1 else 0
    return T * per_token + 2 * D * pairs + groups * D * 6 * D + handout


def forward_macs(
    cfg: ModelConfig, *, blocks: int | None = None, final_layer: bool = True,
    head_tokens_blocks: int = 0, attention_pairs: int | None = None, groups: int = 1,
) -> int:
    """MACs of one image's forward through the embedders, ``blocks`` blocks (all by default),
    optionally the final layer, and the SRA head on ``head_tokens_blocks`` blocks' tokens;
    ``attention_pairs`` and ``groups`` as in :func:`block_macs`."""
    D, T, p = cfg.hidden_size, cfg.num_tokens, cfg.patch_size
    n_blocks = cfg.depth if blocks is None else blocks
    macs = T * (p * p * cfg.in_channels) * D  # patch-embedding conv
    macs += groups * (256 * D + D * D)  # time embedder MLP (frequency dim 256), once per group
    macs += n_blocks * block_macs(cfg, attention_pairs=attention_pairs, groups=groups)
    if final_layer:
        macs += groups * D * 2 * D + T * D * (p * p * cfg.out_channels)
        macs += T * groups * 2 * D if groups > 1 else 0
    if head_tokens_blocks:
        hd = cfg.head_dim
        macs += head_tokens_blocks * T * (D * hd + hd * D)
    return macs


def train_step_flops(cfg: ModelConfig, teacher_blocks: int | None, *, full_teacher: bool = False,
                     use_head: bool = True, group_sizes: list[int] | None = None,
                     teacher_separated: bool = True) -> dict:
    """FLOPs per image of one SRA training step: 3 × the student's forward (forward + backward
    ≈ 2 × forward) plus the teacher's no-grad forward (blocks 1..t, no final layer; or the full
    network with ``full_teacher``). With ``teacher_blocks=None`` there is no teacher.

    ``group_sizes``: token groups with attention separation (the dual-time objective); the
    teacher attends within groups too when ``teacher_separated`` (``--teacher-mask``)."""
    grouped: dict = {}
    if group_sizes is not None and len(group_sizes) > 1:
        grouped = dict(attention_pairs=group_attention_pairs(group_sizes), groups=len(group_sizes))
    teacher_kw = grouped if teacher_separated else {"groups": grouped.get("groups", 1)}
    student = 2 * forward_macs(cfg, head_tokens_blocks=1 if use_head else 0, **grouped)
    if teacher_blocks is None:
        teacher = 0
    elif full_teacher:
        teacher = 2 * forward_macs(cfg, **teacher_kw)
    else:
        teacher = 2 * forward_macs(cfg, blocks=teacher_blocks, final_layer=False, **teacher_kw)
    return {"student_fwd": student, "teacher_fwd": teacher, "step": 3 * student + teacher}


def mfu(flops_per_step: float, step_seconds: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the card's peak (None without a peak)."""
    if not peak_tflops or step_seconds <= 0:
        return None
    return flops_per_step / step_seconds / (peak_tflops * 1e12)
