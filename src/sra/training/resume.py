"""Which checkpoint a run resumes, whether it fits the run, and putting it back in place.

Progress is counted in global micro-batches (``global batch / accumulation`` samples each, the
same for any number of processes): a checkpoint can be resumed by another number of processes
with the same data order, but not with another global batch or accumulation, which would change
which samples each step sees (refused, naming the setting).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.nn as nn

from sra import checkpoints as ckpts
from sra.data.checks import check_labels_fit
from sra.errors import SraError
from sra.models import ModelConfig
from sra.training import checkpoint as ckpt
from sra.training.batches import Position

# Settings a checkpoint must share with the run that resumes it, with their flags.
RESUME_INVARIANTS = {
    "global_batch_size": "--batch-size",
    "gradient_accumulation_steps": "--gradient-accumulation-steps",
}


@dataclass
class Resumed:
    """Where the resumed run stands."""

    step: int
    start: Position
    skipped: int
    compute_s: float = 0.0  # the run's cumulative training compute (``compute_s`` in metrics)


def step_seed(seed: int, step: int, rank: int) -> int:
    """A seed for process ``rank`` from optimizer step ``step`` on (used when a resumed run has
    no RNG state for this process, e.g. after a change of the number of processes)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def _decide(run_dir: Path, resume: str | None) -> tuple[ckpt.TrainingState | None, list[str]]:
    """The main process's choice: the checkpoint to resume, verified and loaded, or None; and the
    notes for the log. Raises :class:`SraError` for a choice that cannot be made."""
    notes: list[str] = []
    if not resume:
        if ckpts.latest_checkpoint(run_dir) is not None:
            raise SraError(f"{run_dir} already holds checkpoints; pass --resume auto to "
                           f"continue it or choose another --exp-name / --output-dir")
        return None, notes
    if resume != "auto":
        path = Path(resume)
        if not path.exists():
            raise SraError(f"--resume checkpoint not found: {path}")
        if not (path / ckpts.layout.META).is_file():
            path = ckpts.latest_checkpoint(path)
            if path is None:
                raise SraError(f"{resume} is not a complete sra checkpoint (no meta.json)")
        return ckpt.load_training_state(path, 0), notes
    state, damaged = ckpt.find_resumable_state(run_dir, 0)
    notes += [f"checkpoint {path} is damaged ({reason}); passing over it" for path, reason in damaged]
    if state is None and damaged:
        raise SraError(f"no checkpoint of {run_dir} loads completely (newest: "
                       f"{damaged[0][0].name}: {damaged[0][1]})")
    if state is not None and damaged:
        notes.append(f"resuming from {state.path} (the newest checkpoint that loads completely)")
    return state, notes


def find_resume_state(acc, run_dir: Path, resume: str | None,
                      notes: list[str]) -> ckpt.TrainingState | None:
    """The loaded checkpoint to resume: ``auto`` = the newest one of ``run_dir`` that loads
    completely (damaged newer ones are passed over and reported in ``notes``), or a path; None
    for a fresh run (refused if the run dir already holds checkpoints).

    The main process alone lists, verifies (hashes every file against the manifest, the other
    processes' RNG files included) and chooses; the others receive the choice and load that
    checkpoint without hashing it again — one verification per launch, and no process can
    pick another step than the main one.
    """
    from sra.training.launch import broadcast_from_main

    state, error = None, None
    if acc.is_main_process:
        try:
            state, mine = _decide(run_dir, resume)
            notes += mine
        except SraError as exc:
            error = str(exc)
    path, error = broadcast_from_main(acc, (state.path if state is not None else None, error))
    if error is not None:
        raise SraError(error)
    if path is not None and not acc.is_main_process:
        state = ckpt.load_training_state(path, acc.process_index, verify=False)
    return state


