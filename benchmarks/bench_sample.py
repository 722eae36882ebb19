"""Sampling throughput: our SDE sampler against the release's compute path, same outputs.

    .venv/bin/python benchmarks/bench_sample.py --steps 50            # CPU: SiT-B/4 @32², batch 4
    .venv/bin/python benchmarks/bench_sample.py --case sit-xl2 --amp bf16 --compile   # a GPU

Euler–Maruyama with 250 steps (``--steps``), classifier-free guidance w = 1.8 on the interval
t ∈ [0, 0.7] (the paper's 256 px setting). Both paths call :func:`sra.sampling.generate` with the
same model weights, noise, labels and per-step noise generator seed; the release's compute path
is re-created by options:

=================  ===========================================  ================================
choice             ours                                         release
=================  ===========================================  ================================
sampler state      float32                                      float64 (network input cast to
                                                                fp32 every step)
attention          SDPA                                         explicit softmax(qkᵀ)v
precision          fp32, or bf16 autocast with ``--amp bf16``   fp32
compile            ``--compile`` adds "ours+compile"            never
=================  ===========================================  ================================

The model is randomly initialised with its adaLN-Zero and output layers given small random
weights (otherwise every block is gated off and the outputs are trivial). Outputs are compared
by their largest absolute difference, also relative to the release output's standard deviation.
"""

from __future__ import annotations

import argparse
import copy
import sys
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import (  # noqa: E402
    AMP_DTYPES, add_common_args, add_run_args, add_speedups, release_memory, start_results,
    time_interleaved, unzero_init,
)
from flops import forward_macs  # noqa: E402
from report import (  # noqa: E402
    amp_name, fmt_peak, fmt_speedup, markdown_table, memory_kind, path_legend, publish, run_line,
)
from sra.models import ModelConfig, build_model, model_config  # noqa: E402
from sra.sampling import SamplerConfig, generate  # noqa: E402
from sra.sampling.schedules import sde_times  # noqa: E402

CFG_SCALE, GUIDANCE_LOW, GUIDANCE_HIGH = 1.8, 0.0, 0.7  # paper 256 px (docs/method.md §5.3)
DEFAULT_STEPS = 250
# Largest |ours − release| allowed, relative to the output std: fp32 vs fp64 state rounding
# stays far below it; bf16 autocast does not (its comparison is reported, not asserted).
REL_TOL_FP32 = 1e-3

PATH_CHOICES = {
    "ours": "float32 sampler state, SDPA attention (fp32 network, or bf16 autocast with --amp)",
    "ours+compile": "as ours, the network through torch.compile",
    "release": ("float64 sampler state (network fed fp32 each step), explicit softmax attention, "
                "fp32"),
}


@dataclass(frozen=True)
class SampleCase:
    name: str
    title: str
    model: ModelConfig
    batch: int


def make_case(name: str) -> SampleCase:
    """``sit-b4`` (CPU default), ``sit-xl2`` (GPU default), ``tiny`` (tests)."""
    if name == "sit-b4":
        return SampleCase(name, "SiT-B/4, 32×32×4 latents",
                          model_config("SiT-B/4", input_size=32, use_head=False), 4)
    if name == "sit-xl2":
        return SampleCase(name, "SiT-XL/2, 32×32×4 latents (256 px)",
                          model_config("SiT-XL/2", input_size=32, use_head=False), 32)
    if name == "tiny":
        return SampleCase(name, "tiny SiT (3×32, patch 2, 8×8×4)",
                          model_config("SiT-S/2", input_size=8, depth=3, hidden_size=32,
                                       num_heads=2, num_classes=10, use_head=False), 2)
    raise SystemExit(f"unknown case {name!r}; choose from sit-b4, sit-xl2, tiny")


def sampler_config(steps: int, state_dtype: str) -> SamplerConfig:
    return SamplerConfig(mode="sde", steps=steps, cfg_scale=CFG_SCALE, guidance_low=GUIDANCE_LOW,
                         guidance_high=GUIDANCE_HIGH, state_dtype=state_dtype)


def network_images(steps: int, batch: int, grid_times: list[float]) -> int:
    """Images pushed through the network per sampling run (doubled inside the CFG interval)."""
    return sum(batch * (2 if GUIDANCE_LOW <= t <= GUIDANCE_HIGH else 1) for t in grid_times)


def build_path(kind: str, base: torch.nn.Module, device: torch.device, steps: int,
               amp: torch.dtype | None, noise: torch.Tensor, y: torch.Tensor, seed: int):
    """A function ``run(i) -> samples`` for one path on its own copy of the model."""
    release = kind == "release"
    model = copy.deepcopy(base).to(device).eval()
    model.set_fused_attention(not release)
    net = torch.compile(model) if kind == "ours+compile" else model
    cfg = sampler_config(steps, "float64" if release else "float32")
    use_amp = amp is not None and not release

    def run(i: int) -> torch.Tensor:
        g = torch.Generator(device).manual_seed(seed)  # the same per-step noise on every call
        ctx = torch.autocast(device.type, dtype=amp) if use_amp else nullcontext()
        with ctx:
            return generate(net, noise, y, cfg, generator=g).float()

    return run


