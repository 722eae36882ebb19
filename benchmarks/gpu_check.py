"""The GPU acceptance check: one command that measures `sra` on one H100/H200 in ≤ 8 minutes,
writes ``gpu_check.json`` and prints a markdown table ready for the README.

    python benchmarks/gpu_check.py --out gpu_check.json              # a CUDA machine
    python benchmarks/gpu_check.py --device cpu --tiny --out x.json  # the CPU dry run (tests)

On the project's device machine (torch 2.11, no diffusers, no torch-fidelity, no network)::

    PYTHONPATH=src python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json

Inception needs torch-fidelity (pure Python): carry its wheel, fetched here with
``python3 -m pip download --no-deps torch-fidelity==0.4.0 -d .whl`` (``/.whl/`` in
``.git/info/exclude``), and start the device command with
``python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
PYTHONPATH=src:/tmp/site python3 benchmarks/gpu_check.py …`` (``carry: [".whl"]``). Without
it that section reads "skipped: torch-fidelity missing". Nothing here imports diffusers: the
SD-VAE decoder is not measured (no diffusers, no weights there).

Sections, in the order they run (cheap and essential first; compiles last, since their
compile time is the least predictable): SDPA backends of the plain and the attention-separation
paths; training eager (SiT-XL/2 and SiT-B/2 SRA, SiT-B/2 DTS+AS; micro-batch 32 and 64, bf16);
50 fp16 steps with the grad scaler; sampling with ``paper-256`` (batch 64/128/256, fp32+TF32 and
bf16; a few timed solver steps per regime, extrapolated to the 250-step grid); Inception; the
resume check; training with ``--compile``. Each case asks the global budget (``--budget-s``)
before it starts and is otherwise recorded as "skipped: out of time"; a case that raises is
recorded with its error and the check goes on. All training goes through ``Trainer._train_step``
on a synthetic packed dataset; MFU counts the analytic FLOPs of :mod:`flops`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from gpu_check_base import Budget, Context  # noqa: E402
from sra.devices import set_tf32  # noqa: E402

# Cases start only inside the budget; 400 s leaves the 8-minute promise room for start-up and
# for the one case that may run past the budget's end.
DEFAULT_BUDGET_S = 400.0
SECTIONS = ("sdpa", "train", "fp16", "sampling", "inception", "resume", "train_compile")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.json", help="where the JSON results go")
    p.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (cpu needs --tiny)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny models, 1–3 steps, small batches: the dry run of every section")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help="global time budget; work that would not fit is skipped, and said so")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS,
                   help="sections to run (default: all, in this order)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="bf16 dense peak for MFU (default: 989 for an H100/H200 by its name)")
    p.add_argument("--work-dir", default=None, help="scratch folder (default: a temporary one)")
    return p.parse_args(argv)


def check_device(args) -> torch.device:
    """The device, or one line saying why this machine cannot run the check."""
    if args.device == "cpu":
        if not args.tiny:
            raise SystemExit("gpu_check: full sizes need a CUDA GPU; on CPU run the dry run "
                             "with --device cpu --tiny")
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the trainer's accelerate must not pick a GPU
        torch.set_num_threads(1)  # tiny ops on a shared CPU: threads only contend
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit(f"gpu_check: no CUDA device is available (asked for {args.device}); "
                         "on a CPU machine run the dry run with --device cpu --tiny")
    dev = torch.device(args.device)
    torch.cuda.set_device(dev)
    return dev


def machine(ctx: Context) -> dict:
    from common import machine_info

    info = machine_info(ctx.device)
    info["mode"] = "tiny dry run" if ctx.tiny else "full"
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        info.update(gpu_memory_bytes=props.total_memory,
                    multiprocessors=props.multi_processor_count)
    import accelerate

    info["accelerate"] = accelerate.__version__
    return info


def run_sections(ctx: Context, names: list[str]) -> dict:
    """Every asked section in order, each timed; one that raises is recorded, not fatal."""
    from gpu_check_base import error_row
    from gpu_check_infer import section_inception, section_sampling, section_sdpa
    from gpu_check_resume import section_resume
    from gpu_check_train import section_fp16, section_train

    table = {"sdpa": section_sdpa, "train": lambda c: section_train(c, compile_=False),
             "fp16": section_fp16, "sampling": section_sampling, "inception": section_inception,
             "resume": section_resume, "train_compile": lambda c: section_train(c, compile_=True)}
    out = {}
    for name in names:
        ctx.log(f"[gpu_check] {name} (at {ctx.budget.elapsed():.0f} s of {ctx.budget.seconds:.0f})")
        t0 = time.perf_counter()
        try:
            rec = table[name](ctx)
        except Exception as exc:  # a broken section must not cost the others their figures
            rec = {"status": error_row(exc)}
        rec["section_s"] = round(time.perf_counter() - t0, 2)
        ctx.log(f"[gpu_check] {name} done in {rec['section_s']:.1f} s")
        out[name] = rec
    return out


def main(argv=None) -> dict:
    """Run the check; returns (and writes) the results record."""
    args = parse_args(argv)
    device = check_device(args)
    set_tf32(True, device)  # as the trainer and `sra sample` run by default
    from flops import peak_tflops

    peak = args.peak_tflops
    if peak is None and device.type == "cuda":
        peak = peak_tflops(torch.cuda.get_device_name(device))
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(device, args.tiny, work, Budget(args.budget_s), peak)
    results = {"machine": machine(ctx), "budget_s": args.budget_s, "peak_tflops": peak,
               "command": " ".join(["python", "benchmarks/gpu_check.py", *(argv or sys.argv[1:])])}
    if "resume" in args.sections:  # its fresh process imports torch while the others measure
        from gpu_check_resume import FreshProcess

        ctx.ahead["resume"] = FreshProcess(ctx, "cut")
    try:
        results["sections"] = run_sections(ctx, list(args.sections))
    finally:
        for proc in ctx.ahead.values():  # not used: its section was skipped or failed early
            proc.close()
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    results["elapsed_s"] = round(ctx.budget.elapsed(), 1)
    from gpu_check_report import to_markdown

    table = to_markdown(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(strict(results), indent=2, allow_nan=False, default=str) + "\n")
    out.with_suffix(".md").write_text(table)
    print(table)
    ctx.log(f"[gpu_check] wrote {out} and {out.with_suffix('.md').name} in "
            f"{results['elapsed_s']:.0f} s")
    return results


def strict(obj):
    """The results with NaN/inf as null (strict JSON, like the trainer's metrics)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


if __name__ == "__main__":
    main()