def check_resume_fits(state: ckpt.TrainingState, model_cfg: ModelConfig, loop_cfg,
                      dataset=None) -> None:
    """Refuse a checkpoint of another model or another batch layout, naming the setting, and a
    dataset with labels outside the checkpoint's classes, naming the label."""
    path, saved = state.path, state.meta.get("config", {})
    saved_model = saved.get("model")
    if saved_model and dataset is not None and "num_classes" in saved_model:
        check_labels_fit(dataset, int(saved_model["num_classes"]), f"checkpoint {path}")
    if saved_model and ModelConfig.from_dict(saved_model) != model_cfg:
        raise SraError(f"checkpoint {path} was made for a different model "
                       f"({saved_model}); the run asks for {model_cfg.to_dict()}")
    for key, flag in RESUME_INVARIANTS.items():
        then = saved.get("loop", {}).get(key)
        now = getattr(loop_cfg, key)
        if then is not None and then != now:
            raise SraError(
                f"checkpoint {path} was trained with {flag} {then}, this run asks for {now}: "
                f"resume with {flag} {then} (it fixes which samples each step sees)")


def apply_state(state: ckpt.TrainingState, acc, model: nn.Module, ema: nn.Module, optimizer,
                seed: int, notes: list[str]) -> Resumed:
    """Put a loaded checkpoint into the model, EMA, optimizer, grad scaler and RNGs."""
    from accelerate.utils import set_seed

    path = state.path
    ckpts.load_state_dict_strict(model, state.model, str(path / "model.safetensors"))
    ckpts.load_state_dict_strict(ema, state.ema, str(path / "ema.safetensors"))
    ema.to(acc.device)
    try:
        optimizer.load_state_dict(state.optimizer)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise SraError(f"{path / 'optimizer.pt'} does not fit this model's optimizer ({exc})") from None
    if state.scaler is not None and acc.scaler is not None:
        acc.scaler.load_state_dict(state.scaler)
    meta = state.meta
    step = int(meta["step"])
    then_world = int(meta.get("world_size", acc.num_processes))
    if state.rng is not None and then_world == acc.num_processes:
        ckpt.set_rng_state(state.rng)
    else:
        # The data order is unchanged (same global micro-batches); the noise streams cannot be
        # continued across another process count, so they restart from (seed, step, rank).
        set_seed(step_seed(seed, step, acc.process_index))
        notes.append(f"resuming {path} with {acc.num_processes} processes (it was written by "
                     f"{then_world}): the data order continues exactly; the noise streams are "
                     f"reseeded from step {step}")
    return Resumed(step=step, start=Position(**meta["data"]), skipped=int(meta.get("skipped", 0)),
                   compute_s=float(meta.get("compute_s", 0.0)))


def init_from_weights(model: nn.Module, source: str, dataset=None) -> None:
    """``--init-from``: a fresh run starts from a checkpoint's EMA weights (ours or the release's).
    The backbone must fit exactly; the head is the checkpoint's when it is this model's kind of
    head, else the model's freshly initialised one (e.g. an SRA checkpoint into a REPA run); a
    model without a head drops the checkpoint's."""
    sd, _ = ckpts.load_weights(source, weights="ema")
    table = sd.get("y_embedder.embedding_table.weight")
    if dataset is not None and table is not None:  # its last row is the null label
        check_labels_fit(dataset, table.shape[0] - 1, f"the --init-from checkpoint {source}")
    backbone = {k: v for k, v in sd.items() if not k.startswith("ap_head.")}
    if model.ap_head is None:
        sd = backbone
    else:  # keep the checkpoint's head only if it is this model's kind (SRA's vs REPA's)
        own = {f"ap_head.{k}": v for k, v in model.ap_head.state_dict().items()}
        theirs = {k: v for k, v in sd.items() if k.startswith("ap_head.")}
        fits = theirs.keys() == own.keys() and all(v.shape == own[k].shape for k, v in theirs.items())
        sd = dict(backbone, **(theirs if fits else own))
    ckpts.load_state_dict_strict(model, sd, source)
