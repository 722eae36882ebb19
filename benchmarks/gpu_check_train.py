"""gpu_check's training figures, taken through the library's own ``Trainer`` on a synthetic
packed dataset: step time, images/s, MFU and peak memory per model, objective, batch and compile
setting, and 50 fp16 steps with the grad scaler. The resume check is :mod:`gpu_check_resume`.

A case builds a real :class:`~sra.training.loop.Trainer` (accelerate, fused AdamW, flat EMA,
health counters, ``--compile`` as the loop applies it) and takes optimizer steps exactly as
``Trainer.fit`` does (learning rate, ``_train_step``, step count) on batches the run's own
DataLoader produced, staged on the device first so that data loading stays out of the timing.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import time
from unittest import mock
from dataclasses import dataclass

import numpy as np
import torch

from gpu_check_base import Context, Peak, StepClock, free_memory, run_case, summarise, synchronize
from flops import mfu, train_step_flops
from sra.training.config import TrainConfig, override, preset
from sra.training.optim import learning_rate

NUM_CLASSES, TINY_CLASSES = 1000, 10
LATENT, TINY_LATENT = (8, 32, 32), (8, 8, 8)  # SD-VAE mean‖std of 256 px (tiny: 64 px) images
DATA_ROWS, TINY_ROWS = 256, 24
TINY_MODEL = {"model.depth": 3, "model.hidden_size": 32, "model.num_heads": 2,
              "model.patch_size": 2, "align.student_block": 1, "align.teacher_block": 2}


@dataclass(frozen=True)
class Arm:
    """A model and objective as a preset trains them."""

    label: str  # "SiT-XL/2 SRA"
    preset: str
    objective: str  # "SRA" | "DTS+AS"
    overrides: tuple = ()  # extra (dotted path, value) pairs on top of the preset


XL = Arm("SiT-XL/2 SRA", "sit-xl2-256", "SRA")
B2 = Arm("SiT-B/2 SRA", "sit-b2-256", "SRA")
B2_DTS = Arm("SiT-B/2 DTS+AS", "sit-b2-dts-as", "DTS+AS")


# -- data and configs -----------------------------------------------------------------------------
def packed_latents(ctx: Context) -> str:
    """A packed folder of random SD-VAE moments (mean ‖ positive std), written with the library's
    own packed writer; made once per run in the scratch folder."""
    from sra.data.formats import is_packed, moments_info, shard_name
    from sra.data.packed import ShardWriter, write_packed_header

    root = ctx.work / "packed"
    if is_packed(str(root)):
        return str(root)
    root.mkdir(parents=True, exist_ok=True)
    shape, n = (TINY_LATENT, TINY_ROWS) if ctx.tiny else (LATENT, DATA_ROWS)
    classes = TINY_CLASSES if ctx.tiny else NUM_CLASSES
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(n, *shape)).astype(np.float32)
    rows[:, shape[0] // 2:] = np.abs(rows[:, shape[0] // 2:]) * 0.1  # std ≥ 0, as the VAE's
    writer = ShardWriter(str(root / shard_name(0)), shape)
    writer.append(rows)
    shards = [(shard_name(0), writer.close())]
    labels = np.arange(n, dtype=np.int64) % classes
    info = moments_info(shape, classes)
    write_packed_header(str(root), shards, labels, np.arange(n), info, shape)
    return str(root)


def train_config(ctx: Context, arm: Arm, exp_name: str, batch: int,
                 extra: dict | None = None) -> TrainConfig:
    """The arm's preset on the synthetic data, with everything that would write or evaluate
    during the measurement switched off; ``extra``: more overrides (dotted path → value)."""
    cfg = preset(arm.preset)
    values = {
        "data.data_dir": packed_latents(ctx), "data.resolution": (8 if ctx.tiny else 32) * 8,
        "data.num_workers": 0, "loop.global_batch_size": batch, "loop.report_to": "none",
        "loop.sample_steps": 0, "loop.grid_samples": 0, "loop.eval_digits": False,
        "loop.log_every": 1000, "loop.checkpoint_steps": 1000, "fid.every": 0,
        "loop.mixed_precision": "bf16", "output_dir": str(ctx.work / "runs"), "exp_name": exp_name,
        **(TINY_MODEL if ctx.tiny else {}), **dict(arm.overrides),
        **(extra or {}),
    }
    for path, value in values.items():
        cfg = override(cfg, path, value)
    return cfg


def fresh_accelerator_state() -> None:
    """accelerate keeps one process-wide state whose mixed precision cannot change once set; a
    check that builds bf16 and fp16 trainers in one process resets it between them."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def build_trainer(cfg: TrainConfig, dynamo_only: bool = False):
    """A Trainer for ``cfg``. ``dynamo_only``: ``--compile`` traces with dynamo but runs the
    graphs eagerly (the CPU dry run: inductor's C++ builds take minutes on a small CPU)."""
    from sra.training.loop import Trainer

    fresh_accelerator_state()
    if not dynamo_only:
        return Trainer(cfg)
    with mock.patch.object(torch, "compile", functools.partial(torch.compile, backend="eager")):
        return Trainer(cfg)


