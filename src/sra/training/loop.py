"""The training loop on HuggingFace accelerate. No math lives here: the objective computes the
losses, :mod:`sra.training.ema` the EMA, :mod:`sra.training.checkpoint` the files,
:mod:`sra.training.monitor` the grids and the digits metric.

Batch sizes: ``loop.global_batch_size`` counts samples per optimizer step over all processes
and accumulation steps; each process's micro-batch is global / (processes × accumulation).

Host–device syncs: a step never reads a tensor on the host. Statistics, the non-finite-step
count, the compute clock and the stop flag are read at log and checkpoint steps only (marked
"sync point"). Several processes see one run directory; the main process alone reads the disk
to decide (e.g. what to resume) and broadcasts (:mod:`sra.training.launch`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sra.atomic import atomic_write_json
from sra.data.base import DataInfo, draw_latents
from sra.devices import set_tf32
from sra.errors import SraError
from sra.models import build_model
from sra.runlock import hold, release
from sra.training import checkpoint as ckpt
from sra.training.batches import Position, ShardedBatchSampler, advance, make_loader
from sra.training.bookkeeping import (RateTimer, StatsWindow, StopFlag, any_process,
                                      append_record, build_accelerator, check_replicas,
                                      ddp_ignore_buffers, flatten,
                                      head_anchor, reduce_mean, setup_run_logging,
                                      truncate_metrics)
from sra.training.compute import ComputeClock
from sra.training.config import (TrainConfig, build_objective, open_dataset, resolve_model_config,
                                 resolved_config)
from sra.training.ema import EMAUpdater, ema_decay, make_ema
from sra.training.fid import FIDConfig, QualityProbe, evaluated, write_eval_digits
from sra.training.health import Health, nonfinite_inputs, overflowed
from sra.training.launch import check_shared_run_dir
from sra.training.monitor import METRICS_FILE, Monitor, MonitorConfig
from sra.training.optim import build_optimizer, learning_rate, optimizer_step
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
        set_tf32(loop.allow_tf32, acc.device)
        check_shared_run_dir(acc, self.run_dir)

        # Data, model and the checkpoint to resume: all validated before anything is written.
        self.dataset = open_dataset(cfg)
        self.info: DataInfo = self.dataset.info
        self.model_cfg = resolve_model_config(cfg, self.info)
        state = find_resume_state(acc, self.run_dir, resume, self.notes)
        self.resume_from = state.path if state is not None else None
        if state is not None:
            check_resume_fits(state, self.model_cfg, loop, self.dataset)

        set_seed(loop.seed)  # identical initial weights (and so EMA) on every process
        model = build_model(self.model_cfg)
        model.set_fused_attention(cfg.model.fused_attn)
        if cfg.init_from and state is None:
            with acc.main_process_first():  # a download happens once, on the main process
                init_from_weights(model, cfg.init_from, self.dataset)
        model.to(acc.device)
        self.ema = make_ema(model)
        # Flattens both parameter sets on the device (one EMA kernel per dtype), before the
        # optimizer and DDP see the parameters.
        self.ema_updater = EMAUpdater(self.ema, model)
        self.raw_model = model  # unwrapped once: the EMA update and checkpoints use it
        self.head_params = list(model.ap_head.parameters()) if model.ap_head is not None else []
        opt = build_optimizer(model, cfg.optim, acc.device)
        self.fused = bool(opt.defaults.get("fused"))
        set_seed(loop.seed, device_specific=True)  # but different noise per process
        with acc.main_process_first():  # an encoder's download happens once
            self.objective = build_objective(cfg, self.model_cfg)
        at = Resumed(step=0, start=Position(), skipped=0)
        if state is not None:
            at = apply_state(state, acc, model, self.ema, opt, loop.seed, self.notes)
        self.step, self.start, self.start_step = at.step, at.start, at.step
        self.health = Health(acc, loop.max_consecutive_skips, at.skipped)
        self.skipped = at.skipped  # host copy, refreshed at every log/checkpoint step
        self.clock = ComputeClock(acc, at.compute_s)
        self.saved_step = self.step if state is not None else -1
        self.was_complete = False  # set by fit(): resumed at or past max_train_steps
        ddp_ignore_buffers(model)
        self.model, self.optimizer = acc.prepare(model, opt)
        # DDP keeps the gradients in its all-reduce buckets (gradient_as_bucket_view); zeroing
        # them in place keeps them there, setting them to None would re-allocate them each step.
        self.grads_to_none = acc.num_processes == 1
        self.forward_model = torch.compile(self.model) if loop.compile else self.model
        # The teacher's forward (blocks 1..t, no grad) is compiled too: +1–3 % per step on the
        # CPU benchmarks (SiT-B/4, digits). The EMA weights are updated in place, which compiled code sees.
        use_teacher = loop.compile and cfg.align.active
        self.teacher_model = torch.compile(self.ema) if use_teacher else self.ema
        self.sampler = ShardedBatchSampler(len(self.dataset), self.micro_batch, acc.process_index,
                                           world, loop.seed, self.start)
        self.loader = make_loader(self.dataset, self.sampler, cfg.data.num_workers, acc.device)
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

    # -- checkpoints ---------------------------------------------------------------------------
    def resolved_config(self) -> dict:
        acc = self.accelerator
        return resolved_config(self.cfg, self.model_cfg, self.info, acc.num_processes,
                               self.micro_batch, self.clock.unit)

    def save(self, position: Position) -> Path | None:
        """Write ``checkpoints/step-NNNNNNN/`` (all processes call this); None if refused."""
        acc, loop = self.accelerator, self.cfg.loop
        meta = {"step": self.step, "data": vars(position),
                "images_seen": self.step * loop.global_batch_size, "skipped": self.skipped,
                "compute_s": self.clock.total(),  # sync point (checkpoint steps only)
                "world_size": acc.num_processes, "config": self.resolved_config()}
        with self.clock.paused():
            path = ckpt.save_checkpoint(acc, self.run_dir, self.step, self.raw_model, self.ema,
                                        self.optimizer, meta, loop.keep_last, loop.milestone_steps)
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
                loss = out.total
                if out.weight == 0 and self.head_params:  # a host float: no sync
                    # λ = 0 at this step (--align-until, a decayed schedule): the head gets zero
                    # gradients instead of none, so DDP sees every parameter used.
                    loss = loss + head_anchor(self.head_params)
                acc.backward(loss / A)  # outside autocast, as the AMP recipe asks
            for key, v in {"loss": out.total.detach(), "denoise": out.denoise,
                           "align": out.align, **out.stats}.items():
                stats[key] = stats[key] + v.float() / A if key in stats else v.float() / A
        # Gradients are all-reduced by now, so the norm (and `finite`) agree on every process.
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.optim.max_grad_norm)
        finite = torch.isfinite(grad_norm)
        optimizer_step(self.optimizer, acc.scaler, self.fused, finite, self.grads_to_none)
        self.ema_updater.update(ema_decay(cfg.ema, self.step), apply=finite)
        self.health.guard.update(finite, overflowed(finite, stats["loss"], acc.scaler), self.step)
        stats["grad_norm"] = grad_norm.float()
        return stats, finite, out.weight

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
        self.clock.start()
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
                    with self.clock.paused():
                        self.skipped = self.health.check(  # sync point
                            self.step, self._bad_samples, self.dataset, loop.global_batch_size)
                if log_step:
                    rates = timer.rates(window.steps, loop.global_batch_size)
                    rec = reduce_mean(acc, window.read())  # sync point
                    self._log(dict(rec, step=self.step, lr=lr, weight=weight, skipped=self.skipped,
                                   epoch=position.epoch, **rates, **self._progress()),
                              metrics_path, bar)
                if self.probe is not None and self.step % cfg.fid.every == 0:
                    progress = self._progress()  # sync point
                    with self.clock.paused():
                        self._log_quality(self.probe(self.ema, self.step), progress, metrics_path)
                if loop.sample_steps and self.step % loop.sample_steps == 0 and acc.is_main_process:
                    with self.clock.paused():
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
        self.clock.stop()
        self._finish()
        release(self.run_dir)  # the launch is over: the next one may take the run dir
        return self.run_dir

    def _progress(self) -> dict:
        """The x-axes of a record: images seen and cumulative compute (a collective)."""
        return {"images_seen": self.step * self.cfg.loop.global_batch_size,
                "compute_s": round(self.clock.total(), 3)}

    def _bad_samples(self, step: int) -> list[int]:
        """This process's dataset indices of step ``step`` (0-based) holding NaN/inf."""
        return nonfinite_inputs(self.dataset, self.sampler, self.start, step - self.start_step,
                                self.cfg.loop.gradient_accumulation_steps)

    def _begin(self) -> None:
        """Run dir, resolved config, file log, trackers; the metrics file cut back to the resumed
        step; what the evaluations need is fetched now, not while the other processes wait."""
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
        with ckpt.preserved_rng():
            evaluates = (self.probe is not None and not self.was_complete
                         and cfg.fid.every <= loop.max_train_steps)
            if evaluates:
                self.probe.prepare()
            if acc.is_main_process:
                self.monitor.prepare()

    def _log(self, rec: dict, metrics_path: Path, bar) -> None:
        append_record(self.accelerator, metrics_path, rec)
        if self.accelerator.is_main_process:
            bar.set_postfix(loss=f"{rec.get('loss', float('nan')):.4f}",
                            align=f"{rec.get('align', 0):.3f}")
            log.info("step %d loss %.5f denoise %.5f align %.4f grad %.3f %.2f it/s",
                     rec["step"], rec.get("loss", math.nan), rec.get("denoise", math.nan),
                     rec.get("align", 0.0), rec.get("grad_norm", math.nan), rec["steps_per_s"])

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
        loop, fid = self.cfg.loop, self.cfg.fid
        n, digits = loop.eval_samples, self.cfg.data.data_dir == "digits" and loop.eval_digits
        if digits and n >= 2 and not evaluated(self.run_dir, self.step):
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

    def _log_quality(self, rec: dict | None, progress: dict, metrics_path: Path) -> None:
        """A quality record (main process only has one) into metrics.jsonl and the trackers."""
        if rec is not None:
            self.last_quality = dict(rec, **progress)
            append_record(self.accelerator, metrics_path, self.last_quality)


def train(cfg: TrainConfig, resume: str | None = None) -> Path:
    """Train per ``cfg`` (resuming from a checkpoint path or ``"auto"``); returns the run dir."""
    return Trainer(cfg, resume).fit()
