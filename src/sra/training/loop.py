"""The training loop on HuggingFace accelerate. No math lives here: the objective computes the
losses, :mod:`sra.training.ema` the EMA, :mod:`sra.training.checkpoint` the files.

Batch sizes: ``loop.global_batch_size`` counts samples per optimizer step over all processes
and accumulation steps; each process's micro-batch is global / (processes × accumulation).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from sra.config import TrainConfig
from sra.data.base import DataInfo, draw_latents
from sra.errors import SraError
from sra.models import ModelConfig, build_model, model_config
from sra.objectives import SRAObjective, make_process
from sra.sampling import SamplerConfig, generate
from sra.training import checkpoint as ckpt
from sra.training.batches import Position, ShardedBatchSampler, advance
from sra.training.ema import ema_decay, make_ema, update_ema

log = logging.getLogger("sra.train")
GRID_MIN_CELL = 64  # pixels: sample-grid cells are enlarged (nearest) to at least this size


# -- set-up helpers --------------------------------------------------------------------------------
def resolve_model_config(cfg: TrainConfig, info: DataInfo) -> ModelConfig:
    """The network's config from the registry name, custom dims and the data's shape."""
    spec = cfg.model
    overrides = dict(input_size=info.size, in_channels=info.channels, num_classes=info.num_classes,
                     qk_norm=spec.qk_norm, use_head=cfg.align.active)
    for name in ("depth", "hidden_size", "num_heads", "patch_size"):
        if getattr(spec, name) is not None:
            overrides[name] = getattr(spec, name)
    mcfg = model_config(spec.name, **overrides)
    if cfg.align.active and cfg.align.teacher_block > mcfg.depth:
        raise SraError(f"block-out-t {cfg.align.teacher_block} is outside 1..{mcfg.depth} "
                       f"(the depth of {spec.name})")
    return mcfg


def load_dataset(cfg: TrainConfig):
    from sra.data import build_dataset

    return build_dataset(cfg.data.data_dir, cfg.data.resolution)


class _StopFlag:
    """SIGTERM/SIGINT ask for a clean stop: finish the step, write a checkpoint, exit."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# -- the trainer ----------------------------------------------------------------------------------
