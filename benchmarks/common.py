"""Shared helpers of the throughput benchmarks: timing, peak memory, analytic FLOPs, reporting.

Timing: paths are run *interleaved* (A B, then B A, …) so that drift of a shared machine hits
every path alike; each path's times are summarised by their median and spread.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` after a reset (tensor memory of the
allocator). On CPU there is no allocator counter, so the process's peak resident set size is
read from ``/proc/self/status`` (``VmHWM``) after resetting it through ``/proc/self/clear_refs``
(Linux ≥ 4.0): a *process* figure that includes every model alive in the process.

FLOPs: counted analytically from the architecture (multiply-accumulates, ×2 for FLOPs), see
:func:`forward_macs`. SiT-XL/2 at 256 px (32×32×4 latents) gives 118.6 GMAC per image.
"""

from __future__ import annotations

import ctypes
import gc
import json
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

from sra.models.registry import ModelConfig  # noqa: E402

H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM bf16 dense tensor-core peak (no sparsity)
SIT_XL2_256_GMAC = 118.6  # the DiT/SiT papers' forward cost of XL/2 at 256 px, per image
ZERO_INIT_STD = 0.02  # std of the weights given to adaLN-Zero / output layers in benchmarks


# -- device & machine ------------------------------------------------------------------------------
def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


def describe_machine(info: dict) -> str:
    """One line for reports."""
    dev = info.get("gpu") or f"CPU {info['cpu']} ({info['cpu_count']} cores visible)"
    line = (f"{dev}; torch {info['torch']}, torch threads: {info['torch_threads']}, "
            f"python {info['python']}")
    if info.get("load_avg_1m") is not None:
        line += f"; 1-min load average at start {info['load_avg_1m']:.2f}"
    return line


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
) -> dict[str, Timing]:
    """Call each ``fn(i)`` ``warmup`` + ``repeats`` times, alternating the order every round.

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
                t0 = time.perf_counter()
                result = fns[name](r)
                synchronize(device)
                dt = time.perf_counter() - t0
            tm = timings[name]
            tm.memory_kind = mem.kind
            if r >= warmup:
                tm.times.append(dt)
                tm.peak_bytes = max(tm.peak_bytes, mem.peak)
                tm.added_bytes = max(tm.added_bytes, mem.peak - mem.before)
            if on_result is not None:
                on_result(name, r, result)
    return timings


# -- analytic FLOPs --------------------------------------------------------------------------------
def block_macs(cfg: ModelConfig) -> int:
    """Multiply-accumulates of one adaLN-Zero block for one image.

    Per token: qkv 3D², attention projection D², MLP 2·(mlp_ratio·D²) (8D² at ratio 4), plus
    the attention itself, 2·T·D (q·kᵀ and attn·v over T keys); per image: adaLN Linear(D, 6D).
    Element-wise work (norms, softmax, GELU, modulation) is not counted, as is usual.
    """
    D, T = cfg.hidden_size, cfg.num_tokens
    mlp_hidden = int(D * cfg.mlp_ratio)
    per_token = 3 * D * D + D * D + 2 * D * mlp_hidden + 2 * T * D
    return T * per_token + D * 6 * D


def forward_macs(
    cfg: ModelConfig, *, blocks: int | None = None, final_layer: bool = True,
    head_tokens_blocks: int = 0,
) -> int:
    """MACs of one image's forward through the embedders, ``blocks`` blocks (all by default),
    optionally the final layer, and the SRA head on ``head_tokens_blocks`` blocks' tokens."""
    D, T, p = cfg.hidden_size, cfg.num_tokens, cfg.patch_size
    n_blocks = cfg.depth if blocks is None else blocks
    macs = T * (p * p * cfg.in_channels) * D  # patch-embedding conv
    macs += 256 * D + D * D  # time embedder MLP (frequency dim 256)
    macs += n_blocks * block_macs(cfg)
    if final_layer:
        macs += D * 2 * D + T * D * (p * p * cfg.out_channels)
    if head_tokens_blocks:
        hd = cfg.head_dim
        macs += head_tokens_blocks * T * (D * hd + hd * D)
    return macs


def train_step_flops(cfg: ModelConfig, teacher_blocks: int | None, *, full_teacher: bool = False,
                     use_head: bool = True) -> dict:
    """FLOPs per image of one SRA training step: 3 × the student's forward (forward + backward
    ≈ 2 × forward) plus the teacher's no-grad forward (blocks 1..t, no final layer; or the full
    network with ``full_teacher``). With ``teacher_blocks=None`` there is no teacher."""
    student = 2 * forward_macs(cfg, head_tokens_blocks=1 if use_head else 0)
    if teacher_blocks is None:
        teacher = 0
    elif full_teacher:
        teacher = 2 * forward_macs(cfg)
    else:
        teacher = 2 * forward_macs(cfg, blocks=teacher_blocks, final_layer=False)
    return {"student_fwd": student, "teacher_fwd": teacher, "step": 3 * student + teacher}


def mfu(flops_per_step: float, step_seconds: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the card's peak (None without a peak)."""
    if not peak_tflops or step_seconds <= 0:
        return None
    return flops_per_step / step_seconds / (peak_tflops * 1e12)


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


# -- reporting -------------------------------------------------------------------------------------
def fmt_bytes(n: float) -> str:
    """1536 → '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(path: str | os.PathLike, name: str, markdown: str) -> None:
    """Put ``markdown`` between ``<!-- name:begin -->`` / ``<!-- name:end -->`` in ``path``
    (replacing an earlier version of that section, or appending it)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{markdown.rstrip()}\n{end}\n"
    p = Path(path)
    text = p.read_text() if p.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block.rstrip("\n") + tail
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "") + block
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


OUTPUT_FLAGS = ("--out", "--section", "--json")  # where results go, not what is measured


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The benchmark's command line for reports, without the output-only flags."""
    args = list(sys.argv[1:] if argv is None else argv)
    kept, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in OUTPUT_FLAGS:
            skip = True
        elif not a.startswith(tuple(f + "=" for f in OUTPUT_FLAGS)):
            kept.append(a)
    return " ".join([script, *kept])


def dump_json(obj: dict, path: str | os.PathLike | None) -> None:
    """Write results as JSON (to stdout when ``path`` is ``-``)."""
    if path is None:
        return
    text = json.dumps(obj, indent=2, default=str)
    if str(path) == "-":
        print(text)
    else:
        Path(path).write_text(text + "\n")


def publish(results: dict, markdown: str, args) -> None:
    """Print the report, and write it where the common flags say (``--out``/``--section``, ``--json``)."""
    print(markdown)
    if args.out:
        write_section(args.out, args.section, markdown)
    dump_json(results, args.json)


def add_common_args(p, section: str) -> None:
    """Flags both benchmark scripts share: threads and where results are written."""
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", default=None, help="write the results as JSON here ('-' = stdout)")
    p.add_argument("--out", default=None,
                   help="markdown file to update with the results table (e.g. docs/benchmarks.md)")
    p.add_argument("--section", default=section,
                   help="name of the marked section of --out to replace (one per configuration)")