def release(trainer) -> None:
    """Drop what accelerate, dynamo and the run lock keep of a trainer; the caller then drops
    its own references and calls ``free_memory``."""
    from sra.runlock import release_all

    trainer.accelerator.free_memory()
    release_all()
    if trainer.cfg.loop.compile:
        torch._dynamo.reset()


# -- steps ----------------------------------------------------------------------------------------
def staged_batches(trainer, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches from the run's own DataLoader, moved to the device once."""
    dev = trainer.accelerator.device
    batches = itertools.islice(iter(trainer.loader), count)
    return [(x.to(dev), y.to(dev)) for x, y in batches]


def take_steps(trainer, batches, steps: int, clock: StepClock | None = None) -> dict:
    """``steps`` optimizer steps as ``Trainer.fit`` takes them, without its logging and
    checkpoints; returns the last step's statistics (device tensors)."""
    stats = {}
    for _ in range(steps):
        if clock is not None:
            clock.mark()
        lr = learning_rate(trainer.cfg.optim, trainer.step)
        for group in trainer.optimizer.param_groups:
            group["lr"] = lr
        stats, _finite, _weight = trainer._train_step(batches)
        trainer.step += 1
    if clock is not None:
        clock.mark()
    return stats


def step_flops(trainer, arm: Arm) -> float:
    """Analytic FLOPs per image of the arm's training step (:mod:`flops`)."""
    cfg = trainer.cfg
    sizes = getattr(trainer.objective, "sizes", None) if arm.objective == "DTS+AS" else None
    teacher = cfg.align.teacher_block if cfg.align.active else None
    return train_step_flops(trainer.model_cfg, teacher, group_sizes=sizes,
                            teacher_separated=cfg.groups.teacher_mask)["step"]


def time_batch(ctx: Context, trainer, arm: Arm, staged, batch: int, warmup: int,
               repeats: int) -> dict:
    """Warm-up (compiles, allocates optimizer state), then ``repeats`` timed steps at ``batch``."""
    batches = itertools.cycle([(x[:batch], y[:batch]) for x, y in staged])
    t0 = time.perf_counter()
    take_steps(trainer, batches, warmup)
    synchronize(ctx.device)
    warm_s = time.perf_counter() - t0
    clock = StepClock(ctx.device)
    with Peak(ctx.device) as mem:
        stats = take_steps(trainer, batches, repeats, clock)
    times = summarise(clock.seconds())
    flops = step_flops(trainer, arm) * batch
    loss = float(stats["loss"])  # after the timed steps: not inside them
    return {**times, "images_per_s": batch / times["median_s"],
            "tflops_per_s": flops / times["median_s"] / 1e12,
            "mfu": mfu(flops, times["median_s"], ctx.peak_tflops),
            "gflop_per_image": flops / batch / 1e9,
            "peak_mem_bytes": mem.peak, "state_bytes": mem.after, "memory_kind": mem.kind,
            "warmup_s": warm_s, "loss": loss}


def train_arm(ctx: Context, arm: Arm, batches: list[int], compile_: bool,
              estimate_gpu_s: float) -> list[dict]:
    """One trainer for the arm (micro-batch = the largest of ``batches``), timed at each batch."""
    warmup, repeats = (1, 2) if ctx.tiny else (3, 10)
    mode = "compile" if compile_ else "eager"
    dynamo_only = compile_ and ctx.tiny and not ctx.cuda
    backend = ("eager (dry run)" if dynamo_only else "inductor") if compile_ else None
    base = {"arm": arm.label, "objective": arm.objective, "compile": compile_, "amp": "bf16",
            "compile_backend": backend}
    rows = [dict(base, batch=b) for b in batches]
    holder: dict = {}

    def build() -> dict:
        cfg = train_config(ctx, arm, f"{arm.preset}-{mode}", max(batches),
                           {"loop.compile": compile_})
        holder["trainer"] = build_trainer(cfg, dynamo_only)
        holder["staged"] = staged_batches(holder["trainer"], 2)
        return {}

    made = run_case(ctx, f"{arm.label} {mode}: build trainer", estimate_gpu_s / 2, build)
    if made["status"] != "ok":
        return [dict(r, status=made["status"]) for r in rows]
    trainer, staged = holder.pop("trainer"), holder.pop("staged")
    # A real run compiles for its one batch size: no dynamic-shape graph for the second size.
    patch = (torch._dynamo.config.patch(automatic_dynamic_shapes=False) if compile_
             else contextlib.nullcontext())
    with patch:
        for row in rows:
            b = row["batch"]
            row.update(run_case(ctx, f"{arm.label} {mode} batch {b}", estimate_gpu_s / len(rows),
                                lambda: time_batch(ctx, trainer, arm, staged, b, warmup, repeats)))
    release(trainer)
    del trainer, staged
    free_memory(ctx.device)
    return rows


# -- the sections ---------------------------------------------------------------------------------
def train_batches(ctx: Context) -> list[int]:
    return [2, 4] if ctx.tiny else [32, 64]


def section_train(ctx: Context, compile_: bool) -> dict:
    """Eager (or compiled) training of XL/2 and B/2 with SRA, and B/2 with DTS+AS (eager only)."""
    # GPU budget per arm (its build and both batches): XL's inductor compile is the largest
    # unknown, ≈1–2 min per batch size on a 16-core host (an estimate: never run here yet).
    arms = [(B2, 120.0), (XL, 240.0)] if compile_ else [(XL, 45.0), (B2, 20.0), (B2_DTS, 20.0)]
    if compile_ and ctx.tiny:
        arms = arms[:1]  # the dry run traces once: dynamo alone takes seconds on a small CPU
    batches = train_batches(ctx)[:1] if compile_ and ctx.tiny else train_batches(ctx)
    cases = []
    for arm, est in arms:
        cases += train_arm(ctx, arm, batches, compile_, est)
    out = {"cases": cases}
    if not compile_:
        out["dts_overhead"] = dts_overhead(cases)
    return out


def dts_overhead(cases: list[dict]) -> list[dict]:
    """DTS+AS step time over SRA's at SiT-B/2, per batch (both eager, same process)."""
    rows = []
    for b in sorted({c["batch"] for c in cases}):
        sra = next((c for c in cases if c["arm"] == B2.label and c["batch"] == b), {})
        dts = next((c for c in cases if c["arm"] == B2_DTS.label and c["batch"] == b), {})
        if "median_s" in sra and "median_s" in dts:
            rows.append({"batch": b, "sra_step_s": sra["median_s"], "dts_step_s": dts["median_s"],
                         "overhead_pct": 100.0 * (dts["median_s"] / sra["median_s"] - 1.0),
                         "status": "ok"})
        else:
            rows.append({"batch": b, "status": "missing: " + (sra.get("status") or "no SRA case")
                         + " / " + (dts.get("status") or "no DTS case")})
    return rows


def section_fp16(ctx: Context) -> dict:
    """50 steps of SiT-XL/2 with ``--mixed-precision fp16`` (accelerate's GradScaler): grad-scaler
    overflows (calibration) vs divergent steps, as the trainer's health counters count them."""
    steps, batch = (3, 2) if ctx.tiny else (50, 32)

    def run() -> dict:
        cfg = train_config(ctx, XL, "fp16", batch, {"loop.mixed_precision": "fp16"})
        trainer = build_trainer(cfg)
        try:
            batches = itertools.cycle(staged_batches(trainer, 2))
            t0 = time.perf_counter()
            stats = take_steps(trainer, batches, steps)
            synchronize(ctx.device)
            wall = time.perf_counter() - t0
            skipped, overflows, _worst, _last = trainer.health.guard.read()  # sync point
            scaler = trainer.accelerator.scaler
            return {"steps": steps, "batch": batch, "skipped": skipped, "overflows": overflows,
                    "divergent": skipped - overflows,
                    "grad_scaler": scaler is not None,
                    "final_scale": scaler.get_scale() if scaler is not None else None,
                    "last_loss": float(stats["loss"]), "wall_s": wall,
                    "images_per_s_incl_warmup": steps * batch / wall,
                    "status": "ok" if skipped - overflows == 0 else "FAILED: divergent steps"}
        finally:
            release(trainer)
            del trainer
            free_memory(ctx.device)

    rec = run_case(ctx, f"fp16 + GradScaler, {steps} steps", 45.0, run)
    if not ctx.cuda and rec["status"] == "ok":
        rec["note"] = "CPU: accelerate runs fp16 without autocast or a grad scaler here"
    return rec