class Trainer:
    """Holds a run's state; :meth:`fit` trains to ``loop.max_train_steps``."""

    def __init__(self, cfg: TrainConfig, resume: str | None = None):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        self.cfg = cfg
        loop = cfg.loop
        self.run_dir = Path(cfg.output_dir) / cfg.exp_name
        trackers = [] if loop.report_to == "none" else [loop.report_to]
        # Several processes without CUDA: accelerate only picks gloo/MULTI_CPU when told "cpu".
        multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.accelerator = Accelerator(
            cpu=multi_cpu, mixed_precision=loop.mixed_precision, log_with=trackers or None,
            project_config=ProjectConfiguration(project_dir=str(self.run_dir),
                                                logging_dir=str(self.run_dir / "tb")),
        )
        acc = self.accelerator
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

        # Data and model (validated before anything is written).
        self.dataset = load_dataset(cfg)
        self.info: DataInfo = self.dataset.info
        self.model_cfg = resolve_model_config(cfg, self.info)
        self.resume_from = self._find_resume(resume)
        if self.resume_from is None and ckpt.latest_checkpoint(self.run_dir) is not None:
            raise SraError(f"{self.run_dir} already holds checkpoints; pass --resume auto to "
                           f"continue it or choose another --exp-name / --output-dir")

        set_seed(loop.seed)  # identical initial weights (and so EMA) on every process
        model = build_model(self.model_cfg)
        model.set_fused_attention(cfg.model.fused_attn)
        if cfg.init_from:
            self._init_weights(model, cfg.init_from)
        self.ema = make_ema(model).to(acc.device)
        # Fused AdamW exists for CUDA and (torch ≥ 2.4) CPU: one kernel instead of a per-tensor loop.
        fused = acc.device.type in ("cuda", "cpu")
        opt = torch.optim.AdamW(
            model.parameters(), lr=cfg.optim.learning_rate,
            betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2),
            weight_decay=cfg.optim.adam_weight_decay, eps=cfg.optim.adam_epsilon,
            fused=fused, foreach=None if fused else True,
        )
        set_seed(loop.seed, device_specific=True)  # but different noise per process
        self.objective = SRAObjective(make_process(self.model_cfg.family, cfg.flow), cfg.align,
                                      cfg.data.label_dropout, self.model_cfg.num_classes)
        self._decoder = None
        self._warned_vae = False
        self.step = 0
        self.start = Position()
        self.skipped = 0
        if self.resume_from is not None:
            self._load_state(model, opt, self.resume_from)
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

    # -- resume / init -------------------------------------------------------------------------
    def _find_resume(self, resume: str | None) -> Path | None:
        if not resume:
            return None
        if resume == "auto":
            return ckpt.latest_checkpoint(self.run_dir)
        path = Path(resume)
        if not path.exists():
            raise FileNotFoundError(f"--resume checkpoint not found: {path}")
        if not (path / "meta.json").is_file():
            latest = ckpt.latest_checkpoint(path)
            if latest is None:
                raise SraError(f"{path} is not a complete sra checkpoint (no meta.json)")
            return latest
        return path

    def _init_weights(self, model, source: str) -> None:
        sd, info = ckpt.load_weights(source, weights="ema")
        if not self.model_cfg.use_head:
            sd = {k: v for k, v in sd.items() if not k.startswith("ap_head.")}
        elif not any(k.startswith("ap_head.") for k in sd):
            sd = dict(sd, **{f"ap_head.{k}": v for k, v in model.ap_head.state_dict().items()})
        ckpt.load_state_dict_strict(model, sd, source)

    def _load_state(self, model, opt, path: Path) -> None:
        from safetensors.torch import load_file

        meta = ckpt.read_meta(path)
        saved_model = meta.get("config", {}).get("model")
        if saved_model and ModelConfig.from_dict(saved_model) != self.model_cfg:
            raise SraError(f"checkpoint {path} was made for a different model "
                           f"({saved_model}); the run asks for {self.model_cfg.to_dict()}")
        ckpt.load_state_dict_strict(model, load_file(path / "model.safetensors"), str(path))
        ckpt.load_state_dict_strict(self.ema, load_file(path / "ema.safetensors"), str(path))
        self.ema.to(self.accelerator.device)
        opt.load_state_dict(ckpt.safe_torch_load(path / "optimizer.pt"))
        if (path / "scaler.pt").exists() and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(ckpt.safe_torch_load(path / "scaler.pt"))
        rng_file = path / f"rng-{self.accelerator.process_index}.pt"
        if rng_file.exists():
            ckpt.set_rng_state(ckpt.safe_torch_load(rng_file))
        self.step = int(meta["step"])
        self.start = Position(**meta["data"])
        self.skipped = int(meta.get("skipped", 0))

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
        acc = self.accelerator
        model = acc.unwrap_model(self.model)
        if not (ckpt.all_finite(model) and ckpt.all_finite(self.ema)):
            log.error("refusing to write a checkpoint at step %d: non-finite weights", self.step)
            return None
        root = self.run_dir / ckpt.CKPT_DIR
        name = f"step-{self.step:07d}"
        tmp = root / f".tmp-{name}"
        if acc.is_main_process:
            tmp.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        torch.save(ckpt.rng_state(), tmp / f"rng-{acc.process_index}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            meta = {"step": self.step, "data": vars(position), "skipped": self.skipped,
                    "world_size": acc.num_processes, "config": self.resolved_config()}
            scaler = acc.scaler.state_dict() if acc.scaler is not None else None
            ckpt.write_checkpoint_files(tmp, model=model, ema=self.ema, optimizer=self.optimizer,
                                        scaler_state=scaler, meta=meta)
            ckpt.finalize_checkpoint(tmp, root / name)
            ckpt.prune_checkpoints(self.run_dir, self.cfg.loop.keep_last,
                                   self.cfg.loop.milestone_steps)
        acc.wait_for_everyone()
        return root / name

    # -- monitoring ----------------------------------------------------------------------------
    def sample_grid(self, tag: str) -> Path | None:
        """An EMA sample grid with fixed noise and labels (main process only)."""
        if not self.accelerator.is_main_process:
            return None
        from sra.viz.grid import save_grid

        n = self.cfg.loop.grid_samples
        images = self._ema_samples(n, seed=1234)
        if images.shape[-1] < GRID_MIN_CELL:  # tiny images (digits): enlarge for viewing
            factor = math.ceil(GRID_MIN_CELL / images.shape[-1])
            images = torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest")
        path = self.run_dir / "samples" / f"{tag}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_grid(images, path, nrow=int(math.ceil(math.sqrt(n))))
        return path

    def _grid_sampler(self) -> SamplerConfig:
        s = self.cfg.loop.grid_sampler
        if self.model_cfg.family == "DiT" and s.mode not in ("ddpm", "ddim"):
            s = replace(s, mode="ddpm")
        return replace(s, path_type=self.cfg.flow.path_type)

    @torch.no_grad()
    def _ema_samples(self, n: int, seed: int, labels: torch.Tensor | None = None,
                     batch: int = 256) -> torch.Tensor:
        """n EMA samples decoded to images in [-1, 1], (n, C, H, W); labels cycle the classes."""
        dev = self.accelerator.device
        g = torch.Generator().manual_seed(seed)
        m = self.model_cfg
        noise = torch.randn(n, m.in_channels, m.input_size, m.input_size, generator=g)
        if labels is None:
            labels = torch.arange(n) % m.num_classes
        out = []
        rng = torch.get_rng_state()  # sampling must not disturb training's RNG stream
        for i in range(0, n, batch):
            with self.accelerator.autocast():
                z = generate(self.ema, noise[i:i + batch].to(dev), labels[i:i + batch].to(dev),
                             self._grid_sampler(), generator=torch.Generator(dev).manual_seed(seed + i))
            out.append(z.float().cpu())
        torch.set_rng_state(rng)
        z = torch.cat(out)
        return self._decode(z)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        """Model outputs → images in [-1, 1]; latents go through the VAE when it can be loaded,
        else (no weights offline) the first 3 latent channels are shown, min-max scaled."""
        from sra.sampling.decode import ImageDecoder

        if self._decoder is None:
            self._decoder = ImageDecoder(self.info, vae=self.cfg.data.vae, device=self.accelerator.device)
        try:
            return self._decoder.decode_float(z).clamp(-1, 1).cpu()
        except (OSError, SraError, ValueError, ImportError) as exc:
            if not self._warned_vae:
                log.warning("cannot load VAE %r (%s); grids show latent channels instead",
                            self.cfg.data.vae, str(exc).splitlines()[0] if str(exc) else exc)
                self._warned_vae = True
            z = z[:, :3].float()
            lo = z.amin(dim=(1, 2, 3), keepdim=True)
            hi = z.amax(dim=(1, 2, 3), keepdim=True)
            return (z - lo) / (hi - lo).clamp_min(1e-8) * 2 - 1

    def evaluate_digits(self) -> dict | None:
        loop = self.cfg.loop
        if self.cfg.data.data_dir != "digits" or not loop.eval_digits or loop.eval_samples < 1:
            return None
        if not self.accelerator.is_main_process:
            return None
        from sra.eval.digits import digits_metrics

        n = self.cfg.loop.eval_samples
        labels = torch.arange(n) % self.model_cfg.num_classes
        images = self._ema_samples(n, seed=4321, labels=labels)
        metrics = digits_metrics(images, labels)
        with open(self.run_dir / "eval_digits.json", "w") as f:
            json.dump({"step": self.step, "num_samples": n, **metrics}, f, indent=2)
        return metrics

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> Path:
        cfg, loop, acc = self.cfg, self.cfg.loop, self.accelerator
        main = acc.is_main_process
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(self.resolved_config(), indent=2))
            _setup_file_logging(self.run_dir / "log.txt")
            _truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
        if loop.report_to != "none":
            flat = {k: str(v) for k, v in _flatten(self.resolved_config()).items()}
            acc.init_trackers(cfg.exp_name, config=flat)
        log.info("run %s: %s, %d processes, micro-batch %d, accumulation %d, global batch %d",
                 self.run_dir, cfg.model.name, acc.num_processes, self.micro_batch,
                 loop.gradient_accumulation_steps, loop.global_batch_size)
        if self.resume_from:
            log.info("resumed from %s at step %d", self.resume_from, self.step)

        stop = _StopFlag()
        stop.install()
        model, opt = self.model, self.optimizer
        base_model = acc.unwrap_model(model)
        micro_done = 0
        consecutive = 0
        window: dict[str, float] = {}
        window_n = 0
        t_window = time.perf_counter()
        metrics_path = self.run_dir / "metrics.jsonl"
        bar = tqdm(total=loop.max_train_steps, initial=self.step, disable=not main,
                   desc="train", dynamic_ncols=True)
        data_iter = iter(self.loader)
        A = loop.gradient_accumulation_steps
        try:
            while self.step < loop.max_train_steps:
                lr = cfg.optim.learning_rate * min(1.0, (self.step + 1) / max(1, cfg.optim.warmup_steps))
                for group in opt.param_groups:
                    group["lr"] = lr
                sums = None
                for k in range(A):
                    x, y = next(data_iter)
                    micro_done += 1
                    x = x.to(acc.device, non_blocking=True)
                    y = y.to(acc.device, non_blocking=True)
                    x0 = draw_latents(x, self.info)
                    sync = k == A - 1
                    ctx = acc.no_sync(model) if not sync else contextlib.nullcontext()
                    with ctx, acc.autocast():  # the teacher runs under the same autocast
                        out = self.objective(self.forward_model, self.teacher_model, x0, y, self.step)
                        acc.backward(out.total / A)
                    part = {"loss": out.total.detach(), "denoise": out.denoise, "align": out.align,
                            **out.stats}
                    sums = part if sums is None else {kk: sums[kk] + v for kk, v in part.items()}
                grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
                finite = bool(torch.isfinite(grad_norm))  # identical on every rank (all-reduced)
                if finite or acc.scaler is not None:
                    opt.step()  # under fp16 the grad scaler itself skips non-finite steps
                opt.zero_grad(set_to_none=True)
                if finite:
                    consecutive = 0
                    update_ema(self.ema, base_model, ema_decay(cfg.ema, self.step))
                else:
                    self.skipped += 1
                    consecutive += 1
                    log.warning("step %d: non-finite loss/gradients, update skipped (%d in a row, "
                                "%d in all)", self.step, consecutive, self.skipped)
                    if consecutive >= loop.max_consecutive_skips:
                        raise SraError(
                            f"stopping: {consecutive} consecutive non-finite steps at step "
                            f"{self.step} (lower the learning rate, or use bf16 instead of fp16)"
                        )
                self.step += 1
                bar.update(1)
                if finite:  # tensors: no device sync until the log step
                    for kk, v in sums.items():
                        window[kk] = window.get(kk, 0.0) + v.float() / A
                    window["grad_norm"] = window.get("grad_norm", 0.0) + grad_norm.float()
                    window_n += 1
                position = advance(self.start, micro_done, self.sampler.batches_per_epoch)

                if self.step % loop.log_every == 0 or self.step == loop.max_train_steps:
                    dt = time.perf_counter() - t_window
                    rec = {k: float(v) / max(1, window_n) for k, v in window.items()}
                    steps_in_window = loop.log_every if self.step % loop.log_every == 0 else \
                        self.step % loop.log_every
                    rec.update(step=self.step, lr=lr, weight=out.weight, skipped=self.skipped,
                               epoch=position.epoch, steps_per_s=steps_in_window / dt,
                               images_per_s=steps_in_window * loop.global_batch_size / dt)
                    rec = _reduce_mean(acc, rec)
                    if main:
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps(rec) + "\n")
                        bar.set_postfix(loss=f"{rec.get('loss', float('nan')):.4f}",
                                        align=f"{rec.get('align', 0):.3f}")
                        log.info("step %d loss %.5f denoise %.5f align %.4f grad %.3f %.2f it/s",
                                 self.step, rec.get("loss", math.nan), rec.get("denoise", math.nan),
                                 rec.get("align", 0.0), rec.get("grad_norm", math.nan),
                                 rec["steps_per_s"])
                    acc.log({k: v for k, v in rec.items() if k != "step"}, step=self.step)
                    window, window_n, t_window = {}, 0, time.perf_counter()

                if loop.sample_steps and self.step % loop.sample_steps == 0:
                    self._monitor(f"step-{self.step:07d}")
                if self.step % loop.checkpoint_steps == 0:
                    self.save(position)
                if _any(acc, stop.requested):
                    log.info("stop requested: writing a checkpoint at step %d", self.step)
                    if self.step % loop.checkpoint_steps:
                        self.save(position)
                    raise KeyboardInterrupt
        finally:
            bar.close()
            stop.restore()
        if self.step % loop.checkpoint_steps:
            self.save(advance(self.start, micro_done, self.sampler.batches_per_epoch))
        if not loop.sample_steps or self.step % loop.sample_steps:
            self._monitor(f"step-{self.step:07d}")
        self.check_replicas()
        metrics = self.evaluate_digits()
        if metrics:
            log.info("digits metric of EMA samples: %s", json.dumps(metrics))
        acc.end_training()
        return self.run_dir

    def check_replicas(self) -> list[float]:
        """Every process must hold the same EMA (the teacher); a checksum per rank is compared
        and written to ``replicas.json`` — a desynchronised run fails loudly here."""
        acc = self.accelerator
        total = torch.stack([p.detach().double().sum() for p in self.ema.parameters()]).sum()
        sums = acc.gather(total.reshape(1)).tolist()
        if acc.is_main_process:
            (self.run_dir / "replicas.json").write_text(json.dumps({"ema_checksums": sums}))
        if max(sums) != min(sums):
            raise RuntimeError(f"EMA weights differ across processes: {sums}")
        return sums

    def _monitor(self, tag: str) -> None:
        if not self.accelerator.is_main_process:
            return
        from sra.viz.curves import plot_curves

        grid = self.sample_grid(tag)
        curves = plot_curves(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png",
                             title=self.cfg.exp_name) if (self.run_dir / "metrics.jsonl").exists() else None
        log.info("wrote %s%s", grid, f" and {curves}" if curves else "")


