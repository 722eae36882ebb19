"""The training loop on HuggingFace accelerate. No math lives here: the objective computes the
losses, :mod:`sra.training.ema` the EMA, :mod:`sra.training.checkpoint` the files,
:mod:`sra.training.monitor` the grids and the digits metric.

Batch sizes: ``loop.global_batch_size`` counts samples per optimizer step over all processes
and accumulation steps; each process's micro-batch is global / (processes × accumulation).

Host–device syncs: a step never reads a tensor on the host. Statistics, the non-finite-step
count and the stop flag are read at log and checkpoint steps only (marked "sync point").
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from sra import checkpoints as ckpts
from sra.atomic import atomic_write_json
from sra.data.base import DataInfo, draw_latents
from sra.errors import SraError
from sra.models import build_model
from sra.oserrors import writing
from sra.runlock import hold
from sra.training import checkpoint as ckpt
from sra.training.batches import Position, ShardedBatchSampler, advance
from sra.training.config import TrainConfig, build_objective, open_dataset, resolve_model_config
from sra.training.bookkeeping import (NonFiniteGuard, RateTimer, StatsWindow, StopFlag, any_process,
                                      build_accelerator,
                                      check_replicas, flatten, reduce_mean, setup_run_logging,
                                      truncate_metrics)
from sra.training.ema import ema_decay, make_ema, update_ema
from sra.training.fid import FIDConfig, QualityProbe, evaluated, write_eval_digits
from sra.training.monitor import METRICS_FILE, Monitor, MonitorConfig
from sra.training.optim import build_optimizer, learning_rate
from sra.training.resume import (Resumed, apply_state, check_resume_fits, find_resume_state,
                                 init_from_weights)

log = logging.getLogger("sra.train")

# -- the trainer ----------------------------------------------------------------------------------
class Trainer:
    """Holds a run's state; :meth:`fit` trains to ``loop.max_train_steps``."""

    def __init__(self, cfg: TrainConfig, resume: str | None = None):
        from accelerate.utils import set_seed

        self.cfg = cfg
        loop = cfg.loop
        self.notes: list[str] = []  # warnings found while setting up; logged once the log exists
        self.run_dir = Path(cfg.output_dir) / cfg.exp_name
        self.accelerator = acc = build_accelerator(loop, self.run_dir)
        # One launch per run dir (sra.runlock), taken before anything is written.
        hold(self.run_dir, "sra train", "--exp-name / --output-dir", acc)
        world = acc.num_processes
        per_step = world * loop.gradient_accumulation_steps
        if loop.global_batch_size % per_step:
            raise SraError(
                f"global batch size {loop.global_batch_size} is not divisible by processes × "
                f"accumulation steps = {world} × {loop.gradient_accumulation_steps}"
            )
        self.micro_batch = loop.global_batch_size // per_step
        if torch.cuda.is_available() and loop.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        # Data, model and the checkpoint to resume: all validated before anything is written.
        self.dataset = open_dataset(cfg)
        self.info: DataInfo = self.dataset.info
        self.model_cfg = resolve_model_config(cfg, self.info)
        state = find_resume_state(acc, self.run_dir, resume, self.notes)
        self.resume_from = state.path if state is not None else None
        if state is None and ckpts.latest_checkpoint(self.run_dir) is not None:
            raise SraError(f"{self.run_dir} already holds checkpoints; pass --resume auto to "
                           f"continue it or choose another --exp-name / --output-dir")
        if state is not None:
            check_resume_fits(state, self.model_cfg, loop)

        set_seed(loop.seed)  # identical initial weights (and so EMA) on every process
        model = build_model(self.model_cfg)
        model.set_fused_attention(cfg.model.fused_attn)
        if cfg.init_from and state is None:
            init_from_weights(model, cfg.init_from)
        self.ema = make_ema(model).to(acc.device)
        opt = build_optimizer(model, cfg.optim, acc.device)
        self.fused = bool(opt.defaults.get("fused"))
        set_seed(loop.seed, device_specific=True)  # but different noise per process
        self.objective = build_objective(cfg, self.model_cfg)
        at = Resumed(step=0, start=Position(), skipped=0)
        if state is not None:
            at = apply_state(state, acc, model, self.ema, opt, loop.seed, self.notes)
        self.step, self.start = at.step, at.start
        self.skipped = at.skipped  # host copy, refreshed at every log/checkpoint step
        self.nonfinite = NonFiniteGuard(acc.device, at.skipped)
        self.saved_step = self.step if state is not None else -1
        self.was_complete = False  # set by fit(): resumed at or past max_train_steps
        self.model, self.optimizer = acc.prepare(model, opt)
        self.forward_model = torch.compile(self.model) if loop.compile else self.model
        # The teacher's forward (blocks 1..t, no grad) is compiled too: +1–3 % per step on the
        # CPU benchmarks (SiT-B/4, digits). The EMA weights are updated in place, which compiled code sees.
        use_teacher = loop.compile and cfg.align.active
        self.teacher_model = torch.compile(self.ema) if use_teacher else self.ema
        self.sampler = ShardedBatchSampler(len(self.dataset), self.micro_batch, acc.process_index,
                                           world, loop.seed, self.start)
        self.loader = DataLoader(
            self.dataset, batch_sampler=self.sampler, num_workers=cfg.data.num_workers,
            pin_memory=acc.device.type == "cuda", persistent_workers=cfg.data.num_workers > 0,
            # Own generator: creating loader iterators must not consume the global RNG stream.
            generator=torch.Generator(),
        )
        self.monitor = Monitor(
            self.run_dir,
            MonitorConfig(grid_samples=loop.grid_samples, grid_sampler=loop.grid_sampler,
                          vae=cfg.data.vae),
            self.model_cfg, self.info, cfg.flow.path_type, acc.device, acc.autocast)
        self.probe = self._quality_probe(cfg.fid) if cfg.fid.every > 0 else None
        self.last_quality: dict | None = None  # the probe's latest record (main process)

    def _quality_probe(self, fid: FIDConfig) -> QualityProbe:
        cfg = self.cfg
        return QualityProbe(fid, self.accelerator, self.model_cfg, self.info, cfg.flow.path_type,
                            cfg.data.vae, digits=cfg.data.data_dir == "digits")

    def _evaluates_digits(self) -> bool:
        return self.cfg.data.data_dir == "digits" and self.cfg.loop.eval_digits

    # -- checkpoints ---------------------------------------------------------------------------
    def resolved_config(self) -> dict:
        d = self.cfg.to_dict()
        d["model"] = self.model_cfg.to_dict()
        d["model"]["name"] = self.cfg.model.name
        d["data_info"] = self.info.to_dict()
        d["num_processes"] = self.accelerator.num_processes
        d["micro_batch_per_process"] = self.micro_batch
        return d

    def save(self, position: Position) -> Path | None:
        """Write ``checkpoints/step-NNNNNNN/`` (all processes call this); None if refused."""
        acc, loop = self.accelerator, self.cfg.loop
        meta = {"step": self.step, "data": vars(position),
                "images_seen": self.step * loop.global_batch_size, "skipped": self.skipped,
                "world_size": acc.num_processes, "config": self.resolved_config()}
        path = ckpt.save_checkpoint(acc, self.run_dir, self.step, acc.unwrap_model(self.model),
                                    self.ema, self.optimizer, meta, loop.keep_last, loop.milestone_steps)
        if path is None:
            log.error("refusing to write a checkpoint at step %d: non-finite weights", self.step)
        else:
            self.saved_step = self.step
        return path

    # -- one optimizer step ----------------------------------------------------------------------
    def _train_step(self, batches) -> tuple[dict[str, torch.Tensor], torch.Tensor, float]:
        """Accumulate ``A`` micro-batches, clip, step AdamW and the EMA. Returns device tensors
        (the step's statistics and whether it was finite) and the alignment weight; no sync."""
        acc, cfg = self.accelerator, self.cfg
        A = cfg.loop.gradient_accumulation_steps
        stats: dict[str, torch.Tensor] = {}
        for k in range(A):
            batch = next(batches)  # (x, y), or (x, image, y): latents with their images (REPA)
            x, y = batch[0], batch[-1]
            x0 = draw_latents(x.to(acc.device, non_blocking=True), self.info)
            y = y.to(acc.device, non_blocking=True)
            # REPA's clean images: the batch's, or x0 itself for pixel data (the digits)
            extra = {"images": batch[1].to(acc.device, non_blocking=True) if len(batch) == 3
                     else x0} if getattr(self.objective, "needs_images", False) else {}
            # DDP all-reduces gradients only on the last micro-batch of the step.
            sync = contextlib.nullcontext() if k == A - 1 else acc.no_sync(self.model)
            with sync:
                with acc.autocast():  # the teacher runs under the same autocast
                    out = self.objective(self.forward_model, self.teacher_model, x0, y, self.step,
                                         **extra)
                acc.backward(out.total / A)  # outside autocast, as the AMP recipe asks
            for key, v in {"loss": out.total.detach(), "denoise": out.denoise,
                           "align": out.align, **out.stats}.items():
                stats[key] = stats[key] + v.float() / A if key in stats else v.float() / A
        # Gradients are all-reduced by now, so the norm (and `finite`) agree on every process.
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.optim.max_grad_norm)
        finite = torch.isfinite(grad_norm)
        self._optimizer_step(finite)
        update_ema(self.ema, acc.unwrap_model(self.model), ema_decay(cfg.ema, self.step), apply=finite)
        self.nonfinite.update(finite)
        stats["grad_norm"] = grad_norm.float()
        return stats, finite, out.weight

    def _optimizer_step(self, finite: torch.Tensor) -> None:
        """AdamW step, skipped where ``finite`` is False — decided on the device."""
        opt, acc = self.optimizer, self.accelerator
        inner = opt.optimizer  # accelerate's wrapper around torch's AdamW
        if acc.scaler is not None:
            opt.step()  # fp16: the grad scaler skips non-finite steps itself
        elif self.fused:
            # The fused kernel takes `found_inf` (what GradScaler hands it) and leaves parameters,
            # moments and the step count untouched where it is 1: a skip without a host sync.
            inner.found_inf = (~finite).to(torch.float32)
            try:
                opt.step()
            finally:
                del inner.found_inf
        elif bool(finite):  # sync point: only optimizers without the fused kernel get here
            opt.step()
        opt.zero_grad(set_to_none=True)

    # -- the loop --------------------------------------------------------------------------------
    def fit(self) -> Path:
        """Train to ``loop.max_train_steps`` (or finish a complete run's outputs); the run dir."""
        cfg, loop, acc = self.cfg, self.cfg.loop, self.accelerator
        self._begin()
        stop = StopFlag()
        stop.install()
        window = StatsWindow()
        micro_done = 0
        timer = RateTimer()
        metrics_path = self.run_dir / METRICS_FILE
        bar = tqdm(total=loop.max_train_steps, initial=min(self.step, loop.max_train_steps),
                   disable=not acc.is_main_process, desc="train", dynamic_ncols=True)
        batches = iter(self.loader)
        try:
            while self.step < loop.max_train_steps:
                lr = learning_rate(cfg.optim, self.step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                stats, finite, weight = self._train_step(batches)
                micro_done += loop.gradient_accumulation_steps
                self.step += 1
                bar.update(1)
                window.add(stats, finite)
                position = advance(self.start, micro_done, self.sampler.batches_per_epoch)
                last = self.step == loop.max_train_steps
                log_step = self.step % loop.log_every == 0 or last
                ckpt_step = self.step % loop.checkpoint_steps == 0
                if log_step or ckpt_step:
                    self._check_health()  # sync point
                if log_step:
                    rates = timer.rates(window.steps, loop.global_batch_size)
                    rec = window.read()  # sync point
                    self._log(dict(rec, step=self.step, lr=lr, weight=weight, skipped=self.skipped,
                                   epoch=position.epoch, **rates), metrics_path, bar)
                if self.probe is not None and self.step % cfg.fid.every == 0:
                    self._log_quality(self.probe(self.ema, self.step), metrics_path)  # sync point
                if loop.sample_steps and self.step % loop.sample_steps == 0 and acc.is_main_process:
                    self.monitor.snapshot(self.ema, self.step, cfg.exp_name)
                if ckpt_step:
                    self.save(position)
                if (log_step or ckpt_step) and any_process(acc, stop.requested):  # sync point
                    log.info("stop requested: writing a checkpoint at step %d", self.step)
                    if self.saved_step != self.step:
                        self.save(position)
                    raise KeyboardInterrupt
        finally:
            bar.close()
            stop.restore()
        if self.saved_step != self.step:
            self.save(advance(self.start, micro_done, self.sampler.batches_per_epoch))
        self._finish()
        return self.run_dir

    def _begin(self) -> None:
        """Run dir, resolved config, file log, trackers; the metrics file cut back to the resumed step."""
        cfg, loop, acc = self.cfg, self.cfg.loop, self.accelerator
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.run_dir / "config.json", self.resolved_config())
            setup_run_logging(self.run_dir / "log.txt")
            truncate_metrics(self.run_dir / METRICS_FILE, self.step)
        if loop.report_to != "none":
            acc.init_trackers(cfg.exp_name, config={k: str(v) for k, v in
                                                    flatten(self.resolved_config()).items()})
        log.info("run %s: %s, %d processes, micro-batch %d, accumulation %d, global batch %d",
                 self.run_dir, cfg.model.name, acc.num_processes, self.micro_batch,
                 loop.gradient_accumulation_steps, loop.global_batch_size)
        if acc.is_main_process:
            for note in self.notes:
                log.warning(note)
        if self.resume_from:
            log.info("resumed from %s at step %d", self.resume_from, self.step)
        self.was_complete = self.step >= loop.max_train_steps
        if self.was_complete:
            log.info("the run is complete (step %d of %d); finishing its outputs",
                     self.step, loop.max_train_steps)

    def _log(self, rec: dict, metrics_path: Path, bar) -> None:
        acc = self.accelerator
        rec = reduce_mean(acc, rec)
        if acc.is_main_process:
            with writing(metrics_path), open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{rec.get('loss', float('nan')):.4f}",
                            align=f"{rec.get('align', 0):.3f}")
            log.info("step %d loss %.5f denoise %.5f align %.4f grad %.3f %.2f it/s",
                     rec["step"], rec.get("loss", math.nan), rec.get("denoise", math.nan),
                     rec.get("align", 0.0), rec.get("grad_norm", math.nan), rec["steps_per_s"])
        acc.log({k: v for k, v in rec.items() if k != "step"}, step=rec["step"])

    def _check_health(self) -> None:
        """Apply the non-finite policy: skipped steps are counted; K in a row stop the run."""
        self.skipped, worst = self.nonfinite.read()  # sync point
        k = self.cfg.loop.max_consecutive_skips
        if worst:
            log.warning("non-finite loss/gradients: update skipped (%d in a row at most since the "
                        "last check, %d in all, by step %d)", worst, self.skipped, self.step)
        if worst >= k:
            raise SraError(f"stopping: {k} consecutive non-finite steps reached by step {self.step} "
                           f"(lower the learning rate, or use bf16 instead of fp16)")

    def _finish(self) -> None:
        """After the last step: final grid and curves, the replica check, the digits metric."""
        acc = self.accelerator
        if acc.is_main_process:
            final_grid = self.run_dir / "samples" / f"step-{self.step:07d}.png"
            if not final_grid.is_file():
                self.monitor.snapshot(self.ema, self.step, self.cfg.exp_name)
            else:
                self.monitor.curves(self.cfg.exp_name)
        check_replicas(acc, self.ema, self.run_dir)
        n, fid = self.cfg.loop.eval_samples, self.cfg.fid
        if self._evaluates_digits() and n >= 2 and not evaluated(self.run_dir, self.step):
            # The same probe as --fid-every (its sampler and seed), with eval_samples samples; when
            # it just ran at this step with as many samples, its record is this very number.
            probe, rec = self.probe, self.last_quality
            if not (probe is not None and self.step % fid.every == 0 and fid.samples == n):
                probe = self._quality_probe(replace(fid, samples=n))
                rec = probe(self.ema, self.step)
            if acc.is_main_process:
                write_eval_digits(self.run_dir, self.step, rec, probe.sampler)
        acc.wait_for_everyone()
        acc.end_training()

    def _log_quality(self, rec: dict | None, metrics_path: Path) -> None:
        """A quality record (main process only has one) into metrics.jsonl and the trackers."""
        if rec is None:
            return
        self.last_quality = rec
        with writing(metrics_path), open(metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        self.accelerator.log({k: v for k, v in rec.items() if k != "step"}, step=rec["step"])


def train(cfg: TrainConfig, resume: str | None = None) -> Path:
    """Train per ``cfg`` (resuming from a checkpoint path or ``"auto"``); returns the run dir."""
    return Trainer(cfg, resume).fit()
