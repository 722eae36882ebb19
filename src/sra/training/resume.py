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
from sra.errors import SraError
from sra.models import ModelConfig
from sra.training import checkpoint as ckpt
from sra.training.batches import Position
from sra.training.bookkeeping import min_over_processes

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


def step_seed(seed: int, step: int, rank: int) -> int:
    """A seed for process ``rank`` from optimizer step ``step`` on (used when a resumed run has
    no RNG state for this process, e.g. after a change of the number of processes)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def find_resume_state(acc, run_dir: Path, resume: str | None,
                      notes: list[str]) -> ckpt.TrainingState | None:
    """The loaded checkpoint to resume: ``auto`` = the newest one of ``run_dir`` that loads
    completely (damaged newer ones are passed over and reported in ``notes``), or a path."""
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.exists():
            raise FileNotFoundError(f"--resume checkpoint not found: {path}")
        if not (path / ckpts.layout.META).is_file():
            path = ckpts.latest_checkpoint(path)
            if path is None:
                raise SraError(f"{resume} is not a complete sra checkpoint (no meta.json)")
        return ckpt.load_training_state(path, acc.process_index)
    state, damaged = ckpt.find_resumable_state(run_dir, acc.process_index)
    notes += [f"checkpoint {path} is damaged ({reason}); passing over it" for path, reason in damaged]
    # Every process must resume the same step (a rank's own RNG file could be the damaged one).
    step = min_over_processes(acc, state.step if state is not None else -1)
    if state is None or step < 0:
        if damaged:
            raise SraError(f"no checkpoint of {run_dir} loads completely (newest: "
                           f"{damaged[0][0].name}: {damaged[0][1]})")
        return None
    if step != state.step:
        state = ckpt.load_training_state(ckpts.checkpoint_path(run_dir, step), acc.process_index)
    if damaged:
        notes.append(f"resuming from {state.path} (the newest checkpoint that loads completely)")
    return state


def check_resume_fits(state: ckpt.TrainingState, model_cfg: ModelConfig, loop_cfg) -> None:
    """Refuse a checkpoint of another model or another batch layout, naming the setting."""
    path, saved = state.path, state.meta.get("config", {})
    saved_model = saved.get("model")
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
    return Resumed(step=step, start=Position(**meta["data"]), skipped=int(meta.get("skipped", 0)))


def init_from_weights(model: nn.Module, source: str) -> None:
    """``--init-from``: a fresh run starts from a checkpoint's EMA weights (ours or the release's).
    The backbone must fit exactly; the head is the checkpoint's when it is this model's kind of
    head, else the model's freshly initialised one (e.g. an SRA checkpoint into a REPA run); a
    model without a head drops the checkpoint's."""
    sd, _ = ckpts.load_weights(source, weights="ema")
    backbone = {k: v for k, v in sd.items() if not k.startswith("ap_head.")}
    if model.ap_head is None:
        sd = backbone
    else:  # keep the checkpoint's head only if it is this model's kind (SRA's vs REPA's)
        own = {f"ap_head.{k}": v for k, v in model.ap_head.state_dict().items()}
        theirs = {k: v for k, v in sd.items() if k.startswith("ap_head.")}
        fits = theirs.keys() == own.keys() and all(v.shape == own[k].shape for k, v in theirs.items())
        sd = dict(backbone, **(theirs if fits else own))
    ckpts.load_state_dict_strict(model, sd, source)
