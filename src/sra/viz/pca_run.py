"""``sra pca`` end to end: load the model(s), make each input, compute the PCA maps, and write
the figure (PNG), the raw maps (``.npz``) and the resolved settings (``.json``)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sra.atomic import atomic_path, atomic_write_text
from sra.data.vae import DEFAULT_VAE
from sra.devices import resolve_device
from sra.errors import SraError, check_choice
from sra.viz.pca import DEFAULT_TIMES, check_times, default_blocks, feature_pca_maps
from sra.viz.pca_figure import plot_pca_grid
from sra.viz.pca_inputs import prepare_input

log = logging.getLogger("sra.viz")


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
    vae: str = DEFAULT_VAE  # only for latent models
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


def _short_name(path: str) -> str:
    p = Path(path).resolve()
    if p.name.startswith("step-") and p.parent.name == "checkpoints":
        return f"{p.parent.parent.name}/{p.name}"
    return p.name


def _title(ckpt: str, mcfg, label: int, baseline: bool) -> str:
    """Two lines above a model's grid: which checkpoint, and its geometry."""
    title = _short_name(ckpt) + (" (baseline, no SRA)" if baseline else "")
    return title + (f"\n{mcfg.family}, depth {mcfg.depth}, patch {mcfg.patch_size}, "
                    f"{mcfg.grid_size}×{mcfg.grid_size} tokens, label {label}")


def _write_arrays(npz: Path, maps_list: list[np.ndarray], times: list[float],
                  blocks_list: list[list[int]]) -> None:
    arrays = {"maps": maps_list[0], "times": np.asarray(times, dtype=np.float32),
              "blocks": np.asarray(blocks_list[0], dtype=np.int64)}
    if len(maps_list) > 1:
        arrays["maps_compare"] = maps_list[1]
        arrays["blocks_compare"] = np.asarray(blocks_list[1], dtype=np.int64)
    with atomic_path(npz) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


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
    device = resolve_device(cfg.device)
    vae_cache: dict[str, object] = {}

    def get_vae():  # loaded once, and only when a latent model needs it
        if "vae" not in vae_cache:
            from sra.data.vae import load_vae  # diffusers: slow to import

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
        title = _title(ckpt, mcfg, cfg.label, k == 0 and cfg.baseline)
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
    _write_arrays(npz, maps_list, times, blocks_list)
    settings = {
        **{k: v for k, v in asdict(cfg).items() if k not in ("times", "blocks")},
        "times": times, "blocks": cfg.blocks and list(cfg.blocks), "device": str(device),
        "models": models_settings, "png": str(png), "npz": str(npz),
        "seconds": round(time.perf_counter() - start, 3),
    }
    json_path = png.with_suffix(".json")
    atomic_write_text(json_path, json.dumps(settings, indent=2))
    return PcaResult(png=png, npz=npz, json=json_path, maps=maps_list, settings=settings)
