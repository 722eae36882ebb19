"""The feature-PCA figure (SPEC §7): what the tokens of each block look like at each noise level.

For one image and its class the image is encoded (SD-VAE latents, or pixel space for pixel
models such as the bundled digits), noised to a few times with ONE fixed noise sample, and run
through the model once per time, stopping after the last block asked for (the final layer never
runs). For every (time, block) the tokens (T, D) get a 3-component PCA; each component is
min–max scaled to [0, 1] and the three are shown as RGB on the token grid (grid = input size /
patch — any size, resolution and patch; the release hard-codes 16×16). Rows = times, columns =
blocks.

Time convention: ``t`` is SiT flow time (t = 0 data, t = 1 noise) and SiT models see
x_t = α_t·x + σ_t·ε from the checkpoint's interpolant (:mod:`sra.diffusion.paths`). DiT models
have no flow time: ``t`` maps linearly to the DDPM step round(t·999) (0..999), the model is fed
that step and x_t = √ᾱ·x + √(1−ᾱ)·ε comes from the DDPM forward process (1000 linear betas,
:mod:`sra.diffusion.ddpm`). The two families' rows at equal ``t`` are therefore comparable in
"fraction of the schedule", not in signal-to-noise ratio.

PCA is an SVD of the centred tokens (what scikit-learn's PCA computes); the sign of each
component is fixed so that its largest-magnitude loading is positive (scikit-learn's choice
too), which keeps figures stable across runs and machines.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from sra.errors import SraError, check_choice

log = logging.getLogger("sra.viz")

DEFAULT_TIMES: tuple[float, ...] = (0.7, 0.5, 0.3, 0.1)
# The paper's / release's columns for the 28-block XL models.
XL_DEPTH = 28
XL_BLOCKS: tuple[int, ...] = (1, 4, 8, 13, 18, 23, 28)
NUM_COLUMNS = 7  # how many blocks the default spreads over the depth
NUM_COMPONENTS = 3  # RGB
# A component whose singular value is below this fraction of the first one carries no signal
# (rank-deficient tokens); it is drawn as 0 instead of min–max-amplified round-off.
RELATIVE_RANK_TOL = 1e-6
DDPM_LAST_STEP = 999  # DiT: t ∈ [0, 1] → step round(t·999)
VAE_FACTOR_FALLBACK = 8  # SD-VAE downsampling, used when no VAE is needed to know it
CELL_INCHES = 1.2  # figure: size of one map
MIN_FIGURE_WIDTH = 4.0  # inches: room for the title when there are few columns
FIGURE_DPI = 150


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


def _noisy_input(
    model, x0: torch.Tensor, eps: torch.Tensor, t: float, path_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, the time value the model is fed) for SiT flow time ``t`` (see the module doc)."""
    n = x0.shape[0]
    if model.config.family == "DiT":
        from sra.diffusion.ddpm import DDPMConfig, GaussianDiffusion

        step = torch.full((n,), round(t * DDPM_LAST_STEP), dtype=torch.long, device=x0.device)
        x_t = GaussianDiffusion(DDPMConfig()).q_sample(x0, step, noise=eps)
        return x_t, step
    from sra.diffusion.paths import get_path

    tt = torch.full((n,), t, dtype=x0.dtype, device=x0.device)
    return get_path(path_type).interpolate(x0, eps, tt), tt


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
    if cfg.family != "DiT":
        check_choice("path type", path_type, ("linear", "cosine"))
    param = next(model.parameters())
    x0 = x0.to(param.device, param.dtype)
    g = torch.Generator().manual_seed(int(seed))
    eps = torch.randn(x0.shape, generator=g).to(x0.device, x0.dtype)  # CPU draw: same on any device
    y = torch.full((1,), int(label), dtype=torch.long, device=x0.device)

    grid = cfg.grid_size
    maps = np.zeros((len(times), len(blocks), grid, grid, NUM_COMPONENTS), dtype=np.float32)
    last = max(blocks)
    for i, t in enumerate(times):
        x_t, t_in = _noisy_input(model, x0, eps, t, path_type)
        out = model(x_t, t_in, y, return_blocks=blocks, stop_after=last)
        for j, b in enumerate(blocks):
            tokens = out.features[b][0]  # (T, D), row-major over the grid
            maps[i, j] = token_pca(tokens).reshape(grid, grid, NUM_COMPONENTS)
    return maps


