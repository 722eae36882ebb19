"""Runs a sampling job: distributed, resumable, world-size-invariant sampling to PNGs and the ADM ``.npz``.

Why sample ``i`` is the same for any number of processes: the index range [0, N) is cut into
fixed batches [k·B, (k+1)·B) (B = per-process batch size) and batch k runs on process
k mod world_size, sampled by :func:`sra.sampling.fixed.sample_batch` (noise from (seed, i),
solver noise from (seed, k), labels from :func:`sra.sampling.seeding.make_labels`). What a batch
holds never depends on the number of processes, so the network sees the same inputs in the same
batch everywhere.

We chose fixed batches over a per-sample noise callback because the solvers keep their one
``generator`` argument untouched and because GPU kernels can give batch-size dependent
floating-point results anyway: fixed batches make results bitwise reproducible. The price: SDE
and DDPM samples depend on B, so keep B when resuming or comparing runs (the resume check
enforces it). ODE samples depend on B only through floating-point effects.

Resuming: rerun the same command. A batch whose files all exist is skipped; the main process
re-assembles ``samples.npz`` from shards (or PNGs) when something changed. A different config in
the same directory is refused. The files are described in :mod:`sra.sampling.outputs`.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from sra.devices import set_tf32
from sra.errors import SraError
from sra.runlock import hold
from sra.sampling import outputs as O
from sra.sampling.decode import ImageDecoder
from sra.sampling.fixed import sample_batch
from sra.sampling.job import MIXED_PRECISIONS, SampleJobConfig, resolve_data_info, resolve_sampler
from sra.sampling.seeding import batch_ranges, make_labels

# Writes uint8 images (n, H, W, 3) as one grid image at the path (e.g. sra.viz.grid.save_grid).
GridWriter = Callable[[np.ndarray, Path], object]


def _state_of(state):
    if state is None:
        from accelerate import PartialState

        state = PartialState()
    return state


def run_sampling(job: SampleJobConfig, state=None, *, model: nn.Module | None = None,
                 info: dict | None = None, write_grid: GridWriter | None = None) -> Path:
    """Run ``job`` on this process's share of the batches; the main process then assembles
    ``samples.npz`` and writes ``sampling_config.json``.

    ``state``: an ``accelerate`` ``PartialState`` or ``Accelerator`` (None → ``PartialState()``).
    ``model``/``info``: an already loaded model and its ``load_model`` info (else ``job.ckpt`` is
    loaded). ``write_grid``: writes ``grid.png`` from the first ``job.grid_size`` samples (None:
    no grid). Returns the path of ``samples.npz`` (of the ``samples/`` folder for png-only jobs);
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
    sampler = resolve_sampler(job, mcfg.family, info.get("path_type"), info.get("sampler"))
    data_info = resolve_data_info(info.get("data_info"), mcfg, job.data_kind, job.latent_scale,
                                  job.latent_bias)
    labels = make_labels(job.seed, job.num_samples, mcfg.num_classes, job.labels, job.class_label)
    decoder = ImageDecoder(data_info, vae=job.vae, device=device, rounding=job.rounding,
                           vae_batch_size=job.vae_batch_size).load()
    set_tf32(job.allow_tf32, device)
    amp = MIXED_PRECISIONS[job.mixed_precision]
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else None

    out = Path(job.output_dir)
    source = info.get("path") or job.ckpt
    identity = O.normalize({
        "checkpoint": os.path.abspath(source) if source else "<in-memory model>",
        "weights": job.weights,
        "model_config": asdict(mcfg), "data_info": data_info.to_dict(), "sampler": sampler.to_dict(),
        "num_samples": job.num_samples, "batch_size": job.batch_size, "seed": job.seed,
        "labels": job.labels, "class_label": job.class_label, "rounding": job.rounding,
        "mixed_precision": job.mixed_precision,
        "tf32": job.allow_tf32 and device.type == "cuda",  # what the matmuls really did
        "vae": O.vae_id(decoder.vae_name) if data_info.kind == "moments" else None,
    })
    hold(out, "sra sample", "--output-dir", state)  # one job per output dir (sra.runlock)
    prev = O.check_output_dir(out, identity)
    npz_complete = bool(prev and prev.get("complete") and (out / O.NPZ_NAME).is_file())
    want_png, want_npz = "png" in job.formats, "npz" in job.formats
    state.wait_for_everyone()  # every process has checked the directory before it changes

    doc = {
        "format": O.FORMAT, "complete": False, "identity": identity, "job": job.to_dict(),
        "sampler": sampler.to_dict(), "num_samples": job.num_samples,
        "checkpoint": {k: info.get(k) for k in ("path", "source", "steps", "epoch") if k in info},
        "rounding": {"mode": job.rounding, "rule": "uint8 of clamp(255·(x+1)/2, 0, 255), "
                     + ("rounded to nearest" if job.rounding == "round" else "truncated (as the release)")},
        "seeding": "noise of sample i from its own generator seeded by (seed, i); solver noise of "
                   "batch k = [k·B, (k+1)·B) from a generator seeded by (seed, k); batch k runs on "
                   "process k mod world size",
    }
    if is_main:
        for sub in ([O.PNG_DIR] if want_png else []) + ([O.SHARD_DIR] if want_npz else []):
            (out / sub).mkdir(parents=True, exist_ok=True)
        if prev is None:
            O.write_config(out, doc)
    state.wait_for_everyone()

    # -- this process's batches -----------------------------------------------------------------
    batches = batch_ranges(job.num_samples, job.batch_size)
    mine = [k for k in range(rank, len(batches), world)
            if not O.batch_done(out, k, *batches[k], want_png, want_npz, npz_complete)]
    bar = tqdm(mine, desc="sampling", unit="batch", disable=not (is_main and job.progress))
    for k in bar:
        start, stop = batches[k]
        x = sample_batch(model, seed=job.seed, batch=k, indices=range(start, stop),
                         labels=labels[start:stop], sampler=sampler, device=device, autocast=autocast)
        images = decoder(x)  # (n, H, W, 3) uint8
        O.save_batch(out, k, start, images, labels[start:stop].numpy(), want_png, want_npz)
    state.wait_for_everyone()
    if not is_main:
        return out / O.NPZ_NAME if want_npz else out / O.PNG_DIR

    # -- main process: assemble and record ------------------------------------------------------
    grid = job.grid_size if write_grid is not None else 0
    npz_path = out / O.NPZ_NAME
    image_shape = prev.get("image_shape") if prev else None
    if want_npz:
        if any((out / O.SHARD_DIR).glob("batch-*.npz")) or not npz_complete:
            image_shape, first = O.assemble_npz(out, batches, labels.numpy(), grid, job.progress)
            if grid:
                write_grid(first, out / O.GRID_NAME)
        O.remove_leftovers(out, O.SHARD_DIR)
        if not any((out / O.SHARD_DIR).iterdir()):
            (out / O.SHARD_DIR).rmdir()
    elif grid and (mine or not (out / O.GRID_NAME).is_file() or image_shape is None):
        first = O.first_pngs(out, min(grid, job.num_samples))
        image_shape = list(first.shape[1:])
        write_grid(first, out / O.GRID_NAME)
    if image_shape is None and want_png:
        image_shape = list(O.read_png(O.png_path(out, 0)).shape)
    if want_png:
        O.remove_leftovers(out, O.PNG_DIR)
    counts = torch.bincount(labels, minlength=mcfg.num_classes)
    complete = want_npz or bool(prev and prev.get("complete") and npz_path.is_file())
    doc.update(
        complete=complete, image_shape=image_shape,
        files={"npz": O.NPZ_NAME if complete else None, "png_dir": O.PNG_DIR if want_png else None,
               "grid": O.GRID_NAME if grid else None},
        label_counts={"min": int(counts.min()), "max": int(counts.max())},
        last_run={"world_size": world, "seconds": round(time.time() - t_start, 3),
                  "batches_sampled_on_main": len(mine)},
    )
    O.write_config(out, doc)
    return npz_path if want_npz else out / O.PNG_DIR
