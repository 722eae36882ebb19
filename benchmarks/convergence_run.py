"""One convergence run (executed in a worker process): train or resume it, score every
checkpoint's EMA with the digit classifier, attach the logged alignment statistics and the
token diagnostics, and write the run's result JSON."""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from convergence_diagnostics import add_diagnostics
from convergence_setup import ARMS, RunSpec, StudyConfig, build_config

EVAL_NOISE_SEED = 2024  # the same noise and labels for every run and every step
TRAIN_STATS = ("loss", "denoise", "align", "cosine", "student_norm", "teacher_norm", "grad_norm")


def fixed_eval_samples(model, n: int, sampler):
    """The ``n`` evaluation samples (n, C, H, W) of an EMA model and their class-balanced labels
    (n,): the project's one fixed-noise scheme (:func:`sra.sampling.sample_fixed`) seeded by
    ``EVAL_NOISE_SEED``, so every run and every step sees the same noise and labels."""
    import torch

    from sra.sampling import sample_fixed

    labels = torch.arange(n) % model.config.num_classes
    return sample_fixed(model, n, seed=EVAL_NOISE_SEED, sampler=sampler, labels=labels), labels


def evaluate_checkpoint(ckpt_dir: Path, study: StudyConfig) -> dict:
    """Digit-classifier FD / accuracy of one checkpoint's EMA samples (fixed noise and labels)."""
    from sra.checkpoints import load_model
    from sra.eval.digits import digits_metrics
    from sra.sampling import SamplerConfig

    model, info = load_model(ckpt_dir)
    sampler = SamplerConfig(mode=study.sampler_mode, steps=study.sampler_steps,
                            cfg_scale=study.cfg_scale, path_type=info.get("path_type", "linear"))
    x, labels = fixed_eval_samples(model, study.samples, sampler)
    # Digits train in pixel space (kind "pixels"): model outputs are images in [-1, 1].
    return digits_metrics(x.clamp(-1, 1), labels)


def alignment_stats(metrics_jsonl: Path, steps: Sequence[int], window: int) -> dict[int, dict]:
    """Mean logged losses/cosines over the ``window`` steps before each of ``steps``."""
    rows = []
    if metrics_jsonl.exists():
        for line in metrics_jsonl.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a killed run
                continue
    out = {}
    for s in steps:
        sel = [r for r in rows if s - window < r.get("step", -1) <= s]
        out[s] = {k: statistics.fmean(r[k] for r in sel) for k in TRAIN_STATS
                  if sel and all(k in r for r in sel)}
    return out


def run_one(spec: RunSpec, study: StudyConfig) -> dict:
    """Train (or resume) one run, evaluate every checkpoint, write and return its result JSON."""
    os.environ.setdefault("OMP_NUM_THREADS", str(study.threads_per_job))
    import torch

    torch.set_num_threads(study.threads_per_job)
    from sra import checkpoints as ckpts
    from sra.training.loop import Trainer

    result_path = study.work_dir / "results" / f"{spec.key}.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    cfg = build_config(spec, study)
    run_dir = Path(cfg.output_dir) / cfg.exp_name
    t0 = time.perf_counter()
    latest = ckpts.latest_checkpoint(run_dir)
    done = latest is not None and ckpts.read_meta(latest)["step"] >= spec.steps
    cost = {"train_cpu_s": 0.0, "trained_steps": 0}
    if not done:
        trainer = Trainer(cfg, resume="auto" if latest is not None else None)
        start, c0 = trainer.step, time.process_time()
        trainer.fit()
        # Process CPU time of the steps trained here (one thread: other jobs on the machine do
        # not inflate it as they inflate wall time); set-up (data, model, encoder) excluded.
        cost = {"train_cpu_s": time.process_time() - c0, "trained_steps": trainer.step - start}
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    evals = []
    for path in ckpts.list_checkpoints(run_dir):
        step = int(ckpts.read_meta(path)["step"])
        if step % spec.eval_every == 0 and step <= spec.steps:
            evals.append({"step": step, **evaluate_checkpoint(path, study)})
    stats = alignment_stats(run_dir / "metrics.jsonl", [e["step"] for e in evals], spec.eval_every)
    for e in evals:
        e["train"] = stats.get(e["step"], {})
    result = {
        "arm": spec.arm, "seed": spec.seed, "steps": spec.steps, "eval_every": spec.eval_every,
        "overrides": [list(o) for o in ARMS[spec.arm] + tuple(study.extra)],
        "config": {"model": asdict(cfg.model), "align": asdict(cfg.align),
                   "align_target": cfg.align_target, "encoder_align": asdict(cfg.encoder_align),
                   "groups": asdict(cfg.groups), "lr": cfg.optim.learning_rate,
                   "batch": cfg.loop.global_batch_size, "ema_decay": cfg.ema.decay},
        "eval": evals, "train_s": train_s, **cost,
        # CPU seconds per optimizer step (None when nothing was trained in this call).
        "cpu_per_step_s": (cost["train_cpu_s"] / cost["trained_steps"]
                           if cost["trained_steps"] else None),
        # Since the SRA head is built after the backbone's init, one seed gives both arms the
        # same initial backbone; results written before that lack this key.
        "paired_init": True,
        "samples": study.samples,
        "sampler": {"mode": study.sampler_mode, "steps": study.sampler_steps,
                    "cfg_scale": study.cfg_scale},
    }
    add_diagnostics(result, study)
    result["eval_s"] = time.perf_counter() - t1
    result_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, result_path)  # a result file exists only when complete
    return result


def run_worker(args: tuple[RunSpec, StudyConfig]) -> dict:
    """:func:`run_one` for a process pool (one picklable argument)."""
    return run_one(*args)