# -- figure ------------------------------------------------------------------------------------
def plot_pca_grid(
    maps_list: Sequence[np.ndarray],
    times: Sequence[float],
    blocks: Sequence[int] | Sequence[Sequence[int]],
    titles: Sequence[str] | None,
    out_png: str | Path,
    cell_inches: float = CELL_INCHES,
    dpi: int = FIGURE_DPI,
) -> Path:
    """Draw one grid per model (rows "t=0.7", columns "block 8"), stacked top to bottom, to a PNG.

    ``maps_list``: arrays (len(times), len(blocks), g, g, 3) (g may differ between models);
    ``blocks``: one list for all grids, or one list per grid.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    if not maps_list:
        raise SraError("nothing to plot: no PCA maps")
    per_grid = (
        [list(b) for b in blocks] if blocks and not isinstance(blocks[0], (int, np.integer))
        else [list(blocks)] * len(maps_list)
    )
    titles = list(titles) if titles else [""] * len(maps_list)
    if len(per_grid) != len(maps_list) or len(titles) != len(maps_list):
        raise SraError("plot_pca_grid: one blocks list and one title per grid are needed")
    rows = len(times)
    cols = max(len(b) for b in per_grid)
    # Margins in inches (two-line title + column labels on top, row labels on the left) so the
    # cells stay square whatever the grid.
    left, right, top, bottom = 0.45, 0.1, (0.8 if any(titles) else 0.3), 0.08
    fig_w = max(left + cols * cell_inches + right, MIN_FIGURE_WIDTH)
    grid_h = top + rows * cell_inches + bottom
    fig = Figure(figsize=(fig_w, grid_h * len(maps_list)))
    subfigs = fig.subfigures(len(maps_list), 1, squeeze=False)[:, 0]
    for maps, blks, title, sub in zip(maps_list, per_grid, titles, subfigs):
        if maps.shape[:2] != (rows, len(blks)):
            raise SraError(
                f"maps of shape {maps.shape[:2]} do not match {rows} times × {len(blks)} blocks"
            )
        axes = sub.subplots(rows, cols, squeeze=False)
        for i in range(rows):
            for j in range(cols):
                ax = axes[i, j]
                ax.set_xticks([])
                ax.set_yticks([])
                if j >= len(blks):
                    ax.set_axis_off()
                    continue
                ax.imshow(np.clip(maps[i, j], 0, 1), interpolation="nearest")
                if i == 0:
                    ax.set_title(f"block {blks[j]}", fontsize=9)
                if j == 0:
                    ax.set_ylabel(f"t={times[i]:g}", fontsize=9)
        if title:
            sub.suptitle(title, fontsize=9, y=1 - 0.06 / grid_h, va="top")
        sub.subplots_adjust(left=left / fig_w, right=1 - right / fig_w, top=1 - top / grid_h,
                            bottom=bottom / grid_h, wspace=0.06, hspace=0.06)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=dpi)
    return out_png


# -- end to end ---------------------------------------------------------------------------------
@dataclass
class PcaConfig:
    """Settings of :func:`run_pca` (the ``sra pca`` flags)."""

    ckpt: str
    compare: str | None = None  # a second checkpoint, drawn below the first
    image: str | None = None  # None: bundled photo (latent/RGB models) or a digit (1-channel)
    label: int = 0
    times: tuple[float, ...] = DEFAULT_TIMES
    blocks: tuple[int, ...] | None = None  # None: default_blocks(depth) per model
    seed: int = 0
    weights: str = "ema"  # "ema" or "model"
    vae: str = "stabilityai/sd-vae-ft-ema"  # only for latent models
    resolution: int | None = None  # pixels; None: from the checkpoint's data info / input size
    out: str = "pca.png"  # the .npz and .json go beside it with the same stem
    baseline: bool = False  # --ckpt is a plain model trained without SRA (title only)
    device: str = "auto"


@dataclass
class PcaResult:
    """What :func:`run_pca` wrote and computed."""

    png: Path
    npz: Path
    json: Path
    maps: list[np.ndarray] = field(default_factory=list)
    settings: dict = field(default_factory=dict)


def input_kind(model_config, data_info: dict | None) -> str:
    """"latents" (SD-VAE) or "pixels": from the data info, else 4 input channels → latents."""
    if data_info:
        return "latents" if data_info.get("kind") == "moments" else "pixels"
    return "latents" if model_config.in_channels == 4 else "pixels"


def _vae_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def prepare_input(
    model_config,
    data_info: dict | None,
    image: str | None,
    label: int,
    resolution: int | None,
    get_vae: Callable[[], object],
) -> tuple[torch.Tensor, dict]:
    """The clean model input x0 (1, C, H, W) for one model and a description of how it was made.

    Latent models: ADM crop at ``resolution`` → VAE posterior MEAN (no sampling noise in the
    figure) → × latent scale + bias. Pixel models: the image cropped to the input size, or, for
    one-channel models without ``image``, the first bundled digit of ``label``.
    """
    cfg = model_config
    kind = input_kind(cfg, data_info)
    if kind == "pixels":
        if resolution is not None and resolution != cfg.input_size:
            raise SraError(
                f"this pixel-space model takes {cfg.input_size}x{cfg.input_size} inputs; "
                f"--resolution {resolution} does not fit (omit it or pass {cfg.input_size})"
            )
        if image is None and cfg.in_channels == 1:
            from sra.data.digits import load_digits_arrays

            images, labels = load_digits_arrays(cfg.input_size)
            hits = np.flatnonzero(labels == label)
            if hits.size == 0:
                raise SraError(f"the bundled digits have no class {label} (0..9); pass --image")
            x0 = torch.from_numpy(images[hits[0]])[None]  # (1, 1, s, s) in [-1, 1]
            return x0, {"input": "pixels", "image": f"digits:{int(hits[0])} (first of class {label})",
                        "resolution": cfg.input_size, "vae": None}
        from sra.viz.images import load_image_tensor

        x0, source = load_image_tensor(image, cfg.input_size, cfg.in_channels)
        return x0, {"input": "pixels", "image": source, "resolution": cfg.input_size, "vae": None}

    info = data_info or {}
    scale = float(info.get("latent_scale", 0.18215))
    bias = float(info.get("latent_bias", 0.0))
    res = resolution or info.get("resolution") or cfg.input_size * VAE_FACTOR_FALLBACK
    vae = get_vae()
    factor = _vae_factor(vae)
    if res % factor or res // factor != cfg.input_size:
        raise SraError(
            f"--resolution {res} does not fit the model: its {cfg.input_size}x{cfg.input_size} "
            f"latents need {cfg.input_size * factor}px images (VAE downsamples by {factor})"
        )
    if vae.config.latent_channels != cfg.in_channels:
        raise SraError(
            f"the VAE makes {vae.config.latent_channels}-channel latents but the model takes "
            f"{cfg.in_channels} channels"
        )
    from sra.viz.images import load_image_tensor

    pixels, source = load_image_tensor(image, res, 3)  # (1, 3, res, res) in [-1, 1]
    param = next(vae.parameters())
    with torch.no_grad():
        mean = vae.encode(pixels.to(param.device, param.dtype)).latent_dist.mean
    x0 = mean.float() * scale + bias  # (1, C, res/f, res/f)
    return x0, {"input": "latents", "image": source, "resolution": res,
                "latent_scale": scale, "latent_bias": bias}


def _short_name(path: str) -> str:
    p = Path(path).resolve()
    if p.name.startswith("step-") and p.parent.name == "checkpoints":
        return f"{p.parent.parent.name}/{p.name}"
    return p.name


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise SraError(f"unknown device {device!r}; allowed: auto, cpu, cuda, cuda:N, mps") from None


def run_pca(cfg: PcaConfig) -> PcaResult:
    """Load the model(s), compute the PCA maps and write ``out`` (PNG), ``.npz`` and ``.json``.

    The ``.npz`` holds ``maps`` (times, blocks, g, g, 3), ``times``, ``blocks`` and, with a
    comparison model, ``maps_compare`` / ``blocks_compare``; the ``.json`` the resolved settings.
    """
    from sra.checkpoints import load_model

    start = time.perf_counter()
    if Path(cfg.out).suffix.lower() != ".png":
        raise SraError(f"--out must be a .png path (the .npz/.json go beside it), got {cfg.out}")
    check_choice("weights", cfg.weights, ("ema", "model"))
    times = check_times(cfg.times)
    device = _resolve_device(cfg.device)
    vae_cache: dict[str, object] = {}

    def get_vae():
        if "vae" not in vae_cache:
            from sra.data.vae import load_vae

            log.info("loading VAE %s", cfg.vae)
            vae_cache["vae"] = load_vae(cfg.vae, device=device)
        return vae_cache["vae"]

    paths = [cfg.ckpt] + ([cfg.compare] if cfg.compare else [])
    maps_list, blocks_list, titles, models_settings = [], [], [], []
    for k, ckpt in enumerate(paths):
        model, info = load_model(ckpt, weights=cfg.weights, device=device)
        mcfg = info["model_config"]
        blocks = list(cfg.blocks) if cfg.blocks else default_blocks(mcfg.depth)
        model.check_blocks(blocks, what="--blocks entry")
        if not 0 <= cfg.label < mcfg.num_classes:
            raise SraError(f"--label {cfg.label} is outside 0..{mcfg.num_classes - 1} "
                           f"(the classes of {ckpt})")
        x0, made = prepare_input(mcfg, info.get("data_info"), cfg.image, cfg.label,
                                 cfg.resolution, get_vae)
        if made["input"] == "latents":
            made["vae"] = cfg.vae
        path_type = info.get("path_type") or "linear"
        maps = feature_pca_maps(model, x0, cfg.label, times, blocks, path_type, cfg.seed)
        title = _short_name(ckpt) + (" (baseline, no SRA)" if k == 0 and cfg.baseline else "")
        title += (f"\n{mcfg.family}, depth {mcfg.depth}, patch {mcfg.patch_size}, "
                  f"{mcfg.grid_size}×{mcfg.grid_size} tokens, label {cfg.label}")
        maps_list.append(maps)
        blocks_list.append(blocks)
        titles.append(title)
        models_settings.append({
            "ckpt": str(ckpt), "source": info.get("source"), "family": mcfg.family,
            "depth": mcfg.depth, "hidden_size": mcfg.hidden_size, "patch_size": mcfg.patch_size,
            "input_size": mcfg.input_size, "in_channels": mcfg.in_channels, "grid": mcfg.grid_size,
            "path_type": path_type if mcfg.family == "SiT" else "ddpm-linear-1000",
            "time_fed": "flow t" if mcfg.family == "SiT" else "step round(t*999)",
            "blocks": blocks, "title": title, **made,
        })
        del model

    png = plot_pca_grid(maps_list, times, blocks_list, titles, cfg.out)
    npz = png.with_suffix(".npz")
    arrays = {"maps": maps_list[0], "times": np.asarray(times, dtype=np.float32),
              "blocks": np.asarray(blocks_list[0], dtype=np.int64)}
    if len(maps_list) > 1:
        arrays["maps_compare"] = maps_list[1]
        arrays["blocks_compare"] = np.asarray(blocks_list[1], dtype=np.int64)
    np.savez_compressed(npz, **arrays)
    settings = {
        **{k: v for k, v in asdict(cfg).items() if k not in ("times", "blocks")},
        "times": times, "blocks": cfg.blocks and list(cfg.blocks), "device": str(device),
        "models": models_settings, "png": str(png), "npz": str(npz),
        "seconds": round(time.perf_counter() - start, 3),
    }
    json_path = png.with_suffix(".json")
    json_path.write_text(json.dumps(settings, indent=2))
    return PcaResult(png=png, npz=npz, json=json_path, maps=maps_list, settings=settings)
