"""Distributed, resumable, world-size-invariant sampling to PNGs and the ADM ``.npz``.

Why sample ``i`` is the same for any number of processes:

- The index range [0, N) is cut into fixed batches [k·B, (k+1)·B) (B = per-process batch size)
  and batch k runs on process k mod world_size. What a batch holds never depends on the number
  of processes, so the network sees the same inputs in the same batch everywhere.
- Sample i's initial noise is drawn from its own CPU generator seeded by (seed, i); its label is
  a fixed function of (seed, i, N, num_classes, label mode) (see :func:`make_labels`).
- The solver's per-step noise (SDE, DDPM, DDIM with eta > 0) comes from one generator on the
  sampling device seeded by (seed, k) — the solver then draws the same stream for the same batch.

We chose fixed batches over a per-sample noise callback because the solvers keep their one
``generator`` argument untouched and because GPU kernels can give batch-size dependent
floating-point results anyway: fixed batches make results bitwise reproducible. The price: SDE
and DDPM samples depend on B, so keep B when resuming or comparing runs (the resume check
enforces it). ODE samples depend on B only through floating-point effects.

Layout of the output directory::

    sampling_config.json        resolved config; written at the start (complete: false), final at the end
    samples/000000.png …        format png | both (RGB, one per sample, named by global index)
    shards/batch-000000.npz     format npz | both: one per finished batch; removed once assembled
    samples.npz                 format npz | both: arr_0 uint8 (N, H, W, 3) (ADM suite), labels (N,)
    grid.png                    the first samples as one image

Resuming: rerun the same command. A batch whose files all exist is skipped; the main process
re-assembles ``samples.npz`` from shards (or PNGs) when something changed. A different config in
the same directory is refused.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from sra.data.base import DataInfo
from sra.models import TransformerOutput
from sra.errors import SraError, check_choice
from sra.sampling.config import DDPM_MODES, FLOW_MODES, PRESETS, SamplerConfig
from sra.sampling.decode import DATA_KINDS, ROUNDINGS, ImageDecoder
from sra.sampling.solvers import generate

FORMAT = "sra-samples-v1"
LABEL_MODES = ("balanced", "random")
FORMATS = ("png", "npz")
MIXED_PRECISIONS = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}
CONFIG_NAME = "sampling_config.json"
NPZ_NAME = "samples.npz"
GRID_NAME = "grid.png"
PNG_DIR = "samples"
SHARD_DIR = "shards"
PNG_COMPRESS_LEVEL = 4  # lossless either way; lower is faster to write
# Seed streams: independent generators for initial noise, solver noise, labels.
_STREAM_NOISE, _STREAM_SOLVER, _STREAM_LABELS = 0, 1, 2
# Family defaults when neither a preset nor a mode is given.
FAMILY_DEFAULTS = {"SiT": SamplerConfig(mode="sde", steps=250), "DiT": SamplerConfig(mode="ddpm", steps=250)}


@dataclass(frozen=True)
class SampleJobConfig:
    """One sampling job. The sampler is ``sampler`` if given, else ``preset`` (or the family's
    default: SiT sde / DiT ddpm, 250 steps) with ``sampler_overrides`` applied; ``path_type``
    comes from the checkpoint unless overridden."""

    ckpt: str | None = None  # run dir, checkpoint dir, release .pt, or bare state dict
    num_samples: int = 50_000
    batch_size: int = 32  # per process; fixes the batches (and the SDE/DDPM noise streams)
    seed: int = 0
    labels: str = "balanced"  # balanced: every class N/K times; random: uniform draws
    class_label: int | None = None  # all samples of this class
    output_dir: str = "samples"
    formats: tuple[str, ...] = ("npz",)  # any of png, npz
    rounding: str = "round"  # round | truncate (the release truncates)
    vae: str | None = None  # diffusers AutoencoderKL hub id or folder; None → sd-vae-ft-ema
    vae_batch_size: int | None = None  # decode in chunks of this many latents (None: whole batch)
    weights: str = "ema"  # ema | model
    mixed_precision: str = "no"  # no | fp16 | bf16 (autocast around the network)
    preset: str | None = None
    sampler_overrides: dict[str, Any] = field(default_factory=dict)
    sampler: SamplerConfig | None = None
    data_kind: str | None = None  # override / supply the checkpoint's data info
    latent_scale: float | None = None
    latent_bias: float | None = None
    grid_size: int = 64  # samples in grid.png (0: none)
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", tuple(self.formats))
        if not self.formats or any(f not in FORMATS for f in self.formats):
            raise SraError(f"unknown output formats {self.formats!r}; allowed: png, npz (or both)")
        check_choice("label mode", self.labels, LABEL_MODES)
        check_choice("rounding", self.rounding, ROUNDINGS)
        check_choice("weights", self.weights, ("ema", "model"))
        check_choice("mixed precision", self.mixed_precision, MIXED_PRECISIONS)
        if self.data_kind is not None:
            check_choice("data kind", self.data_kind, DATA_KINDS)
        if self.preset is not None:
            check_choice("sampler preset", self.preset, PRESETS)
        if self.sampler is not None and (self.preset or self.sampler_overrides):
            raise SraError("give either a SamplerConfig or a preset/overrides, not both")
        known = {f.name for f in fields(SamplerConfig)}
        bad = sorted(set(self.sampler_overrides) - known)
        if bad:
            raise SraError(f"unknown sampler settings {bad}; allowed: {', '.join(sorted(known))}")
        for name in ("num_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise SraError(f"{name.replace('_', ' ')} must be ≥ 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise SraError(f"seed must be ≥ 0, got {self.seed}")
        if self.grid_size < 0:
            raise SraError(f"grid size must be ≥ 0, got {self.grid_size}")
        if self.latent_scale is not None and self.latent_scale <= 0:
            raise SraError(f"latent scale must be > 0, got {self.latent_scale}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sampler"] = self.sampler.to_dict() if self.sampler else None
        d["formats"] = list(self.formats)
        return d


# -- determinism ---------------------------------------------------------------------------------
def derive_seed(seed: int, stream: int, index: int = 0) -> int:
    """A well-mixed 63-bit seed for (seed, stream, index); the same on every machine."""
    state = np.random.SeedSequence([seed, stream, index]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


def sample_noise(seed: int, indices: Iterable[int], shape: tuple[int, ...]) -> torch.Tensor:
    """Initial noise (n, *shape) float32 on CPU; row j depends only on (seed, indices[j])."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(derive_seed(seed, _STREAM_NOISE, i)))
            for i in indices]
    return torch.stack(rows)


