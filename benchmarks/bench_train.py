"""Training-step throughput: our compute path against the release's, side by side in one run.

    .venv/bin/python benchmarks/bench_train.py                       # CPU: SiT-B/4 @32², digits
    .venv/bin/python benchmarks/bench_train.py --case sit-xl2 --batch 32 64 --compile  # a GPU
    .venv/bin/python benchmarks/bench_train.py --out docs/benchmarks.md --json results.json

Both paths are the same code (:class:`~sra.objectives.SRAObjective`, the same model, batch,
seed, step function); the release's compute path is re-created by switching options and by the
pieces in :mod:`release_path` (its teacher wrapper and EMA loop):

=========================  ==========================================  =========================
choice                     ours                                        release
=========================  ==========================================  =========================
teacher forward            blocks 1..t only (``stop_after``)           every block + final layer
                                                                       (:class:`ReleaseTeacher`)
teacher precision          the student's autocast                      fp32, outside autocast
attention                  SDPA                                        explicit softmax(qkᵀ)v
AdamW                      fused (CUDA and CPU), as the loop           ``foreach=False`` loop
EMA                        one flat lerp per dtype (:class:`EMAUpdater`) python loop, mul_/add_
                                                                       (:func:`update_ema_loop`)
compile (``--compile``)    "ours+compile": student and teacher         never
                           forwards, as ``sra train --compile``
=========================  ==========================================  =========================

Every call of a path seeds the global RNG with the same value, so step i of every path draws
the same label dropout, times, noise and teacher gap: the step-0 losses must agree (exactly
up to float rounding in fp32; within bf16 rounding when only the release's teacher is fp32).
On CPU the steps run interleaved (A B, B A, …) to cancel machine drift; on CUDA the paths run
one after another (``--order``) since several XL copies with optimizer state would not fit.
The median step time is reported.
"""

from __future__ import annotations

import argparse
import copy
import sys
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from common import (  # noqa: E402
    AMP_DTYPES, add_common_args, add_run_args, add_speedups, release_memory, start_results,
    tensor_bytes, time_interleaved, unzero_init,
)
from flops import H100_BF16_DENSE_TFLOPS, mfu, train_step_flops  # noqa: E402
from release_path import ReleaseTeacher, update_ema_loop  # noqa: E402
from train_cases import TrainCase, make_batch, make_case  # noqa: E402
from report import (  # noqa: E402
    amp_name, fmt_bytes, fmt_peak, fmt_speedup, markdown_table, memory_kind, path_legend, publish,
    run_line,
)
from sra.models import build_model  # noqa: E402
from sra.objectives import FlowConfig, SRAObjective, make_process  # noqa: E402
from sra.training.ema import EMAUpdater, make_ema  # noqa: E402

# Release defaults (docs/method.md §4.4): AdamW, clip, EMA decay, label dropout.
LR, BETAS, EPS, WEIGHT_DECAY = 1e-4, (0.9, 0.999), 1e-8, 0.0
MAX_GRAD_NORM = 1.0
EMA_DECAY = 0.9999
LABEL_DROPOUT = 0.1
LOSS_TOL_FP32 = 1e-5  # step-0 |Δloss| allowed between the paths when both run in fp32

PATH_CHOICES = {
    "ours": ("teacher stops after block t (no final layer), teacher under the same autocast, "
             "SDPA attention, AdamW fused (CUDA and CPU, as the training loop), "
             "EMA one flat lerp per dtype group"),
    "ours+compile": ("as ours, with the student and the teacher (EMA) forwards through "
                     "torch.compile (as `sra train --compile`)"),
    "release": ("teacher runs every block and the final layer, teacher outside autocast in fp32, "
                "explicit softmax attention, AdamW foreach=False (per-parameter loop), "
                "EMA python loop (mul_ then add_ per parameter)"),
}


def build_path(kind: str, base: nn.Module, case: TrainCase, device: torch.device,
               amp: torch.dtype | None, seed: int, x0: torch.Tensor, y: torch.Tensor,
               objective=None):
    """A training-step function ``step(i) -> (total, denoise, align)`` of one path on its own
    copy of ``base`` (and its own EMA and optimizer). ``objective``: another objective than SRA
    for "ours" paths (e.g. token groups, in bench_groups.py)."""
    release = kind == "release"
    model = copy.deepcopy(base).to(device).train()
    model.set_fused_attention(not release)
    ema = make_ema(model)  # equal to the model, attention setting included
    if release:
        opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS,
                                weight_decay=WEIGHT_DECAY, foreach=False, fused=False)
        teacher = ReleaseTeacher(ema, device.type)  # every block + final layer, fp32
        ema_fn = update_ema_loop
    else:  # as sra.training.loop.Trainer (torch ≥ 2.4 has the fused kernel for CPU too)
        updater = EMAUpdater(ema, model)  # flattens both, before the optimizer sees them
        opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS,
                                weight_decay=WEIGHT_DECAY, fused=True)
        teacher = ema
        ema_fn = lambda ema, model, decay, apply: updater.update(decay, apply=apply)  # noqa: E731
    forward_model = model
    if kind == "ours+compile":  # as the loop; the EMA update keeps working on ``ema`` itself
        forward_model, teacher = torch.compile(model), torch.compile(ema)
    if objective is None:
        objective = SRAObjective(make_process(case.model.family, FlowConfig()), case.align,
                                 LABEL_DROPOUT, case.model.num_classes)
        objective.check_model(case.model)

    def step(i: int):
        torch.manual_seed(seed + i)  # identical draws for step i of every path
        ctx = torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()
        with ctx:
            out = objective(forward_model, teacher, x0, y, i)
        out.total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        if release:
            opt.step()
            ema_fn(ema, model, EMA_DECAY)
        else:  # as the loop: a non-finite step is skipped on the device (no host sync)
            finite = torch.isfinite(grad_norm)
            opt.found_inf = (~finite).to(torch.float32)
            opt.step()
            del opt.found_inf
            ema_fn(ema, model, EMA_DECAY, apply=finite)
        opt.zero_grad(set_to_none=True)
        return out.total.detach(), out.denoise, out.align

    def state_bytes() -> int:
        """Persistent tensors of the path: weights, EMA, optimizer state (grads are freed)."""
        opt_state = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
        return tensor_bytes([*model.parameters(), *model.buffers(), *ema.parameters(),
                             *ema.buffers(), *opt_state])

    step.state_bytes = state_bytes
    return step


