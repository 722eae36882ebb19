"""Training checkpoints: writing them (atomic, with a manifest), pruning, and loading every
piece of one back (weights, optimizer, scaler, RNG) before any of it is applied.

The on-disk layout and its checks are in :mod:`sra.checkpoints.layout`; reading weights for
inference in :mod:`sra.checkpoints.weights`.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file

from sra.atomic import atomic_write_json
from sra.checkpoints.layout import (FORMAT, MANIFEST, META, STEP_RE, checkpoint_path,
                                    list_checkpoints, read_meta, verify_checkpoint, write_manifest)
from sra.checkpoints.safe import check_state_dict, file_sha256, load_pt_required, load_safetensors
from sra.errors import SraError
from sra.oserrors import WriteError, as_write_error


# -- RNG -------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors/lists only (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without moving this process's RNG streams (torch, CUDA, numpy, python): work
    done only in some runs (training the digit classifier into an empty cache, building the
    Inception network) must not change the noise of the steps after it."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def all_finite(module: nn.Module) -> bool:
    """Whether every parameter and buffer is finite."""
    return all(torch.isfinite(t).all() for t in module.state_dict().values() if t.is_floating_point())


def _contiguous_cpu(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # A copy of every tensor: the trainer's parameters are views into one flat buffer
    # (sra.training.ema.flatten_parameters), and safetensors refuses tensors that share memory.
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}


def write_checkpoint_files(
    tmp_dir: Path, *, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer,
    scaler_state: dict | None, meta: dict,
) -> None:
    """Write the main process's files into ``tmp_dir``, then ``manifest.json``, ``meta.json`` last.

    Call it after every process has written its ``rng-<rank>.pt`` into ``tmp_dir`` (a barrier
    before): the manifest hashes what is in the folder at that moment.
    """
    save_file(_contiguous_cpu(model.state_dict()), tmp_dir / "model.safetensors")
    save_file(_contiguous_cpu(ema.state_dict()), tmp_dir / "ema.safetensors")
    torch.save(optimizer.state_dict(), tmp_dir / "optimizer.pt")
    if scaler_state:
        torch.save(scaler_state, tmp_dir / "scaler.pt")
    write_manifest(tmp_dir)
    # meta.json vouches for the manifest, which vouches for every other file
    _, manifest_sha = file_sha256(tmp_dir / MANIFEST)
    atomic_write_json(tmp_dir / META, dict(meta, format=FORMAT, manifest_sha256=manifest_sha), fsync=True)


def finalize_checkpoint(tmp_dir: Path, final_dir: Path) -> None:
    """Atomically move a complete temporary checkpoint into place."""
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)


def prune_checkpoints(run_dir: str | Path, keep_last: int, milestone_every: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints and every ``milestone_every``-th step."""
    ckpts = list_checkpoints(run_dir)
    removed = []
    for p in ckpts[: max(0, len(ckpts) - keep_last)]:
        step = int(STEP_RE.match(p.name).group(1))
        if milestone_every > 0 and step % milestone_every == 0:
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


@dataclass
class TrainingState:
    """Everything needed to resume, loaded into memory before any of it is applied."""

    path: Path
    meta: dict
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optimizer: dict
    scaler: dict | None  # None: no scaler.pt (not an fp16 run)
    rng: dict | None  # None: no rng-<rank>.pt for this process (e.g. more processes than saved)

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def load_training_state(path: str | Path, process_index: int = 0, *,
                        verify: bool = True) -> TrainingState:
    """Verify checkpoint dir ``path`` (``verify=False`` skips this, e.g. where the main process
    has verified it already) and load all of it: model and EMA state dicts, optimizer state,
    scaler state or None, this process's RNG state or None, meta. Any failure is a one-line
    :class:`SraError` naming the file. Host memory: about the checkpoint's size at once."""
    d = Path(path)
    if verify:
        if (d / MANIFEST).exists():
            verify_checkpoint(d)
        else:  # parsing is the check here: don't parse the (big) optimizer state twice
            verify_checkpoint(d, hashes=[p.name for p in d.glob("*.pt") if p.name != "optimizer.pt"])
    meta = read_meta(d)
    step, data = meta.get("step"), meta.get("data")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0 or not isinstance(data, dict):
        raise SraError(f"{d / META}: corrupt (no valid 'step' and 'data' entries)")
    model = check_state_dict(load_safetensors(d / "model.safetensors"), str(d / "model.safetensors"))
    ema = check_state_dict(load_safetensors(d / "ema.safetensors"), str(d / "ema.safetensors"))
    optimizer = load_pt_required(d / "optimizer.pt")
    if not (isinstance(optimizer, dict) and {"state", "param_groups"} <= set(optimizer)):
        raise SraError(f"{d / 'optimizer.pt'}: not an optimizer state (no 'state'/'param_groups')")
    scaler = None
    if (d / "scaler.pt").exists():
        scaler = load_pt_required(d / "scaler.pt")
        if not isinstance(scaler, dict):
            raise SraError(f"{d / 'scaler.pt'}: not a grad-scaler state ({type(scaler).__name__})")
    rng = None
    rng_file = d / f"rng-{process_index}.pt"
    if rng_file.exists():
        rng = load_pt_required(rng_file)
        if not (isinstance(rng, dict) and {"torch", "numpy", "python"} <= set(rng)):
            raise SraError(f"{rng_file}: not an RNG state (expected torch/numpy/python entries)")
    return TrainingState(path=d, meta=meta, model=model, ema=ema, optimizer=optimizer,
                         scaler=scaler, rng=rng)


