"""The one adaLN-Zero transformer behind both SiT and DiT.

SiT and DiT differ only by configuration (:class:`~sra.models.registry.ModelConfig`): the time
value fed to the time embedder (continuous t ∈ [0, 1] vs integer step 0..999) and the output
channels (velocity vs ε‖variance-value). Module names and shapes equal the authors' release so
its state dicts load with ``strict=True`` (SPEC §2, ``spec/official_state_dict_keys.json``).

Blocks are numbered from 1: "the tokens after block s" are ``features[s]``. ``forward`` can return
any blocks' tokens and stop after the last one it needs (the SRA teacher never runs the blocks
or the final layer it does not use). Nothing depends on ``train()``/``eval()``: label dropout
lives in the objective, not here.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from sra.errors import SraError
from sra.models.registry import ModelConfig

FREQ_EMBED_DIM = 256  # sinusoidal time-embedding size (SPEC §2b)
MAX_PERIOD = 10000.0
LN_EPS = 1e-6


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x·(1 + scale) + shift, with per-sample (N, D) shift/scale broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, H, T, d)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)  # (N, H, T, T)
            x = attn.softmax(dim=-1) @ v
        x = x.transpose(1, 2).reshape(N, T, D)  # merge heads
        return self.proj(x)


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

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x (N, T, D), c (N, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c).chunk(6, dim=-1)
        )  # each (N, D)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """LayerNorm + adaLN (shift, scale) + Linear to patch²·out_channels."""

    def __init__(self, dim: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=LN_EPS)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
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


class TransformerOutput(NamedTuple):
    """What ``forward`` returns: the prediction and the requested blocks' tokens (one return
    type for every call, so DDP and torch.compile see one signature; unpack or use ``.output``)."""

    output: torch.Tensor | None  # (N, C_out, H, W); None when stopped early
    features: dict[int, torch.Tensor]  # block number (1-indexed) → tokens (N, T, D)


class DiffusionTransformer(nn.Module):
    """SiT / DiT backbone (one class), optionally with the SRA projector head ``ap_head``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(config.num_classes, D)
        pos = torch.from_numpy(sincos_pos_embed_2d(D, config.grid_size)).float()[None]  # (1, T, D)
        # A persistent buffer: saved under the release's key "pos_embed" but never trained.
        self.register_buffer("pos_embed", pos, persistent=True)
        self.blocks = nn.ModuleList(
            Block(D, config.num_heads, config.mlp_ratio, config.qk_norm) for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(D, config.patch_size, config.out_channels)
        self.ap_head: ProjectorHead | None = None
        self.initialize_weights()
        if config.use_head:
            # Built after the backbone is initialised so it draws its random numbers last: the
            # same seed gives a model with and without the head the same backbone weights, which
            # pairs vanilla and SRA runs (their difference is then the loss, not the init).
            self.ap_head = ProjectorHead(D, config.head_dim)
            self._init_linears(self.ap_head)

    # -- initialisation ------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        """Xavier for linears, zero biases; N(0, 0.02) embeddings; zero adaLN and output (adaLN-Zero)."""
        self._init_linears(self)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # treat the conv as a Linear
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @staticmethod
    def _init_linears(module: nn.Module) -> None:
        for m in module.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    # -- helpers -------------------------------------------------------------------------------
    def set_fused_attention(self, fused: bool) -> None:
        """Switch every block between SDPA (default) and the explicit softmax attention."""
        for block in self.blocks:
            block.attn.fused = fused

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p²·C) → (N, C, H, W); the patch row goes with h, the patch column with w."""
        c, p, g = self.config.out_channels, self.config.patch_size, self.config.grid_size
        x = x.reshape(x.shape[0], g, g, p, p, c)  # (N, h, w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, g * p, g * p)

    def check_blocks(self, blocks: Sequence[int], what: str = "block") -> None:
        """Raise a clear error unless every block number is in 1..depth."""
        depth = self.config.depth
        for b in blocks:
            if not isinstance(b, int) or not 1 <= b <= depth:
                raise SraError(f"{what} {b!r} is outside 1..{depth} (the model's depth)")

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        cfg = self.config
        want = (cfg.in_channels, cfg.input_size, cfg.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise SraError(
                f"input of shape {tuple(x.shape)} does not fit the model: expected (N, {want[0]}, "
                f"{want[1]}, {want[2]}) (in_channels, input_size, input_size)"
            )
        n = x.shape[0]
        if t.shape != (n,) or y.shape != (n,):
            raise SraError(
                f"t and y must have shape ({n},) like the batch; got {tuple(t.shape)} and {tuple(y.shape)}"
            )

    # -- forward -------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        *,
        return_blocks: Sequence[int] = (),
        stop_after: int | None = None,
        project: bool = False,
    ) -> TransformerOutput:
        """Run the transformer.

        Args:
            x: (N, C, H, W) noisy input. t: (N,) time (SiT: float in [0, 1]; DiT: step 0..999).
            y: (N,) labels in 0..num_classes (num_classes = null label).
            return_blocks: block numbers (1-indexed) whose output tokens (N, T, D) to return.
            stop_after: run only blocks 1..stop_after and skip the final layer (output None).
            project: pass the returned tokens through the SRA head ``ap_head``.
        Returns:
            :class:`TransformerOutput`: ``output`` the prediction (N, C_out, H, W) (None after
            ``stop_after``), ``features`` {block: tokens (N, T, D)} for ``return_blocks``.
        """
        self._check_inputs(x, t, y)
        wanted = tuple(return_blocks)
        if wanted or stop_after is not None:
            self.check_blocks(wanted + ((stop_after,) if stop_after is not None else ()))
        last = stop_after if stop_after is not None else self.config.depth
        if any(b > last for b in wanted):
            raise SraError(f"return_blocks {wanted} ask for blocks after stop_after={stop_after}")
        if project and self.ap_head is None:
            raise SraError("project=True needs the SRA head, but this model was built without it")

        h = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (N, D)
        features: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks[:last], start=1):
            h = block(h, c)
            if i in wanted:
                features[i] = self.ap_head(h) if project else h
        out = None
        if stop_after is None:
            out = self.unpatchify(self.final_layer(h, c))  # (N, C_out, H, W)
        return TransformerOutput(out, features)


def build_model(config: ModelConfig) -> DiffusionTransformer:
    """Construct a freshly initialised model from its config."""
    return DiffusionTransformer(config)


def count_parameters(model: nn.Module, include_head: bool = True) -> int:
    """Trainable parameter count (the SRA head is not used at inference; exclude it if asked)."""
    return sum(
        p.numel() for n, p in model.named_parameters() if include_head or not n.startswith("ap_head.")
    )