def default_paths(compile_: bool) -> list[str]:
    """ours, ours+compile when asked, release."""
    return ["ours"] + (["ours+compile"] if compile_ else []) + ["release"]


def run_case(case: TrainCase, device: torch.device, amp: torch.dtype | None, kinds: list[str],
             warmup: int, repeats: int, seed: int, peak_tflops: float | None,
             sequential: bool = False) -> dict:
    """Time every path in ``kinds`` (which must include "release") on one case; returns the
    case's result record. ``sequential``: one path at a time, each freed before the next is
    built (for models whose several copies do not fit the device together)."""
    torch.manual_seed(seed)
    base = unzero_init(build_model(case.model), seed)
    x0, y = make_batch(case, seed, device)
    losses: dict[str, list[tuple[float, float, float]]] = {k: [] for k in kinds}

    def record(name: str, i: int, result) -> None:
        losses[name].append(tuple(float(v) for v in result))

    state: dict[str, int] = {}
    release_memory(device)
    if sequential:
        timings = {}
        for k in kinds:
            step = build_path(k, base, case, device, amp, seed, x0, y)
            timings.update(time_interleaved({k: step}, device, warmup, repeats, on_result=record))
            state[k] = step.state_bytes()
            del step
            release_memory(device)
    else:
        steps = {k: build_path(k, base, case, device, amp, seed, x0, y) for k in kinds}
        timings = time_interleaved(steps, device, warmup, repeats, on_result=record)
        state = {k: s.state_bytes() for k, s in steps.items()}
        del steps
        release_memory(device)
    del base
    flops = train_step_flops(case.model, case.align.teacher_block)
    flops_release = train_step_flops(case.model, case.align.teacher_block, full_teacher=True)
    paths = {}
    for k in kinds:
        summ = timings[k].summary()
        med = summ["median_s"]
        paths[k] = {
            **summ, "images_per_s": case.batch / med, "description": PATH_CHOICES[k],
            "state_bytes": state[k],
            "loss_step0": losses[k][0][0], "denoise_step0": losses[k][0][1],
            "align_step0": losses[k][0][2], "losses": [v[0] for v in losses[k]],
            # MFU counts the FLOPs the step needs (the partial teacher) for every path.
            "mfu": mfu(flops["step"] * case.batch, med, peak_tflops),
            "tflops_per_s": flops["step"] * case.batch / med / 1e12,
        }
    add_speedups(paths)
    ref = paths["release"]
    for k in kinds:
        if k != "release":
            paths[k]["loss_step0_absdiff"] = abs(paths[k]["loss_step0"] - ref["loss_step0"])
            paths[k]["loss_max_absdiff"] = max(
                abs(a - b) for a, b in zip(paths[k]["losses"], ref["losses"]))
    return {
        "case": case.name, "title": case.title, "batch": case.batch,
        "order": "sequential" if sequential else "interleaved", "model": case.model.to_dict(),
        "align": {"student_block": case.align.student_block,
                  "teacher_block": case.align.teacher_block, "loss_type": case.align.loss_type},
        "amp": amp_name(amp),
        "flops_per_image": {"ours_needed": flops, "release_executed": flops_release},
        "paths": paths,
    }