# -- small utilities -------------------------------------------------------------------------------
def _any(acc, flag: bool) -> bool:
    if acc.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=acc.device)
    return bool(acc.reduce(t, reduction="sum").item() > 0)


def _reduce_mean(acc, rec: dict) -> dict:
    if acc.num_processes == 1:
        return rec
    keys = sorted(k for k, v in rec.items() if isinstance(v, float) and k not in ("step", "lr"))
    t = torch.tensor([rec[k] for k in keys], device=acc.device, dtype=torch.float64)
    t = acc.reduce(t, reduction="mean")
    return dict(rec, **{k: float(v) for k, v in zip(keys, t.tolist())})


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records after ``step``: a killed run may have logged past its last checkpoint, and
    the resumed run logs those steps again (a fresh run starts an empty file)."""
    if not path.exists():
        return
    from sra.viz.curves import read_jsonl

    keep = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, path)


def _setup_file_logging(path: Path) -> None:
    root = logging.getLogger("sra")
    root.setLevel(logging.INFO)
    if not any(isinstance(h, logging.FileHandler) and h.baseFilename == str(path.resolve())
               for h in root.handlers):
        fh = logging.FileHandler(path)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        root.addHandler(fh)


def train(cfg: TrainConfig, resume: str | None = None) -> Path:
    """Train per ``cfg`` (resuming from a checkpoint path or ``"auto"``); returns the run dir."""
    return Trainer(cfg, resume).fit()