def make_labels(seed: int, num_samples: int, num_classes: int, mode: str = "balanced",
                class_label: int | None = None) -> torch.Tensor:
    """Labels (N,) int64 for samples 0..N-1: one class; "balanced" (class i mod K over a seeded
    permutation of the indices, so every class appears ⌊N/K⌋ or ⌈N/K⌉ times, in shuffled
    order); or "random" (uniform draws from a seeded generator)."""
    check_choice("label mode", mode, LABEL_MODES)
    if class_label is not None:
        if not 0 <= class_label < num_classes:
            raise SraError(f"class label {class_label} is outside 0..{num_classes - 1}")
        return torch.full((num_samples,), class_label, dtype=torch.long)
    g = torch.Generator().manual_seed(derive_seed(seed, _STREAM_LABELS))
    if mode == "balanced":
        return torch.randperm(num_samples, generator=g) % num_classes
    return torch.randint(0, num_classes, (num_samples,), generator=g)


def batch_ranges(num_samples: int, batch_size: int) -> list[tuple[int, int]]:
    """The fixed batches [k·B, min((k+1)·B, N)) of the global index range."""
    return [(s, min(s + batch_size, num_samples)) for s in range(0, num_samples, batch_size)]


# -- the ADM npz ---------------------------------------------------------------------------------
def write_adm_npz(path: str | os.PathLike, chunks: Iterable[np.ndarray], num: int,
                  image_shape: tuple[int, int, int], labels: np.ndarray | None = None) -> Path:
    """Stream uint8 image chunks (n, H, W, 3) into ``path`` as an uncompressed ``.npz`` with
    ``arr_0`` (num, H, W, 3) (+ ``labels``) without holding all images in memory; the file is
    renamed into place only when complete. ``np.load(path)["arr_0"]`` reads it back."""
    import zipfile

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (num, *image_shape)}
    written = 0
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            for chunk in chunks:
                if chunk.dtype != np.uint8 or tuple(chunk.shape[1:]) != tuple(image_shape):
                    raise SraError(f"image chunk {chunk.dtype} {chunk.shape} does not fit "
                                   f"uint8 (n, {', '.join(map(str, image_shape))})")
                f.write(np.ascontiguousarray(chunk).tobytes())
                written += chunk.shape[0]
        if written != num:
            raise SraError(f"npz assembly got {written} images, expected {num}")
        if labels is not None:
            with zf.open("labels.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(labels, dtype=np.int64))
    os.replace(tmp, path)
    return path


# -- resolution of settings ----------------------------------------------------------------------
def resolve_sampler(job: SampleJobConfig, family: str, ckpt_path_type: str | None) -> SamplerConfig:
    """The sampler the job runs for a model of ``family`` (SraError if the mode does not fit)."""
    if job.sampler is not None:
        cfg = job.sampler
    else:
        base = PRESETS[job.preset] if job.preset else FAMILY_DEFAULTS[family]
        over = dict(job.sampler_overrides)
        if "path_type" not in over and ckpt_path_type:
            over["path_type"] = ckpt_path_type
        cfg = replace(base, **over)
    allowed = FLOW_MODES if family == "SiT" else DDPM_MODES
    if cfg.mode not in allowed:
        raise SraError(f"sampling mode {cfg.mode!r} does not fit a {family} model; "
                       f"allowed: {', '.join(allowed)}")
    return cfg


def resolve_data_info(ckpt_info: dict | None, model_cfg, kind: str | None = None,
                      latent_scale: float | None = None, latent_bias: float | None = None) -> DataInfo:
    """The checkpoint's data info with overrides; what a bare state dict lacks must be given."""
    if ckpt_info is None and kind is None:
        raise SraError("the checkpoint carries no data info (a bare state dict?); pass "
                       "--data-kind pixels|moments (and --latent-scale for VAE latents)")
    known = {f.name for f in fields(DataInfo)}
    d = {k: v for k, v in (ckpt_info or {}).items() if k in known}
    d.setdefault("channels", model_cfg.in_channels)
    d.setdefault("size", model_cfg.input_size)
    d.setdefault("num_classes", model_cfg.num_classes)
    for key, value in (("kind", kind), ("latent_scale", latent_scale), ("latent_bias", latent_bias)):
        if value is not None:
            d[key] = value
    info = DataInfo(**d)
    check_choice("data kind", info.kind, DATA_KINDS)
    if info.channels != model_cfg.in_channels:
        raise SraError(f"data info says {info.channels} channels but the model takes {model_cfg.in_channels}")
    if info.kind == "pixels" and info.channels not in (1, 3):
        raise SraError(f"data kind 'pixels' needs a 1- or 3-channel model, this one has "
                       f"{info.channels} channels; use --data-kind moments with a VAE")
    return info


class _Autocast(nn.Module):
    """Runs the network under ``torch.autocast`` and hands float32 back to the solver."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner = model
        self.config = model.config
        self.device_type = device.type
        self.dtype = dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> TransformerOutput:
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.inner(x, t, y)
        return out._replace(output=out.output.float())


# -- files ---------------------------------------------------------------------------------------
def _png_path(out: Path, i: int) -> Path:
    return out / PNG_DIR / f"{i:06d}.png"


def _shard_path(out: Path, k: int) -> Path:
    return out / SHARD_DIR / f"batch-{k:06d}.npz"


def _pngs_exist(out: Path, start: int, stop: int) -> bool:
    return all(_png_path(out, i).is_file() for i in range(start, stop))


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(image).save(tmp, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    os.replace(tmp, path)


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _write_shard(path: Path, images: np.ndarray, labels: np.ndarray, start: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, images=images, labels=labels, start=np.int64(start))
    os.replace(tmp, path)


def _normalize(obj: Any) -> Any:
    """JSON round trip: tuples → lists, so stored and fresh configs compare equal."""
    return json.loads(json.dumps(obj))


def _read_config(out: Path) -> dict | None:
    p = out / CONFIG_NAME
    if not p.is_file():
        return None
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise SraError(f"cannot read {p} ({exc}); remove it or use another output dir") from None


def _write_config(out: Path, doc: dict) -> None:
    tmp = out / (CONFIG_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
    os.replace(tmp, out / CONFIG_NAME)


def _check_output_dir(out: Path, identity: dict) -> dict | None:
    """The previous run's config if it matches; refuse foreign or different-config content."""
    prev = _read_config(out)
    if prev is None:
        if out.is_dir() and any(out.iterdir()):
            raise SraError(f"output dir {out} is not empty and holds no {CONFIG_NAME}; "
                           "use a new or empty --output-dir")
        return None
    old = prev.get("identity", {})
    if prev.get("format") != FORMAT or old != identity:
        diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        raise SraError(f"output dir {out} holds samples of a different config (differs in: "
                       f"{', '.join(diff) or 'format'}); use another --output-dir or the same settings")
    return prev


def _vae_id(name: str) -> str:
    """A local VAE folder by absolute path (so resuming from another cwd matches), else the hub id."""
    return os.path.abspath(name) if os.path.isdir(name) else name


# -- the job -------------------------------------------------------------------------------------
def _state_of(state):
    if state is None:
        from accelerate import PartialState

        state = PartialState()
    return state


def run_sampling(job: SampleJobConfig, state=None, *, model: nn.Module | None = None,
                 info: dict | None = None) -> Path:
    """Run ``job`` on this process's share of the batches; the main process then assembles
    ``samples.npz`` and writes ``sampling_config.json``.

    ``state``: an ``accelerate`` ``PartialState`` or ``Accelerator`` (None → ``PartialState()``).
    ``model``/``info``: an already loaded model and its ``load_model`` info (else ``job.ckpt`` is
    loaded). Returns the path of ``samples.npz`` (of the ``samples/`` folder for png-only jobs);
    it is complete on the main process when this returns there.
    """
    from sra.checkpoints import load_model

    state = _state_of(state)
    rank, world, device = state.process_index, state.num_processes, torch.device(state.device)
    is_main = state.is_main_process
    t_start = time.time()

    # -- everything that can fail on user input, identically on every process ------------------
    if model is None:
        if not job.ckpt:
            raise SraError("no checkpoint given (--ckpt)")
        model, info = load_model(job.ckpt, weights=job.weights, device=device)
    else:
        model = model.to(device).eval()
        info = dict(info or {})
    mcfg = model.config
    sampler = resolve_sampler(job, mcfg.family, info.get("path_type"))
    data_info = resolve_data_info(info.get("data_info"), mcfg, job.data_kind, job.latent_scale,
                                  job.latent_bias)
    labels = make_labels(job.seed, job.num_samples, mcfg.num_classes, job.labels, job.class_label)
    decoder = ImageDecoder(data_info, vae=job.vae, device=device, rounding=job.rounding,
                           vae_batch_size=job.vae_batch_size).load()
    amp = MIXED_PRECISIONS[job.mixed_precision]
    net = _Autocast(model, device, amp) if amp is not None else model

    out = Path(job.output_dir)
    source = info.get("path") or job.ckpt
    identity = _normalize({
        "checkpoint": os.path.abspath(source) if source else "<in-memory model>",
        "weights": job.weights,
        "model_config": asdict(mcfg), "data_info": data_info.to_dict(), "sampler": sampler.to_dict(),
        "num_samples": job.num_samples, "batch_size": job.batch_size, "seed": job.seed,
        "labels": job.labels, "class_label": job.class_label, "rounding": job.rounding,
        "mixed_precision": job.mixed_precision,
        "vae": _vae_id(decoder.vae_name) if data_info.kind == "moments" else None,
    })
    prev = _check_output_dir(out, identity)
    npz_complete = bool(prev and prev.get("complete") and (out / NPZ_NAME).is_file())
    want_png, want_npz = "png" in job.formats, "npz" in job.formats
    state.wait_for_everyone()  # every process has checked the directory before it changes

    doc = {
        "format": FORMAT, "complete": False, "identity": identity, "job": job.to_dict(),
        "sampler": sampler.to_dict(), "num_samples": job.num_samples,
        "checkpoint": {k: info.get(k) for k in ("path", "source", "steps", "epoch") if k in info},
        "rounding": {"mode": job.rounding, "rule": "uint8 of clamp(255·(x+1)/2, 0, 255), "
                     + ("rounded to nearest" if job.rounding == "round" else "truncated (as the release)")},
        "seeding": "noise of sample i from its own generator seeded by (seed, i); solver noise of "
                   "batch k = [k·B, (k+1)·B) from a generator seeded by (seed, k); batch k runs on "
                   "process k mod world size",
    }
    if is_main:
        for sub in ([PNG_DIR] if want_png else []) + ([SHARD_DIR] if want_npz else []):
            (out / sub).mkdir(parents=True, exist_ok=True)
        if prev is None:
            _write_config(out, doc)
    state.wait_for_everyone()

    # -- this process's batches -----------------------------------------------------------------
    batches = batch_ranges(job.num_samples, job.batch_size)

    def done(k: int) -> bool:
        start, stop = batches[k]
        png_ok = _pngs_exist(out, start, stop) if want_png else True
        npz_ok = (not want_npz) or npz_complete or _shard_path(out, k).is_file() or (
            want_png and png_ok)  # with both formats the PNGs can rebuild the npz
        return png_ok and npz_ok

    mine = [k for k in range(rank, len(batches), world) if not done(k)]
    shape = (mcfg.in_channels, mcfg.input_size, mcfg.input_size)
    bar = tqdm(mine, desc="sampling", unit="batch", disable=not (is_main and job.progress))
    for k in bar:
        start, stop = batches[k]
        noise = sample_noise(job.seed, range(start, stop), shape).to(device)  # (n, C, H, W)
        y = labels[start:stop].to(device)
        gen = torch.Generator(device=device).manual_seed(derive_seed(job.seed, _STREAM_SOLVER, k))
        x = generate(net, noise, y, sampler, generator=gen)
        images = decoder(x)  # (n, H, W, 3) uint8
        if want_png:
            for j, image in enumerate(images):
                _write_png(_png_path(out, start + j), image)
        if want_npz:
            _write_shard(_shard_path(out, k), images, labels[start:stop].numpy(), start)
    state.wait_for_everyone()
    if not is_main:
        return out / NPZ_NAME if want_npz else out / PNG_DIR

    # -- main process: assemble and record ------------------------------------------------------
    grid: list[np.ndarray] = []

    def batch_images() -> Iterator[np.ndarray]:
        for k, (start, stop) in enumerate(tqdm(batches, desc="assembling", unit="batch",
                                               disable=not job.progress)):
            shard = _shard_path(out, k)
            if shard.is_file():
                with np.load(shard) as z:
                    images = z["images"]
            else:
                images = np.stack([_read_png(_png_path(out, i)) for i in range(start, stop)])
            if len(grid) < job.grid_size:
                grid.extend(images[: job.grid_size - len(grid)])
            yield images

    npz_path = out / NPZ_NAME
    image_shape = prev.get("image_shape") if prev else None
    if want_npz:
        shards = sorted((out / SHARD_DIR).glob("batch-*.npz"))
        if shards or not npz_complete:
            chunks = batch_images()
            first = next(chunks)  # fixes the image shape of arr_0's header
            image_shape = list(first.shape[1:])
            write_adm_npz(npz_path, itertools.chain([first], chunks), job.num_samples,
                          tuple(image_shape), labels.numpy())
            for p in shards:
                p.unlink()
            if job.grid_size:
                from sra.viz.grid import save_grid

                save_grid(np.stack(grid), out / GRID_NAME)
        for p in (out / SHARD_DIR).glob("*.tmp"):
            p.unlink()
        if not any((out / SHARD_DIR).iterdir()):
            (out / SHARD_DIR).rmdir()
    elif job.grid_size and (mine or not (out / GRID_NAME).is_file() or image_shape is None):
        from sra.viz.grid import save_grid

        n = min(job.grid_size, job.num_samples)
        imgs = np.stack([_read_png(_png_path(out, i)) for i in range(n)])
        image_shape = list(imgs.shape[1:])
        save_grid(imgs, out / GRID_NAME)
    if image_shape is None and want_png:
        image_shape = list(_read_png(_png_path(out, 0)).shape)
    if want_png:
        for p in (out / PNG_DIR).glob("*.tmp"):
            p.unlink()
    counts = torch.bincount(labels, minlength=mcfg.num_classes)
    complete = want_npz or bool(prev and prev.get("complete") and npz_path.is_file())
    doc.update(
        complete=complete, image_shape=image_shape,
        files={"npz": NPZ_NAME if complete else None, "png_dir": PNG_DIR if want_png else None,
               "grid": GRID_NAME if job.grid_size else None},
        label_counts={"min": int(counts.min()), "max": int(counts.max())},
        last_run={"world_size": world, "seconds": round(time.time() - t_start, 3),
                  "batches_sampled_on_main": len(mine)},
    )
    _write_config(out, doc)
    return npz_path if want_npz else out / PNG_DIR