def run_case(case: SampleCase, device: torch.device, steps: int, amp: torch.dtype | None,
             kinds: list[str], warmup: int, repeats: int, seed: int) -> dict:
    """Time the paths on one case and compare their samples with the release's."""
    torch.manual_seed(seed)
    base = unzero_init(build_model(case.model), seed)
    m = case.model
    g = torch.Generator().manual_seed(seed)
    shape = (case.batch, m.in_channels, m.input_size, m.input_size)
    noise = torch.randn(shape, generator=g).to(device)
    y = torch.randint(0, m.num_classes, (case.batch,), generator=g).to(device)
    runs = {k: build_path(k, base, device, steps, amp, noise, y, seed) for k in kinds}
    first: dict[str, torch.Tensor] = {}

    def record(name: str, i: int, out: torch.Tensor) -> None:
        if name not in first:
            first[name] = out.detach().cpu()
        elif not torch.equal(first[name], out.detach().cpu()):
            first.setdefault(name + "#nondeterministic", out.detach().cpu())

    release_memory(device)
    timings = time_interleaved(runs, device, warmup, repeats, on_result=record)
    del runs
    release_memory(device)
    last_t = sampler_config(steps, "float32").sde_last_t
    # the SDE evaluates the network at every grid time but the last (its mean step ends at 0)
    n_img = network_images(steps, case.batch, sde_times(steps, last_t)[:-1])
    fwd_flops = 2 * forward_macs(m)
    ref = first["release"]
    scale = float(ref.std())
    paths = {}
    for k in kinds:
        summ = timings[k].summary()
        med = summ["median_s"]
        diff = float((first[k] - ref).abs().max())
        paths[k] = {
            **summ, "images_per_s": case.batch / med, "description": PATH_CHOICES[k],
            "max_abs_diff_vs_release": diff, "rel_diff_vs_release": diff / scale if scale else diff,
            "finite": bool(torch.isfinite(first[k]).all()),
            "repeatable": k + "#nondeterministic" not in first,
            "tflops_per_s": n_img * fwd_flops / med / 1e12,
        }
    add_speedups(paths)
    return {
        "case": case.name, "title": case.title, "batch": case.batch, "steps": steps,
        "model": m.to_dict(), "amp": amp_name(amp),
        "sampler": sampler_config(steps, "float32").to_dict(), "output_std": scale,
        "network_images_per_run": n_img, "forward_gflop_per_image": fwd_flops / 1e9,
        "paths": paths,
    }


def to_markdown(results: dict) -> str:
    lines = [
        "### Sampling: SDE with CFG interval, ours vs the release's compute path",
        "",
        f"{run_line(results, 'runs')}, interleaved; "
        "median time per run of `batch` samples, spread = ±(max − min)/(2·median). "
        f"CFG {CFG_SCALE} on t ∈ [{GUIDANCE_LOW}, {GUIDANCE_HIGH}].",
        "",
    ]
    rows = []
    for c in results["cases"]:
        for k, p in c["paths"].items():
            rows.append([
                c["title"] if k == next(iter(c["paths"])) else "", c["batch"], c["steps"],
                c["amp"] if k != "release" else "none", k, f"{p['median_s']:.2f} s",
                f"±{p['spread_pct'] / 2:.0f}%", f"{p['images_per_s']:.3f}",
                fmt_peak(p),
                fmt_speedup(p),
                "–" if k == "release" else
                f"{p['max_abs_diff_vs_release']:.1e} ({p['rel_diff_vs_release']:.1e} of std)",
            ])
    lines.append(markdown_table(
        ["case", "batch", "steps", "amp", "path", "time / run", "spread", "images/s",
         "peak mem (+run)", "speed-up", "max abs Δ vs release"], rows))
    lines += ["", f"Memory: {memory_kind(results)} during a run (+ what the run added).", "",
              "Paths:", *path_legend(PATH_CHOICES, results)]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", nargs="+", default=None,
                   help="cases: sit-b4, sit-xl2, tiny (default: sit-b4 on CPU, sit-xl2 on CUDA)")
    p.add_argument("--batch", type=int, default=None, help="samples per run (default: the case's)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="SDE steps (paper: 250)")
    p.add_argument("--amp", default="none", choices=list(AMP_DTYPES),
                   help="autocast dtype of OUR network (the release path is always fp32)")
    p.add_argument("--compile", action="store_true", help="also time ours under torch.compile")
    add_run_args(p, unit="runs", warmup=1, repeats=3,
                 seed_help="weights, noise, labels and sampler seed")
    add_common_args(p, section="bench_sample")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Run the benchmark; returns ``{"machine", "cases": [...], ...}`` (see :func:`run_case`)."""
    args = parse_args(argv)
    device, results = start_results(args, "bench_sample.py", argv)
    amp = AMP_DTYPES[args.amp]
    names = args.case or (["sit-xl2"] if device.type == "cuda" else ["sit-b4"])
    kinds = ["ours"] + (["ours+compile"] if args.compile else []) + ["release"]
    for name in names:
        case = make_case(name)
        if args.batch:
            case = replace(case, batch=args.batch)
        print(f"[bench_sample] {case.title}, batch {case.batch}, {args.steps} steps, amp {amp} …",
              file=sys.stderr, flush=True)
        rec = run_case(case, device, args.steps, amp, kinds, args.warmup, args.repeats, args.seed)
        for k, p in rec["paths"].items():
            extra = (f", {p['speedup_vs_release']:.2f}× vs release, max|Δ| "
                     f"{p['max_abs_diff_vs_release']:.2e} ({p['rel_diff_vs_release']:.1e} of std)"
                     if "speedup_vs_release" in p else "")
            print(f"  {k:13s} {p['median_s']:8.2f} s/run (±{p['spread_pct'] / 2:.0f}%) "
                  f"{p['images_per_s']:8.3f} img/s{extra}", file=sys.stderr, flush=True)
            if amp is None and p["rel_diff_vs_release"] > REL_TOL_FP32:
                print(f"  WARNING: {k} differs from the release path by more than "
                      f"{REL_TOL_FP32} of the output std", file=sys.stderr)
        results["cases"].append(rec)
    publish(results, to_markdown(results), args)
    return results


if __name__ == "__main__":
    main()
