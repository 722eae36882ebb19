"""The loop's bookkeeping, kept on the device between log steps.

A training step must not wait for the accelerator: nothing in it may read a tensor's value on
the host (``.item()``, ``bool()``, ``float()``, ``.tolist()``). So the per-step statistics, the
count of skipped (non-finite) steps and the stop flag are accumulated as device tensors here
and read only at log or checkpoint steps, where the loop syncs anyway.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from datetime import timedelta
from pathlib import Path

import torch

from sra.atomic import atomic_write_json, atomic_write_text
from sra.oserrors import LogFileHandler, writing


class StatsWindow:
    """Sums of the logged statistics of the finite steps since the last read (on the device)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count: torch.Tensor | None = None
        self.steps = 0

    def add(self, stats: dict[str, torch.Tensor], finite: torch.Tensor) -> None:
        """Add one step's scalar tensors; a non-finite step contributes nothing (``where``, not
        ``·0``: NaN·0 is NaN)."""
        for k, v in stats.items():
            v = torch.where(finite, v.detach().float(), 0.0)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        f = finite.to(torch.float32)
        self.count = f if self.count is None else self.count + f
        self.steps += 1

    def read(self) -> dict[str, float]:
        """Means over the finite steps, as host floats (a host–device sync), and reset."""
        if self.count is None:
            return {}
        keys = sorted(self.sums)
        values = torch.stack([self.sums[k] for k in keys] + [self.count]).tolist()  # sync point
        n = values.pop()
        out = {k: (v / n if n > 0 else float("nan")) for k, v in zip(keys, values)}
        self.__init__()
        return out


class StopFlag:
    """SIGTERM/SIGINT ask for a clean stop: the loop checks at its next log or checkpoint step,
    writes a checkpoint and exits."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict = {}

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
        self._old = {}


def any_process(acc, flag: bool) -> bool:
    """True on every process if ``flag`` is true on any (an all-reduce: call only at sync points)."""
    if acc.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=acc.device)
    return bool(acc.reduce(t, reduction="sum").item() > 0)


def reduce_mean(acc, rec: dict) -> dict:
    """Average the float entries of a log record over processes (``step``/``lr`` excepted)."""
    if acc.num_processes == 1:
        return rec
    keys = sorted(k for k, v in rec.items() if isinstance(v, float) and k not in ("step", "lr"))
    t = torch.tensor([rec[k] for k in keys], device=acc.device, dtype=torch.float64)
    t = acc.reduce(t, reduction="mean")
    return dict(rec, **{k: float(v) for k, v in zip(keys, t.tolist())})


def json_record(rec: dict) -> str:
    """One strict-JSON line of a metrics record: a non-finite float (a NaN loss) is written as
    ``null``, never as the bare ``NaN`` that JSON readers reject."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}
    return json.dumps(clean, allow_nan=False)


def append_record(acc, path: Path, rec: dict) -> None:
    """A metrics record into ``metrics.jsonl`` (main process) and the trackers (all processes)."""
    if acc.is_main_process:
        with writing(path), open(path, "a") as f:  # a full disk: one line naming the file
            f.write(json_record(rec) + "\n")
    acc.log({k: v for k, v in rec.items() if k != "step"}, step=rec["step"])


def head_anchor(params: list[torch.Tensor]) -> torch.Tensor:
    """0 · Σ params: a zero added to the loss that gives every parameter a zero gradient. When the
    alignment weight is 0 at a step the projector head is otherwise left out of the graph, and
    DDP without ``find_unused_parameters`` (which costs a graph walk every step) would wait
    forever for its gradients."""
    return torch.stack([p.sum() for p in params]).sum() * 0.0


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (for trackers that take flat configs)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records logged after ``step`` (a killed run may have logged past its last
    checkpoint; the resumed run logs those steps again). Every other line is kept verbatim; a
    torn last line (the kill hit mid-write) is the only line that may go."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1 and not line.endswith("\n"):
                continue  # torn by the kill
            keep.append(line)  # not ours to judge: keep it
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] > step:
            continue
        keep.append(line if line.endswith("\n") else line + "\n")
    atomic_write_text(path, "".join(keep))


