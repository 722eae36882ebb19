"""Token diagnostics of a convergence run's checkpoint: how the student's block-s tokens relate
to the EMA teacher's block-t tokens on fixed real digits (plain and centred cosine, and the share
of each side's token norm carried by the per-image mean token)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, TypeVar

from convergence_setup import StudyConfig, arm_config, run_key

DIAG_SAMPLES = 256  # real digits used for the token diagnostics
DIAG_SEED = 7

T = TypeVar("T")


def on_stream(g, draw: Callable[[], T]) -> T:
    """Run ``draw`` (which uses torch's global CPU RNG, as the objective's functions do) on the
    stream of generator ``g`` and move ``g`` past what it drew: the diagnostics stay ONE seeded
    stream, and the caller's global RNG is left as it was."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(g.get_state())
        out = draw()
        g.set_state(torch.get_rng_state())
    return out


def token_diagnostics(ckpt_dir: Path, student_block: int, teacher_block: int,
                      t_max: float) -> dict:
    """How student and teacher tokens relate at a checkpoint, on fixed real digits.

    The student (trained weights; through the projector head when the run has SRA's) sees x_t, the
    EMA teacher x_{t_T} at the objective's teacher time with the same ε (as in training). Returns
    the plain cosine and the cosine after removing each image's mean token ("centered"), and for
    both sides the share of the squared token norm carried by that per-image mean token (the
    component shared by all tokens of an image).
    """
    import torch
    import torch.nn.functional as F

    from sra.checkpoints import load_model
    from sra.data import build_dataset
    from sra.objectives import FlowConfig, make_process

    student, _ = load_model(ckpt_dir, weights="model", with_head=True)
    teacher, info = load_model(ckpt_dir, weights="ema")
    ds = build_dataset("digits")
    g = torch.Generator().manual_seed(DIAG_SEED)
    idx = torch.randperm(len(ds), generator=g)[:DIAG_SAMPLES].tolist()
    x0 = torch.stack([torch.as_tensor(ds[i][0]) for i in idx]).float()  # (N, 1, 16, 16)
    y = torch.tensor([int(ds[i][1]) for i in idx])
    proc = make_process("SiT", FlowConfig(path_type=info.get("path_type", "linear")))
    t = torch.rand(len(idx), generator=g)
    t_teacher = on_stream(g, lambda: proc.teacher_t(t, t_max))
    eps = torch.randn(x0.shape, generator=g)
    # Through SRA's head only: a REPA head maps to the encoder's width, not the teacher's.
    project = student.config.use_head and student.config.head == "sra"
    with torch.no_grad():
        s = student(proc.noisy(x0, eps, t), t, y, return_blocks=(student_block,),
                    project=project).features[student_block]  # (N, T, D)
        tt = teacher(proc.noisy(x0, eps, t_teacher), t_teacher, y, return_blocks=(teacher_block,),
                     stop_after=teacher_block).features[teacher_block]  # (N, T, D)

    def shared_share(z):  # |per-image mean token|² / mean |token|²
        return float((z.mean(1).pow(2).sum(-1) / z.pow(2).sum(-1).mean(1)).mean())

    sc, tc = s - s.mean(1, keepdim=True), tt - tt.mean(1, keepdim=True)
    return {
        "cos": float(F.cosine_similarity(s, tt, dim=-1).mean()),
        "cos_centered": float(F.cosine_similarity(sc, tc, dim=-1).mean()),
        "student_shared": shared_share(s), "teacher_shared": shared_share(tt),
        "blocks": [student_block, teacher_block],
        "projected": bool(project), "step": int(json.loads(
            (Path(ckpt_dir) / "meta.json").read_text())["step"]),
    }


def add_diagnostics(result: dict, study: StudyConfig) -> dict:
    """Token diagnostics of the run's last checkpoint (if still on disk)."""
    from sra import checkpoints as ckpts

    run_dir = study.work_dir / "runs" / run_key(result["arm"], result["seed"])
    last = ckpts.latest_checkpoint(run_dir)
    if last is not None:
        a = arm_config(result["arm"]).align  # the arm's current definition names the blocks
        result["diagnostics"] = token_diagnostics(last, a.student_block, a.teacher_block, a.t_max)
    return result