def _reason(exc: Exception, d: Path) -> str:
    """``exc``'s message with the checkpoint's own path dropped (``ema.safetensors: truncated …``)."""
    return str(exc).replace(f"{d}{os.sep}", "").replace(str(d), d.name)


def find_resumable_state(
    run_dir: str | Path, process_index: int = 0, *, verify: bool = True,
) -> tuple[TrainingState | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint of ``run_dir`` that verifies and loads, loaded, and the
    newer ones skipped as damaged with why (``[(path, "ema.safetensors: truncated: …")]``).
    (None, skipped) when none loads. Damaged checkpoints are left in place (the run's next
    checkpoint at that step replaces one)."""
    skipped: list[tuple[Path, str]] = []
    for d in reversed(list_checkpoints(run_dir)):
        try:
            return load_training_state(d, process_index, verify=verify), skipped
        except (SraError, OSError) as exc:
            skipped.append((d, _reason(exc, d)))
    return None, skipped


def _agree(acc, final: Path, tmp: Path, work) -> None:
    """Run ``work`` on this process, then learn whether it failed on any process (a collective,
    so a failure on one never leaves the others waiting). On a failure the main process removes
    ``tmp`` and every process raises: a refused write as :class:`WriteError` naming ``final``."""
    error = cause = None
    try:
        work()
    except Exception as exc:
        cause, write = exc, as_write_error(exc, final)
        error = exc if write is None else WriteError(final, write.reason, write.free, write.errno)
    lines = [None if error is None else str(error)]
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        lines = gather_object(lines)
    if not any(lines):
        return
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # the partial files would only take the space
    if error is not None and error is cause:
        raise error  # not a refused write: its own traceback
    if error is not None:
        raise error from cause
    rank, line = next((r, line) for r, line in enumerate(lines) if line)
    raise SraError(f"process {rank}: {line}")


def save_checkpoint(acc, run_dir: Path, step: int, model: nn.Module, ema: nn.Module,
                    optimizer: torch.optim.Optimizer, meta: dict, keep_last: int,
                    milestone_every: int) -> Path | None:
    """Write ``RUN/checkpoints/step-NNNNNNN/`` from every process (each writes its RNG state, the
    main process the rest), atomically, then prune old ones. None (nothing written) if the
    weights are not finite: a checkpoint to resume from must never hold NaNs. A write the OS
    refuses on any process raises :class:`WriteError` on every process, with the temporary
    folder removed and the earlier checkpoints untouched."""
    if not (all_finite(model) and all_finite(ema)):  # sync point (checkpoint steps only)
        return None
    final = checkpoint_path(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")

    def start() -> None:
        if acc.is_main_process:
            # what a killed or refused write left: the run lock (sra.runlock) makes this launch
            # the only writer, so no other process is writing them
            for stale in final.parent.glob(".tmp-step-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True, exist_ok=True)

    def write_main() -> None:
        if acc.is_main_process:
            scaler = acc.scaler.state_dict() if acc.scaler is not None else None
            write_checkpoint_files(tmp, model=model, ema=ema, optimizer=optimizer,
                                   scaler_state=scaler, meta=meta)
            finalize_checkpoint(tmp, final)

    _agree(acc, final, tmp, start)  # every process waits for the folder
    _agree(acc, final, tmp, lambda: torch.save(rng_state(), tmp / f"rng-{acc.process_index}.pt"))
    _agree(acc, final, tmp, write_main)  # the manifest saw every process's RNG file
    if acc.is_main_process:
        prune_checkpoints(run_dir, keep_last, milestone_every)
    acc.wait_for_everyone()
    return final
