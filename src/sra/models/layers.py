"""The transformer's building blocks: embeddings, attention, the adaLN-Zero block, the final
layer and the projector heads: SRA's, REPA's MLP and iREPA's convolution (docs/method.md §2,
§9.3, §9.4). Module names equal the release's."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from sra.errors import SraError

FREQ_EMBED_DIM = 256  # sinusoidal time-embedding size (docs/method.md §2.3)
MAX_PERIOD = 10000.0
LN_EPS = 1e-6


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x·(1 + scale) + shift; shift/scale are (N, 1, D) (one per sample) or (N, T, D)."""
    return x * (1 + scale) + shift


def per_token(mod: torch.Tensor, onehot: torch.Tensor | None) -> torch.Tensor:
    """Conditioning outputs to token resolution.

    ``mod`` is (N, K) for one conditioning per sample → (N, 1, K), broadcast over the tokens; or
    (N, G, K), one per token group, with ``onehot`` (N, T, G) the group of every token → (N, T, K).
    The modulation itself was computed once per group, never once per token; the selection is a
    batched matmul with the one-hot map (exact: one term per sum), ≈5× faster on CPU than
    ``gather`` with its scatter-add backward.
    """
    if onehot is None:
        return mod.unsqueeze(1)
    return torch.bmm(onehot.to(mod.dtype), mod)


def group_onehot(ids: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(N, T) group ids → (N, T, G) bool one-hot. A comparison, not ``F.one_hot``: that checks
    the ids' range by reading them on the host (on CPU), which a training step must not do."""
    return ids.unsqueeze(-1) == torch.arange(num_groups, device=ids.device)


def timestep_frequencies(t: torch.Tensor, dim: int = FREQ_EMBED_DIM) -> torch.Tensor:
    """Sinusoidal embedding [cos(t·f), sin(t·f)] (cos first) of the raw time value, (N,) → (N, dim)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )  # (half,)
    args = t.float()[:, None] * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb.to(t.dtype) if t.is_floating_point() else emb


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """Fixed MAE-style 2-D sin-cos table, (grid·grid, dim), row-major tokens.

    The first dim/2 features encode the column index, the last dim/2 the row index.
    """

    def embed_1d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / MAX_PERIOD ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))  # (d/2,)
        out = pos.reshape(-1).astype(np.float64)[:, None] * omega[None]  # (P, d/2)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (P, d)

    cols, rows = np.meshgrid(np.arange(grid), np.arange(grid))  # each (grid, grid), row-major
    return np.concatenate([embed_1d(dim // 2, cols), embed_1d(dim // 2, rows)], axis=1)


class PatchEmbed(nn.Module):
    """Conv with kernel = stride = patch: (N, C, H, W) → (N, T, D), tokens row-major."""

    def __init__(self, patch: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, D, h, w) → (N, T, D)


class TimestepEmbedder(nn.Module):
    """Sinusoidal frequencies of the raw time value → Linear → SiLU → Linear."""

    def __init__(self, dim: int, freq_dim: int = FREQ_EMBED_DIM):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_frequencies(t, self.freq_dim))  # (N, D)


class LabelEmbedder(nn.Module):
    """Class table with one extra row, index ``num_classes``, for the null (unconditional) label."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)  # (N, D)


Split = tuple[int, tuple[int, ...]]  # (num_full, sizes): see Attention.forward


class Attention(nn.Module):
    """Multi-head self-attention with optional qk-norm; SDPA unless ``fused`` is switched off."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=LN_EPS) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=LN_EPS) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.fused = True  # False: explicit softmax(q·kᵀ/√d)·v, the release's non-fused path

    def forward(self, x: torch.Tensor, split: Split | None = None) -> torch.Tensor:
        """``split`` = (K, sizes), attention separation on tokens already ordered by group: the
        first K samples attend over all T tokens (full samples); every other sample's tokens
        come as consecutive runs of ``sizes`` tokens, one run per group, each attending only
        to itself. Each run is a dense slice, so no mask is needed (flash-eligible, Σ k² work)."""
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, self.head_dim)
        x = self._attend(qkv) if split is None else self._separated(qkv, *split)  # (N, T, H, d)
        return self.proj(x.reshape(N, T, D))  # heads merged

    def _attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """Every query over every key of its sample: (n, t, 3, H, d) → (n, t, H, d)."""
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (n, H, t, d)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)  # (n, H, t, t)
            x = attn.softmax(dim=-1) @ v
        return x.transpose(1, 2)

    def _separated(self, qkv: torch.Tensor, num_full: int, sizes: tuple[int, ...]) -> torch.Tensor:
        """Attention within groups (see ``forward``): (N, T, 3, H, d) → (N, T, H, d). ``split``,
        not slicing: its backward is one concatenation, a slice's a zero-filled full tensor."""
        N = qkv.shape[0]
        full, rest = qkv.split([num_full, N - num_full]) if num_full else (None, qkv)
        rows = [] if full is None else [self._attend(full)]  # full samples: all T tokens
        if rest.shape[0]:  # split samples: each group's run of tokens alone
            runs = [self._attend(run) for run, size in zip(rest.split(list(sizes), dim=1), sizes)
                    if size]  # a group may be empty (r = 0.95, T = 10 gives [10, 0])
            rows.append(runs[0] if len(runs) == 1 else torch.cat(runs, dim=1))
        return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)