def check_replicas(acc, ema, run_dir: Path) -> list[float]:
    """Every process must hold the same EMA (the teacher): a checksum per process is compared
    and written to ``replicas.json`` — a desynchronised run fails loudly (edm2 checks this too)."""
    total = torch.stack([p.detach().double().sum() for p in ema.parameters()]).sum()
    sums = acc.gather(total.reshape(1)).tolist()
    if acc.is_main_process:
        atomic_write_json(run_dir / "replicas.json",
                          {"ema_checksums": sums, "world_size": acc.num_processes})
    if max(sums) != min(sums):
        raise RuntimeError(f"EMA weights differ across processes: {sums}")
    return sums


class RateTimer:
    """Steps/s and images/s over each log window (wall clock)."""

    def __init__(self) -> None:
        self.t = time.perf_counter()

    def rates(self, steps: int, global_batch: int) -> dict[str, float]:
        now = time.perf_counter()
        dt, self.t = max(now - self.t, 1e-9), now
        return {"steps_per_s": steps / dt, "images_per_s": steps * global_batch / dt}


def setup_run_logging(path: Path) -> None:
    """Everything to ``log.txt``; warnings also to the console (tqdm owns the rest of it)."""
    root = logging.getLogger("sra")
    root.setLevel(logging.INFO)
    if not any(isinstance(h, logging.FileHandler) and h.baseFilename == str(path.resolve())
               for h in root.handlers):
        fh = LogFileHandler(path)  # a refused write: one warning, no traceback per record
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        root.addHandler(fh)
    if not any(getattr(h, "_sra_console", False) for h in root.handlers):
        console = logging.StreamHandler()
        console.setLevel(logging.WARNING)
        console.setFormatter(logging.Formatter("sra: %(levelname)s: %(message)s"))
        console._sra_console = True
        root.addHandler(console)


def ddp_ignore_buffers(model: torch.nn.Module) -> None:
    """Keep ``model``'s buffers out of DDP's synchronisation. The only one is the fixed sin-cos
    position table, computed identically on every process and never trained: DDP would otherwise
    re-send it from process 0 at every forward (under ``no_sync`` too). Call before ``prepare``."""
    from torch.nn.parallel import DistributedDataParallel

    names = [name for name, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)


def build_accelerator(loop, run_dir: Path):
    """The run's ``Accelerator``: mixed precision, trackers, logs under ``run_dir/tb``, DDP and
    process-group settings. Several processes without CUDA (``accelerate launch --multi_gpu`` or
    torchrun on a CPU machine) get gloo on the CPU: accelerate picks MULTI_CPU only when told
    "cpu"."""
    from accelerate import Accelerator
    from accelerate.utils import (DistributedDataParallelKwargs, InitProcessGroupKwargs,
                                  ProjectConfiguration)

    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    trackers = [] if loop.report_to == "none" else [loop.report_to]
    handlers = [
        # gradient_as_bucket_view: the gradients live in DDP's all-reduce buckets (no second
        # copy of every gradient, no copy into the buckets each step). The buffers are kept
        # out of DDP instead (see ddp_ignore_buffers): nothing to re-broadcast every forward.
        DistributedDataParallelKwargs(gradient_as_bucket_view=True),
        # The watchdog limit of every collective: the main process alone writes and hashes
        # checkpoints (≈10 s per 11 GB at 1 GB/s, minutes on slow shared storage) while the
        # others wait at a barrier (--dist-timeout).
        InitProcessGroupKwargs(timeout=timedelta(seconds=loop.dist_timeout)),
    ]
    return Accelerator(cpu=multi_cpu, mixed_precision=loop.mixed_precision,
                       log_with=trackers or None, kwargs_handlers=handlers,
                       project_config=ProjectConfiguration(project_dir=str(run_dir),
                                                           logging_dir=str(run_dir / "tb")))