def to_markdown(results: dict) -> str:
    """The results as a markdown section."""
    lines = [
        "### Training step: ours vs the release's compute path",
        "",
        f"{run_line(results, 'steps')}, "
        f"{results['cases'][0]['order']}; median step time, spread = ±(max − min)/(2·median).",
        "",
    ]
    rows = []
    for c in results["cases"]:
        for k, p in c["paths"].items():
            rows.append([
                c["title"] if k == next(iter(c["paths"])) else "", c["batch"], c["amp"], k,
                f"{p['median_s'] * 1000:.1f} ms", f"±{p['spread_pct'] / 2:.0f}%",
                f"{p['images_per_s']:.1f}",
                fmt_bytes(p["state_bytes"]),
                fmt_peak(p),
                f"{p['mfu'] * 100:.1f}%" if p["mfu"] is not None else "–",
                fmt_speedup(p),
                f"{p['loss_step0']:.6f}",
            ])
    lines.append(markdown_table(
        ["case", "batch", "amp", "path", "step", "spread", "images/s", "state", "peak mem (+step)",
         "MFU", "speed-up", "loss @ step 0"], rows))
    kind = memory_kind(results)
    together = any(c["order"] == "interleaved" for c in results["cases"])
    lines += ["", "state: the path's weights, EMA and optimizer state (exact tensor bytes). "
              f"peak mem: {kind} during the step, and in brackets what the step added on top of "
              "what was resident before it"
              + ("; interleaved, the process holds every path's state at once." if together
                 else ".")]
    lines += ["", "Paths:"] + path_legend(PATH_CHOICES, results)
    for c in results["cases"]:
        f = c["flops_per_image"]
        lines.append(f"- {c['title']}: {f['ours_needed']['step'] / 1e9:.2f} GFLOP per image per "
                     f"step needed (3 × student forward + teacher to block "
                     f"{c['align']['teacher_block']}); the release executes "
                     f"{f['release_executed']['step'] / 1e9:.2f}.")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", nargs="+", default=None,
                   help="cases to run: sit-b4, digits, sit-xl2, tiny (default: sit-b4 digits on "
                        "CPU, sit-xl2 on CUDA)")
    p.add_argument("--batch", nargs="+", type=int, default=None,
                   help="batch sizes (each case runs once per size; default: the case's own; "
                        "sit-xl2 on CUDA: 32 64)")
    p.add_argument("--amp", default="auto", choices=["auto", *AMP_DTYPES],
                   help="autocast dtype of the step (auto: bf16 on CUDA, none on CPU)")
    p.add_argument("--compile", action="store_true",
                   help="also time ours+compile (student and teacher forwards compiled, as "
                        "`sra train --compile`)")
    p.add_argument("--paths", nargs="+", default=None, choices=list(PATH_CHOICES),
                   help="paths to time (release is always added; default: ours, the compile "
                        "paths with --compile, release)")
    p.add_argument("--order", default="auto", choices=["auto", "interleaved", "sequential"],
                   help="interleave the paths step by step (all resident at once) or run them one "
                        "after another (auto: sequential on CUDA, where several XL copies with "
                        "optimizer state would not fit, interleaved on CPU)")
    add_run_args(p, unit="steps", warmup=3, repeats=10,
                 seed_help="weights, batch and per-step RNG seed")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help=f"the device's peak TFLOP/s for MFU (default: {H100_BF16_DENSE_TFLOPS:g} "
                        "= H100 bf16 dense on CUDA, none on CPU)")
    add_common_args(p, section="bench_train")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Run the benchmark; returns ``{"machine", "cases": [...], ...}`` (see :func:`run_case`)."""
    args = parse_args(argv)
    device, results = start_results(args, "bench_train.py", argv)
    cuda = device.type == "cuda"
    amp = AMP_DTYPES[("bf16" if cuda else "none") if args.amp == "auto" else args.amp]
    peak = args.peak_tflops
    if peak is None:
        peak = H100_BF16_DENSE_TFLOPS if cuda else None
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # as the training loop does
        torch.backends.cudnn.allow_tf32 = True
    names = args.case or (["sit-xl2"] if cuda else ["sit-b4", "digits"])
    kinds = default_paths(args.compile) if args.paths is None else \
        [k for k in PATH_CHOICES if k in args.paths or k == "release"]
    for name in names:
        case = make_case(name)
        batches = args.batch or ([32, 64] if name == "sit-xl2" else [case.batch])
        for b in batches:
            c = replace(case, batch=b)
            print(f"[bench_train] {c.title}, batch {b}, amp {amp} …", file=sys.stderr, flush=True)
            sequential = args.order == "sequential" or (args.order == "auto" and cuda)
            rec = run_case(c, device, amp, kinds, args.warmup, args.repeats, args.seed, peak,
                           sequential)
            for k, p in rec["paths"].items():
                extra = (f", {p['speedup_vs_release']:.2f}× vs release, |Δloss@0| "
                         f"{p['loss_step0_absdiff']:.2e}") if "speedup_vs_release" in p else ""
                print(f"  {k:13s} {p['median_s'] * 1000:8.1f} ms/step "
                      f"(±{p['spread_pct'] / 2:.0f}%)"
                      f"  {p['images_per_s']:8.1f} img/s  loss@0 {p['loss_step0']:.6f}{extra}",
                      file=sys.stderr, flush=True)
            worst = max(p.get("loss_step0_absdiff", 0.0) for p in rec["paths"].values())
            if amp is None and worst > LOSS_TOL_FP32:
                print(f"  WARNING: step-0 losses differ by more than {LOSS_TOL_FP32}",
                      file=sys.stderr)
            results["cases"].append(rec)
    publish(results, to_markdown(results), args)
    return results


if __name__ == "__main__":
    main()