class Mlp(nn.Module):
    """fc1 → GELU(tanh) → fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """adaLN-Zero block: gated residual attention and MLP, modulated by the conditioning c."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, onehot: torch.Tensor | None = None,
                split: Split | None = None) -> torch.Tensor:
        # x (N, T, D); c (N, D), or (N, G, D) with the groups one-hot (N, T, G); split: see
        # Attention.forward (tokens then come ordered by group)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = per_token(
            self.adaLN_modulation(c), onehot).chunk(6, dim=-1)  # each (N, 1 or T, D)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), split)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """LayerNorm + adaLN (shift, scale) + Linear to patch²·out_channels."""

    def __init__(self, dim: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=LN_EPS)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, onehot: torch.Tensor | None = None) -> torch.Tensor:
        shift, scale = per_token(self.adaLN_modulation(c), onehot).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p²·C_out)


class ProjectorHead(nn.Module):
    """SRA head on the student's tokens: Linear(D, 2D) → SiLU → Linear(2D, D)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.act = nn.SiLU()
        self.linear2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.act(self.linear1(x)))


class RepaProjector(nn.Module):
    """REPA head toward an encoder of width E: Linear(D, P) → SiLU → Linear(P, P) → SiLU →
    Linear(P, E) (docs/method.md §9.3). Stored as ``ap_head`` like the SRA head, so sampling drops it the
    same way and ``project=True`` applies it."""

    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, hidden)
        self.linear3 = nn.Linear(hidden, out)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear3(self.act(self.linear2(self.act(self.linear1(x)))))  # (N, T, E)


class ConvProjector(nn.Module):
    """iREPA's head toward an encoder of width E: ONE 3×3 convolution (padding 1) from width D on
    the token grid, instead of REPA's MLP (docs/method.md §9.4). Stored as ``ap_head`` like the
    other heads, so sampling drops it the same way."""

    def __init__(self, dim: int, out: int, grid: int, kernel: int = 3):
        super().__init__()
        self.grid = grid
        self.conv = nn.Conv2d(dim, out, kernel_size=kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape  # (N, T, D), tokens row-major over the grid
        if t != self.grid * self.grid:
            raise SraError(f"the conv projector expects {self.grid}×{self.grid} tokens, got {t}")
        maps = x.transpose(1, 2).reshape(n, d, self.grid, self.grid)  # (N, D, g, g)
        return self.conv(maps).flatten(2).transpose(1, 2)  # (N, T, E)
