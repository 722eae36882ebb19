"""gpu_check's resume check: 4 uninterrupted steps against 2 steps + checkpoint resumed to 4 in
a fresh process, compared weight by weight (max |Δ| of the model and the EMA).

Two uninterrupted runs are also compared with each other: that Δ is the device's own
run-to-run noise (e.g. attention backward kernels that add in a varying order), the floor against
which the resume Δ is read. On CPU both are expected to be exactly 0; on a GPU the figure is
reported, never assumed. Run as a script, this file is the fresh process: it rebuilds the same
config and resumes with ``--resume auto``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import torch

from gpu_check_base import BENCH, Budget, Context, free_memory, run_case
from gpu_check_train import Arm, build_trainer, release, train_config

STEPS, CUT, TIMEOUT_S = 4, 2, 300
RESUMED_AT = "gpu_check resumed at step "
# The sit-b2-256 recipe on SiT-S/2 (blocks 3 → 8 of 12): small checkpoints to write and hash.
# The EMA warms up (decay (1+n)/(10+n)) so that it really moves within 4 steps.
RESUME = Arm("SiT-S/2 SRA", "sit-b2-256", "SRA",
             (("model.name", "SiT-S/2"), ("ema.warmup", True)))


def resume_config(ctx: Context, exp_name: str, steps: int):
    batch = 4 if ctx.tiny else 16
    return train_config(ctx, RESUME, exp_name, batch, {
        "loop.max_train_steps": steps, "loop.checkpoint_steps": CUT, "loop.log_every": CUT})


def _checkpoint(ctx: Context, exp_name: str, step: int) -> Path:
    return ctx.work / "runs" / exp_name / "checkpoints" / f"step-{step:07d}"


def max_abs_diff(a: Path, b: Path, name: str) -> float:
    """Largest |Δ| over every tensor of two checkpoints' ``name`` file (keys must agree)."""
    from safetensors.torch import load_file

    ta, tb = load_file(str(a / name)), load_file(str(b / name))
    if ta.keys() != tb.keys():
        raise RuntimeError(f"{name}: the checkpoints hold different tensors")
    return max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta)


def no_curves():
    """The end-of-run loss-curve figure is left out: matplotlib's layout costs seconds on a
    small CPU, and the figure has no part in what a resume restores."""
    from sra.training.monitor import Monitor

    return mock.patch.object(Monitor, "curves", lambda self, title: None)


def fit(ctx: Context, exp_name: str, steps: int) -> None:
    trainer = build_trainer(resume_config(ctx, exp_name, steps))
    try:  # the loop's progress bar would fill the check's log; errors still propagate
        with contextlib.redirect_stderr(io.StringIO()), no_curves():
            trainer.fit()
    finally:
        release(trainer)
        del trainer
        free_memory(ctx.device)


class FreshProcess:
    """A new Python process that resumes ``exp_name`` to step 4 when told to. It is started
    ahead (by ``gpu_check.py`` at its start), so that its imports overlap the parent's work; it
    inherits nothing but the environment, and waits for one line on its stdin before it touches
    the run (or the GPU)."""

    def __init__(self, ctx: Context, exp_name: str):
        spec = {"work": str(ctx.work), "tiny": ctx.tiny, "device": str(ctx.device), "exp": exp_name}
        self.proc = subprocess.Popen(
            [sys.executable, str(BENCH / "gpu_check_resume.py"), json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def resume(self) -> int:
        """Let it resume; the step it resumed at (a run started afresh would say 0)."""
        out, _ = self.proc.communicate("go\n", timeout=TIMEOUT_S)
        if self.proc.returncode != 0:
            tail = out.strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"the resumed process exited {self.proc.returncode}: {tail[0]}")
        said = [line for line in out.splitlines() if line.startswith(RESUMED_AT)]
        if not said:
            raise RuntimeError("the resumed process did not say where it resumed")
        return int(said[-1][len(RESUMED_AT):])

    def close(self) -> None:
        """Stop it if it is still waiting (the parent failed before the resume)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def section_resume(ctx: Context) -> dict:
    """Uninterrupted ×2, and cut at step 2 then resumed in a fresh process; max |Δ| at step 4."""

    def run() -> dict:
        fresh = ctx.ahead.pop("resume", None) or FreshProcess(ctx, "cut")
        try:
            fit(ctx, "ref", STEPS)
            fit(ctx, "ref2", STEPS)
            fit(ctx, "cut", CUT)
            at = fresh.resume()
        finally:
            fresh.close()
        if at != CUT:  # a run that started afresh would match the reference too
            raise RuntimeError(f"the fresh process resumed at step {at}, not {CUT}")
        ref, ref2, cut = (_checkpoint(ctx, e, STEPS) for e in ("ref", "ref2", "cut"))
        rec = {"model": RESUME.label, "steps": STEPS, "cut_at": CUT, "resumed_at": at,
               "batch": resume_config(ctx, "x", STEPS).loop.global_batch_size}
        for name in ("model", "ema"):
            rec[f"resume_max_abs_diff_{name}"] = max_abs_diff(ref, cut, f"{name}.safetensors")
            rec[f"rerun_max_abs_diff_{name}"] = max_abs_diff(ref, ref2, f"{name}.safetensors")
        # the weights really moved after the cut: a Δ of 0 is not a resume that never stepped
        rec["moved_after_cut_max_abs"] = max_abs_diff(ref, _checkpoint(ctx, "cut", CUT),
                                                      "model.safetensors")
        return rec

    return run_case(ctx, "resume check", 60.0, run)


def _main(spec_json: str) -> None:
    """The fresh process: import everything, wait for the parent's word, resume."""
    spec = json.loads(spec_json)
    if spec["device"] == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        torch.set_num_threads(1)  # as the parent runs the dry run
    ctx = Context(torch.device(spec["device"]), spec["tiny"], Path(spec["work"]), Budget(TIMEOUT_S),
                  None)
    from sra.training.loop import Trainer

    if sys.stdin.readline().strip() != "go":
        return  # the parent gave up before the cut run was written
    trainer = Trainer(resume_config(ctx, spec["exp"], STEPS), resume="auto")
    print(f"{RESUMED_AT}{trainer.step}", flush=True)
    with no_curves():
        trainer.fit()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="gpu_check's resumed half (internal)")
    p.add_argument("spec", help="JSON: work folder, tiny, device, experiment name")
    _main(p.parse_args().spec)
