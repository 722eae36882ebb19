"""Feature-PCA maps (docs/method.md §10): a 3-component PCA of each block's tokens at each noise level.

For one clean input x0 and its class, x0 is noised to a few times with ONE fixed noise sample
and run through the model once per time, stopping after the last block asked for (the final
layer never runs). For every (time, block) the tokens (T, D) get a 3-component PCA; each
component is min–max scaled to [0, 1], and the three are the RGB of a token-grid map
(grid = input size / patch — any size, resolution and patch; the release hard-codes 16×16).
The figure is :mod:`sra.viz.pca_figure`, the inputs :mod:`sra.viz.pca_inputs`, ``sra pca``'s
end-to-end run :mod:`sra.viz.pca_run`.

Time convention: ``t`` is SiT flow time (t = 0 data, t = 1 noise), and the noising is the
family's own (:func:`sra.objectives.make_process`): SiT models see x_t = α_t·x + σ_t·ε from
the checkpoint's interpolant. DiT models have no flow time: ``t`` maps linearly to the DDPM step
round(t·999) (0..999), the model is fed that step and x_t = √ᾱ·x + √(1−ᾱ)·ε (1000 linear
betas). The two families' rows at equal ``t`` are therefore comparable in "fraction of the
schedule", not in signal-to-noise ratio.

PCA is an SVD of the centred tokens (what scikit-learn's PCA computes); the sign of each
component is fixed so that its largest-magnitude loading is positive (scikit-learn's choice
too), which keeps figures stable across runs and machines.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from sra.errors import SraError, check_choice
from sra.objectives import FlowConfig, make_process

DEFAULT_TIMES: tuple[float, ...] = (0.7, 0.5, 0.3, 0.1)
# The paper's / release's columns for the 28-block XL models.
XL_DEPTH = 28
XL_BLOCKS: tuple[int, ...] = (1, 4, 8, 13, 18, 23, 28)
NUM_COLUMNS = 7  # how many blocks the default spreads over the depth
NUM_COMPONENTS = 3  # RGB
# A component whose singular value is below this fraction of the first one carries no signal
# (rank-deficient tokens); it is drawn as 0 instead of min–max-amplified round-off.
RELATIVE_RANK_TOL = 1e-6


# -- choices -----------------------------------------------------------------------------------
def default_blocks(depth: int) -> list[int]:
    """Blocks to show, spread over the depth: the paper's [1, 4, 8, 13, 18, 23, 28] for depth 28;
    otherwise up to 7 blocks evenly spaced from 1 to ``depth`` (both always included)."""
    if depth < 1:
        raise SraError(f"depth must be ≥ 1, got {depth}")
    if depth == XL_DEPTH:
        return list(XL_BLOCKS)
    n = min(NUM_COLUMNS, depth)
    if n == 1:
        return [1]
    # round half up (not to even) so the spacing is symmetric and reproducible
    picks = [int(math.floor(1 + k * (depth - 1) / (n - 1) + 0.5)) for k in range(n)]
    return sorted(set(picks))


def check_times(times: Sequence[float]) -> list[float]:
    """Times as floats in [0, 1] (SraError naming the range otherwise)."""
    out = [float(t) for t in times]
    if not out:
        raise SraError("no times given; pass e.g. --times 0.7,0.5,0.3,0.1 (values in 0..1)")
    bad = [t for t in out if not (0.0 <= t <= 1.0) or math.isnan(t)]
    if bad:
        raise SraError(f"time {bad[0]!r} is outside 0..1 (t = 0 data, t = 1 noise)")
    return out


# -- PCA ---------------------------------------------------------------------------------------
def token_pca(tokens: torch.Tensor, n_components: int = NUM_COMPONENTS) -> np.ndarray:
    """PCA scores of tokens (T, D) → (T, n_components), each column min–max scaled to [0, 1].

    Deterministic sign (largest-|loading| entry positive); components without signal
    (rank-deficient tokens) are all zeros.
    """
    x = tokens.detach().to("cpu", torch.float64)  # (T, D)
    if x.dim() != 2:
        raise SraError(f"tokens must be (T, D), got shape {tuple(x.shape)}")
    x = x - x.mean(dim=0, keepdim=True)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)  # u (T, K), s (K,), vh (K, D)
    k = min(n_components, s.numel())
    out = np.zeros((x.shape[0], n_components), dtype=np.float32)
    if k == 0 or float(s[0]) == 0.0:
        return out
    comps = vh[:k]  # (k, D)
    lead = comps.abs().argmax(dim=1)  # (k,)
    signs = torch.sign(comps[torch.arange(k), lead])
    signs[signs == 0] = 1.0
    scores = u[:, :k] * (s[:k] * signs)  # (T, k)
    for i in range(k):
        if float(s[i]) <= RELATIVE_RANK_TOL * float(s[0]):
            continue
        col = scores[:, i]
        lo, hi = col.min(), col.max()
        out[:, i] = ((col - lo) / (hi - lo)).numpy()
    return out


# -- maps --------------------------------------------------------------------------------------
def model_time(process, t: float, n: int, like: torch.Tensor) -> torch.Tensor:
    """The time (n,) a model of ``process``'s family is fed for flow time ``t``, on ``like``'s
    device: SiT the float ``t`` itself (``like``'s dtype), DiT the integer step
    round(t·(T − 1)) = round(t·999)."""
    if process.family == "DiT":
        return torch.full((n,), round(t * (process.num_steps - 1)), dtype=torch.long,
                          device=like.device)
    return torch.full((n,), t, dtype=like.dtype, device=like.device)


@torch.no_grad()
def feature_pca_maps(
    model,
    x0: torch.Tensor,
    label: int,
    times: Sequence[float] = DEFAULT_TIMES,
    blocks: Sequence[int] | None = None,
    path_type: str = "linear",
    seed: int = 0,
) -> np.ndarray:
    """PCA maps of the model's tokens, float32 (len(times), len(blocks), g, g, 3) in [0, 1].

    Args:
        model: a :class:`~sra.models.DiffusionTransformer` (eval mode).
        x0: (1, C, H, W) clean model input (scaled latents or pixels), on any device.
        label: class index fed with every time.
        times: flow times in [0, 1] (rows); DiT uses step round(t·999).
        blocks: 1-indexed blocks (columns); default :func:`default_blocks` of the depth.
        path_type: SiT interpolant ("linear" / "cosine"); ignored for DiT.
        seed: seed of the one noise sample ε shared by all times.
    """
    cfg = model.config
    blocks = list(blocks) if blocks is not None else default_blocks(cfg.depth)
    if not blocks:
        raise SraError(f"no blocks given; allowed: 1..{cfg.depth}")
    model.check_blocks(blocks)
    times = check_times(times)
    if x0.dim() != 4 or x0.shape[0] != 1:
        raise SraError(f"x0 must be one image (1, C, H, W), got shape {tuple(x0.shape)}")
    if not 0 <= int(label) < cfg.num_classes:
        raise SraError(f"label {label} is outside 0..{cfg.num_classes - 1} (the model's classes)")
    flow = None
    if cfg.family != "DiT":
        check_choice("path type", path_type, ("linear", "cosine"))
        flow = FlowConfig(path_type=path_type)
    process = make_process(cfg.family, flow)  # the family's noising, as in training
    param = next(model.parameters())
    x0 = x0.to(param.device, param.dtype)
    g = torch.Generator().manual_seed(int(seed))
    eps = torch.randn(x0.shape, generator=g).to(x0.device, x0.dtype)  # CPU draw: same on any device
    y = torch.full((1,), int(label), dtype=torch.long, device=x0.device)

    grid = cfg.grid_size
    maps = np.zeros((len(times), len(blocks), grid, grid, NUM_COMPONENTS), dtype=np.float32)
    last = max(blocks)
    for i, t in enumerate(times):
        t_in = model_time(process, t, x0.shape[0], x0)
        x_t = process.noisy(x0, eps, t_in)
        out = model(x_t, t_in, y, return_blocks=blocks, stop_after=last)
        for j, b in enumerate(blocks):
            tokens = out.features[b][0]  # (T, D), row-major over the grid
            maps[i, j] = token_pca(tokens).reshape(grid, grid, NUM_COMPONENTS)
    return maps
