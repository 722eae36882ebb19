"""The one adaLN-Zero transformer behind both SiT and DiT.

SiT and DiT differ only by configuration (:class:`~sra.models.registry.ModelConfig`): the time
value fed to the time embedder (continuous t ∈ [0, 1] vs integer step 0..999) and the output
channels (velocity vs ε‖variance-value). Module names and shapes equal the authors' release so
its state dicts load with ``strict=True`` (docs/method.md §2.4; the key list is ``tests/data/official_state_dict_keys.json``).

Blocks are numbered from 1: "the tokens after block s" are ``features[s]``. ``forward`` can return
any blocks' tokens and stop after the last one it needs (the SRA teacher never runs the blocks
or the final layer it does not use). Nothing depends on ``train()``/``eval()``: label dropout
lives in the objective, not here.

Token groups (docs/method.md §9.2) condition every token on its group's time; with attention
separation the tokens are reordered by group once per forward, attention runs on each group's
contiguous run without a mask, and the order is restored for everything returned.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn as nn

from sra.errors import SraError
from sra.models.layers import (Block, ConvProjector, FinalLayer, LabelEmbedder, PatchEmbed,
                               ProjectorHead, RepaProjector, Split, TimestepEmbedder, group_onehot,
                               sincos_pos_embed_2d)
from sra.models.registry import ModelConfig


class TransformerOutput(NamedTuple):
    """What ``forward`` returns: the prediction, the requested blocks' raw tokens and the blocks'
    tokens through the projector head (one return type for every call, so DDP and torch.compile
    see one signature; use ``.output``, ``.features``, ``.projected``)."""

    output: torch.Tensor | None  # (N, C_out, H, W); None when stopped early
    features: dict[int, torch.Tensor]  # block number (1-indexed) → raw tokens (N, T, D)
    projected: dict[int, torch.Tensor] = {}  # block → head(tokens) (N, T, D or E); never mutated


class TokenGroups(NamedTuple):
    """A batch's token groups with what attention separation needs on the host, so that the
    forward pass never reads a tensor back. A *split* sample has ``sizes[g]`` tokens in group g
    (fixed per run); a *full* sample has all its tokens in one group."""

    ids: torch.Tensor  # (N, T) int64: the group of every token
    sizes: tuple[int, ...]  # tokens per group in a split sample (host ints)
    num_full: int = 0  # how many samples are full (host int)
    rows: torch.Tensor | None = None  # (N,) int64 batch order with the full samples first

    @staticmethod
    def from_ids(ids: torch.Tensor) -> "TokenGroups":
        """Derive sizes and full samples from ``ids`` alone, for callers outside training.
        Sync point: it reads the ids on the host."""
        host = ids.cpu()  # sync point
        full = (host == host[:, :1]).all(dim=1)  # (N,)
        counts = {tuple(torch.bincount(row, minlength=int(host.max()) + 1).tolist())
                  for row in host[~full]}
        if len(counts) > 1:
            raise SraError(f"attention separation needs the same group sizes in every sample "
                           f"that is not one group; got {sorted(counts)}")
        sizes = counts.pop() if counts else (ids.shape[1],)
        rows = torch.argsort((~full).to(torch.int8), stable=True).to(ids.device)  # full first
        return TokenGroups(ids, sizes, int(full.sum()), rows)


class _Reorder(NamedTuple):
    """Tokens ordered by group (full samples first) for attention separation, and back."""

    index: torch.Tensor  # (N·T,) flat source position of each ordered token
    inverse: torch.Tensor  # (N·T,) flat ordered position of each original token
    rows: torch.Tensor | None  # (N,) the batch order, None when unchanged
    ids: torch.Tensor  # (N, T) group ids in the new order
    split: Split  # (num_full, sizes) for Attention

    @staticmethod
    def build(groups: TokenGroups) -> "_Reorder":
        n, T = groups.ids.shape
        rows = groups.rows if 0 < groups.num_full < n else None
        if 0 < groups.num_full < n and rows is None:
            raise SraError("token groups with full samples need rows: the batch order that "
                           "puts the full samples first")
        ids = groups.ids if rows is None else groups.ids.index_select(0, rows)  # (N, T)
        tokens = ids.argsort(dim=1, stable=True)  # (N, T): each split sample's groups in runs
        base = torch.arange(n, device=ids.device) if rows is None else rows  # (N,)
        index = (base[:, None] * T + tokens).reshape(-1)  # (N·T,)
        inverse = torch.empty_like(index).scatter_(
            0, index, torch.arange(n * T, device=index.device))
        return _Reorder(index, inverse, rows, ids.gather(1, tokens), (groups.num_full, groups.sizes))

    @staticmethod
    def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """(N, T, K) tokens at the flat positions ``index`` → (N, T, K)."""
        return x.reshape(-1, x.shape[-1]).index_select(0, index).view(x.shape)


class DiffusionTransformer(nn.Module):
    """SiT / DiT backbone (one class), optionally with a projector head ``ap_head`` (SRA's, or
    REPA's MLP when ``config.head == "repa"``, or iREPA's convolution for ``"repa-conv"``)."""

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
        self.ap_head: ProjectorHead | RepaProjector | ConvProjector | None = None
        self.initialize_weights()
        if config.use_head:
            # Built after the backbone is initialised so it draws its random numbers last: the
            # same seed gives a model with and without the head the same backbone weights, which
            # pairs vanilla and SRA runs (their difference is then the loss, not the init).
            if config.head == "repa":
                self.ap_head = RepaProjector(D, config.head_dim, config.head_out_dim)
            elif config.head == "repa-conv":  # torch's default conv init, as iREPA's code keeps
                self.ap_head = ConvProjector(D, config.head_out_dim, config.grid_size)
            else:
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
        self.config.check_blocks(blocks, what)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                      groups: torch.Tensor | None = None, sizes: tuple[int, ...] = ()) -> None:
        cfg = self.config
        want = (cfg.in_channels, cfg.input_size, cfg.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise SraError(
                f"input of shape {tuple(x.shape)} does not fit the model: expected (N, {want[0]}, "
                f"{want[1]}, {want[2]}) (in_channels, input_size, input_size)"
            )
        n = x.shape[0]
        if groups is not None:
            if groups.shape != (n, cfg.num_tokens) or groups.dtype != torch.long:
                raise SraError(f"token groups must be int64 of shape ({n}, {cfg.num_tokens}) "
                               f"(batch, tokens); got {groups.dtype} {tuple(groups.shape)}")
            if t.dim() != 2 or t.shape[0] != n:
                raise SraError(f"with token groups, t must be (N, G) = one time per group; "
                               f"got {tuple(t.shape)}")
            if sizes and (sum(sizes) != cfg.num_tokens or len(sizes) > t.shape[1]):
                raise SraError(f"group sizes {list(sizes)} must sum to {cfg.num_tokens} tokens "
                               f"with at most {t.shape[1]} groups (one time each)")
        elif t.shape != (n,):
            raise SraError(f"t must have shape ({n},) like the batch; got {tuple(t.shape)}")
        if y.shape != (n,):
            raise SraError(f"y must have shape ({n},) like the batch; got {tuple(y.shape)}")

    # -- forward -------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        *,
        groups: torch.Tensor | TokenGroups | None = None,
        separate: bool = False,
        return_blocks: Sequence[int] = (),
        head_blocks: Sequence[int] = (),
        stop_after: int | None = None,
        project: bool = False,
    ) -> TransformerOutput:
        """Run the transformer.

        Args:
            x: (N, C, H, W) noisy input. t: (N,) time (SiT: float in [0, 1]; DiT: step 0..999),
                or (N, G), one time per token group, when ``groups`` is given.
            y: (N,) labels in 0..num_classes (num_classes = null label).
            groups: (N, T) int64, the group 0..G−1 of every token (dual-time scheduling): each
                token is conditioned on its group's time. No new weights: with one group this is
                exactly the plain model. A :class:`TokenGroups` carries the same ids plus the
                host-side sizes attention separation needs (training passes one; a bare tensor
                with ``separate`` costs one host read).
            separate: attention separation: a token attends only to tokens of its own group.
            return_blocks: block numbers (1-indexed) whose raw output tokens (N, T, D) to return.
            head_blocks: block numbers whose output tokens to return through the projector head
                ``ap_head`` (a block may be in both: e.g. SRA's head and Dispersive Loss's raw
                tokens of one block, from one forward).
            stop_after: run only blocks 1..stop_after and skip the final layer (output None).
            project: the older spelling of ``head_blocks=return_blocks`` with the head's tokens
                in ``features`` (kept for callers outside the package).
        Returns:
            :class:`TransformerOutput`: ``output`` the prediction (N, C_out, H, W) (None after
            ``stop_after``), ``features`` {block: raw tokens (N, T, D)} for ``return_blocks``,
            ``projected`` {block: head tokens (N, T, D), or (N, T, E) through a REPA head} for
            ``head_blocks``.
        """
        ids = groups.ids if isinstance(groups, TokenGroups) else groups
        self._check_inputs(x, t, y, ids, groups.sizes if isinstance(groups, TokenGroups) else ())
        if separate and groups is None:
            raise SraError("attention separation needs token groups")
        wanted = tuple(return_blocks)
        heads = wanted if project else tuple(head_blocks)
        if wanted or heads or stop_after is not None:
            self.check_blocks(wanted + heads + ((stop_after,) if stop_after is not None else ()))
        last = stop_after if stop_after is not None else self.config.depth
        if any(b > last for b in wanted + heads):
            raise SraError(f"blocks {wanted + heads} asked for after stop_after={stop_after}")
        if heads and self.ap_head is None:
            raise SraError("tokens through the projector head were asked for, but this model was "
                           "built without it")

        h = self.x_embedder(x) + self.pos_embed  # (N, T, D), position added in the image's order
        if ids is None:
            c = self.t_embedder(t) + self.y_embedder(y)  # (N, D)
        else:  # one conditioning per group: (N, G, D)
            n, g = t.shape
            c = self.t_embedder(t.reshape(-1)).view(n, g, -1) + self.y_embedder(y).unsqueeze(1)
        order = None
        if separate:
            tg = groups if isinstance(groups, TokenGroups) else TokenGroups.from_ids(ids)
            if tg.num_full < ids.shape[0]:  # all samples full: plain attention, nothing to move
                order = _Reorder.build(tg)
                h = _Reorder.take(h, order.index)  # one gather: tokens in runs by group
                if order.rows is not None:
                    c = c.index_select(0, order.rows)  # (N, G, D) follows its samples
                ids = order.ids
        onehot = None if ids is None else group_onehot(ids, t.shape[1])  # (N, T, G)
        split = None if order is None else order.split
        restore = (lambda z: z) if order is None else (lambda z: _Reorder.take(z, order.inverse))
        features: dict[int, torch.Tensor] = {}
        projected: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks[:last], start=1):
            h = block(h, c, onehot, split)
            if i in wanted or i in heads:
                z = restore(h)  # (N, T, D) in the image's token order
                if i in wanted and not project:
                    features[i] = z
                if i in heads:
                    projected[i] = self.ap_head(z)
        out = None
        if stop_after is None:
            out = self.unpatchify(restore(self.final_layer(h, c, onehot)))  # (N, C_out, H, W)
        return TransformerOutput(out, projected if project else features, projected)


def build_model(config: ModelConfig) -> DiffusionTransformer:
    """Construct a freshly initialised model from its config."""
    return DiffusionTransformer(config)


def count_parameters(model: nn.Module, include_head: bool = True) -> int:
    """Trainable parameter count (the projector head is not used at inference; exclude it if asked)."""
    return sum(
        p.numel() for n, p in model.named_parameters() if include_head or not n.startswith("ap_head.")
    )
