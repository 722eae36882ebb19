"""What every section of ``gpu_check.py`` shares: the run context (device, tiny sizes, the time
budget), device-side step timing, peak memory, and the rows a failed or skipped case leaves."""

from __future__ import annotations

import gc
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for _p in (str(BENCH), str(ROOT / "src")):  # run from a checkout without installing
    if _p not in sys.path:
        sys.path.insert(0, _p)

from sra.errors import first_line  # noqa: E402

OUT_OF_TIME = "skipped: out of time"


class Budget:
    """A global wall-clock budget: sections and cases ask before they start, never mid-way."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.perf_counter):
        self.seconds, self.clock = float(seconds), clock
        self.start = clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def allows(self, estimate_s: float) -> bool:
        """Whether a piece of work expected to take ``estimate_s`` still fits."""
        return self.left() >= estimate_s


@dataclass
class Context:
    """One gpu_check run: where it measures, at which sizes, with how much time."""

    device: torch.device
    tiny: bool
    work: Path  # scratch folder (packed data, checkpoints, npz files)
    budget: Budget
    peak_tflops: float | None  # bf16 dense peak for MFU; None: no MFU (CPU, unknown card)
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr, flush=True))
    ahead: dict = field(default_factory=dict)  # helper processes started early, by section

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def estimate(self, gpu_s: float) -> float:
        """The time a piece of work is budgeted on the GPU; tiny CPU work is budgeted nothing."""
        return 0.0 if self.tiny else gpu_s


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Times consecutive steps: CUDA events on the device's stream (the host may run ahead; the
    events measure the device timeline), ``perf_counter`` on CPU. ``mark()`` before each step
    and once after the last; ``seconds()`` after that gives one duration per step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: list = []

    def mark(self) -> None:
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        synchronize(self.device)
        if self.device.type == "cuda":
            return [a.elapsed_time(b) / 1000.0 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def summarise(times: list[float]) -> dict:
    """Median and spread of per-step seconds."""
    med = statistics.median(times)
    return {"median_s": med, "min_s": min(times), "max_s": max(times), "n": len(times),
            "spread_pct": 100.0 * (max(times) - min(times)) / med if med > 0 else 0.0}


class Peak:
    """Peak memory inside ``with``: ``torch.cuda.max_memory_allocated`` after a reset (CUDA), or
    the process's peak RSS (CPU: the common benchmarks' VmHWM reading; a process figure)."""

    def __init__(self, device: torch.device):
        from common import PeakMemory

        self._mem = PeakMemory(device)
        self.kind = self._mem.kind
        self.peak = 0
        self.after = 0

    def __enter__(self) -> "Peak":
        self._mem.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        self._mem.__exit__(*exc)
        self.peak = self._mem.peak
        if self._mem.device.type == "cuda":
            self.after = torch.cuda.memory_allocated(self._mem.device)
        return False


def free_memory(device: torch.device) -> None:
    """Collect garbage and hand cached blocks back, so the next case starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def error_row(exc: BaseException) -> str:
    """The status of a case that raised: one line naming the exception."""
    return "error: " + first_line(exc, with_type=True, limit=160)


def run_case(ctx: Context, name: str, estimate_gpu_s: float, fn: Callable[[], dict]) -> dict:
    """``fn()``'s record with ``status`` ok, or a row saying why there is none: out of time
    (asked before starting), or the error it raised (the check goes on with the next case)."""
    if not ctx.budget.allows(ctx.estimate(estimate_gpu_s)):
        ctx.log(f"  {name}: {OUT_OF_TIME}")
        return {"status": OUT_OF_TIME}
    t0 = time.perf_counter()
    try:
        rec = fn()
        rec.setdefault("status", "ok")
    except Exception as exc:  # an OOM or a compile failure must not cost the other figures
        rec = {"status": error_row(exc)}
        free_memory(ctx.device)
    rec["elapsed_s"] = round(time.perf_counter() - t0, 2)
    ctx.log(f"  {name}: {rec['status']} ({rec['elapsed_s']:.1f} s)")
    return rec
