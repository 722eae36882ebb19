"""Shared helpers of the throughput benchmarks: machine info, timing, peak memory, models, flags.

Timing: paths are run *interleaved* (A B, then B A, …) so that drift of a shared machine hits
every path alike; each path's times are summarised by their median and spread.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` after a reset (tensor memory of the
allocator). On CPU there is no allocator counter, so the process's peak resident set size is
read from ``/proc/self/status`` (``VmHWM``) after resetting it through ``/proc/self/clear_refs``
(Linux ≥ 4.0): a *process* figure that includes every model alive in the process.

FLOPs are counted in :mod:`flops`, reports written by :mod:`report`; the release's compute
path is :mod:`release_path`.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT / "src"))

from report import command_line  # noqa: E402
from sra.devices import resolve_device  # noqa: E402

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
ZERO_INIT_STD = 0.02  # std of the weights given to adaLN-Zero / output layers in benchmarks


# -- device & machine ------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on."""
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device.type,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# -- peak memory -----------------------------------------------------------------------------------
def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of the code run inside ``with``: CUDA allocator peak, or process peak RSS.

    ``peak`` is the high-water mark in bytes; ``before`` the in-use figure when entering, so
    ``peak - before`` is what the block added on top of what already lived in the process.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = ("cuda max_memory_allocated" if device.type == "cuda"
                     else "process peak RSS (VmHWM)")
        self.before = 0
        self.peak = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            try:  # "5" resets the peak RSS counter of this process (Linux ≥ 4.0)
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
            self.before = (_proc_status_kb("VmRSS") or 0) * 1024
        return self

    def __exit__(self, *exc) -> bool:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = (_proc_status_kb("VmHWM") or 0) * 1024
        return False


def release_memory(device: torch.device) -> None:
    """Hand freed memory back (CUDA cache; glibc heap via ``malloc_trim``) so that the next
    measurement's peak RSS does not start from an earlier case's high-water mark."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Total storage of the given tensors (None entries skipped)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# -- timing ----------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Seconds per call of one path, plus what the path reported (e.g. losses) and memory."""

    times: list[float]
    peak_bytes: int = 0
    added_bytes: int = 0  # max over calls of (peak − in-use before the call)
    memory_kind: str = ""

    def summary(self) -> dict:
        t = sorted(self.times)
        med = statistics.median(t)
        return {
            "median_s": med, "min_s": t[0], "max_s": t[-1],
            "spread_pct": 100.0 * (t[-1] - t[0]) / med if med > 0 else 0.0,
            "iqr_s": _quantile(t, 0.75) - _quantile(t, 0.25), "n": len(t),
            "peak_mem_bytes": self.peak_bytes, "added_mem_bytes": self.added_bytes,
            "memory_kind": self.memory_kind,
        }


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = q * (len(sorted_vals) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (pos - lo) * (sorted_vals[hi] - sorted_vals[lo])


def time_interleaved(
    fns: dict[str, Callable[[int], object]], device: torch.device, warmup: int, repeats: int,
    on_result: Callable[[str, int, object], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Timing]:
    """Call each ``fn(i)`` ``warmup`` + ``repeats`` times, alternating the order every round.

    ``clock``: wall time by default; ``time.process_time`` measures the process's CPU time, which
    other jobs on a shared CPU machine do not inflate (use it with one torch thread).

    ``i`` counts calls of that path from 0 (warm-up included), so paths that seed their step by
    ``i`` see identical random draws. ``on_result(name, i, result)`` gets every call's return.
    Only the ``repeats`` rounds after the warm-up are timed; memory is tracked in all of them.
    """
    names = list(fns)
    timings = {n: Timing([]) for n in names}
    for r in range(warmup + repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            synchronize(device)
            with PeakMemory(device) as mem:
                t0 = clock()
                result = fns[name](r)
                synchronize(device)
                dt = clock() - t0
            tm = timings[name]
            tm.memory_kind = mem.kind
            if r >= warmup:
                tm.times.append(dt)
                tm.peak_bytes = max(tm.peak_bytes, mem.peak)
                tm.added_bytes = max(tm.added_bytes, mem.peak - mem.before)
            if on_result is not None:
                on_result(name, r, result)
    return timings


def add_speedups(paths: dict[str, dict]) -> None:
    """Give every path but "release" its ``speedup_vs_release`` (ratio of median times)."""
    ref = paths["release"]["median_s"]
    for k, p in paths.items():
        if k != "release":
            p["speedup_vs_release"] = ref / p["median_s"]


# -- models ----------------------------------------------------------------------------------------
@torch.no_grad()
def unzero_init(model: nn.Module, seed: int, std: float = ZERO_INIT_STD) -> nn.Module:
    """Give the adaLN-Zero modulations and the output layer small random weights.

    A freshly initialised adaLN-Zero model has every block gated off (its output is zero), which
    would make numerical comparisons of attention paths or sampler states trivially exact.
    """
    g = torch.Generator().manual_seed(seed)
    layers = [b.adaLN_modulation[-1] for b in model.blocks]
    layers += [model.final_layer.adaLN_modulation[-1], model.final_layer.linear]
    for layer in layers:
        for p in (layer.weight, layer.bias):
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


# -- command line ----------------------------------------------------------------------------------
def start_results(args, script: str, argv: Sequence[str] | None) -> tuple[torch.device, dict]:
    """Apply ``--threads``, resolve ``--device`` and open the results record (machine,
    warm-up/repeats, command line, an empty list of cases)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    return device, {"machine": machine_info(device), "warmup": args.warmup,
                    "repeats": args.repeats, "command": command_line(script, argv), "cases": []}


def add_run_args(p, *, unit: str, warmup: int, repeats: int, seed_help: str) -> None:
    """Flags both timing benchmarks share: the device, warm-up and measured ``unit``, the seed."""
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--warmup", type=int, default=warmup,
                   help=f"warm-up {unit} per path (not timed)")
    p.add_argument("--repeats", type=int, default=repeats, help=f"measured {unit} per path")
    p.add_argument("--seed", type=int, default=0, help=seed_help)


def add_common_args(p, section: str) -> None:
    """Flags both benchmark scripts share: threads and where results are written."""
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", default=None, help="write the results as JSON here ('-' = stdout)")
    p.add_argument("--out", default=None,
                   help="markdown file to update with the results table (e.g. docs/benchmarks.md)")
    p.add_argument("--section", default=section,
                   help="name of the marked section of --out to replace (one per configuration)")
