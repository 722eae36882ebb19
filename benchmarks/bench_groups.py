"""What token groups cost: a training step of SRA on dual-time token groups with attention
separation against plain SRA, same model, batch and step code, side by side in one process.

    .venv/bin/python benchmarks/bench_groups.py --threads 1            # CPU: digits, SiT-B/4
    .venv/bin/python benchmarks/bench_groups.py --threads 1 --case sit-b2 --batch 4 \
        --paths sra dts-as                                   # CPU: sit-b2-dts-as shapes
    .venv/bin/python benchmarks/bench_groups.py --case sit-xl2 --device cuda
    # against an older commit's code, side by side in this process:
    git archive f0a0e0d src | tar -x -C /tmp/before
    .venv/bin/python benchmarks/bench_groups.py --threads 1 --paths sra dts-as --before /tmp/before/src

Paths (each its own copy of the model, EMA and fused AdamW, as ``sra train`` steps them):

- ``sra``: plain SRA (one time per image);
- ``dts``: the same groups and times without attention separation;
- ``dts-as``: the follow-up's recipe — mask ratio 0.25, a time per group, attention separation,
  SRA teacher times with the teacher mask. The model computes one adaLN modulation per group and
  gathers it per token;
- ``per-token``: the same with every token its own group (no separation): the cost of computing
  the modulation once per token, i.e. what a naive per-token adaLN costs;
- ``dts-as@before`` (with ``--before SRC``): ``dts-as`` on the model and objective of another
  source tree of ``sra`` (e.g. the masked attention of commit f0a0e0d), same weights and draws.

On CPU the steps run interleaved and are timed on process CPU time (other jobs on the machine
do not inflate it; use ``--threads 1``); the median is reported with its ratio to ``sra``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_train import LABEL_DROPOUT, build_path  # noqa: E402
from common import add_common_args, add_run_args, start_results, time_interleaved, unzero_init  # noqa: E402
from report import publish  # noqa: E402
from train_cases import TrainCase, make_batch, make_case  # noqa: E402
from sra.models import build_model, model_config  # noqa: E402
from sra.objectives import AlignConfig, FlowConfig  # noqa: E402
from sra.objectives.denoising import FlowMatching  # noqa: E402
from sra.objectives.groups import DualTimeObjective, GroupConfig  # noqa: E402

PATHS = ("sra", "dts", "dts-as", "per-token")
BEFORE_MODULES = ("sra.models", "sra.objectives", "sra.objectives.denoising", "sra.objectives.groups")


def import_other_sra(src: str) -> dict:
    """The modules of another ``sra`` source tree (``src`` holds its ``sra/``), imported beside
    this process's own: ours are set aside while it imports, then put back."""
    ours = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "sra" or k.startswith("sra.")}
    sys.path.insert(0, src)
    try:
        for name in BEFORE_MODULES:
            importlib.import_module(name)
        other = {k: sys.modules.pop(k) for k in list(sys.modules)
                 if k == "sra" or k.startswith("sra.")}
    finally:
        sys.path.remove(src)
        sys.modules.update(ours)
    if not other["sra"].__file__.startswith(str(Path(src).resolve())):
        raise SystemExit(f"--before {src}: no sra package there")
    return other


def _as(cls, config):
    """``config`` as the other tree's dataclass ``cls`` (the fields both have)."""
    return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)
                  if hasattr(config, f.name)})


def before_path(other: dict, base, case):
    """(model, objective) of ``dts-as`` from the other tree, with ``base``'s weights."""
    model = other["sra.models"].build_model(_as(other["sra.models"].ModelConfig, case.model))
    model.load_state_dict(base.state_dict())
    g = other["sra.objectives.groups"]
    groups = g.GroupConfig(mask_ratios=(0.25,), dual_time=True, attention_separation=True,
                           teacher_t="sra", teacher_mask=True)
    process = other["sra.objectives.denoising"].FlowMatching(other["sra.objectives"].FlowConfig())
    align = _as(other["sra.objectives"].AlignConfig, case.align)
    m = case.model
    return model, g.DualTimeObjective(process, groups, align, LABEL_DROPOUT, m.num_classes,
                                      grid=m.grid_size, patch=m.patch_size)


def case_for(name: str, batch: int | None) -> TrainCase:
    """A registered training case, plus ``sit-b2``: the ``sit-b2-dts-as`` preset's shapes
    (SiT-B/2 on 32×32×4 latents = 256 tokens, blocks 3 → 8); ``batch`` overrides the batch."""
    if name == "sit-b2":
        model = model_config("SiT-B/2", input_size=32, in_channels=4, num_classes=1000)
        case = TrainCase(name, "SiT-B/2, 32×32×4 latents (256 tokens)", model,
                         AlignConfig(student_block=3, teacher_block=8, t_max=0.2, weight=0.5), 4)
    else:
        case = make_case(name)
    return case if batch is None else replace(case, batch=batch)


def objective_for(kind: str, case):
    """None (plain SRA, built by bench_train) or the token-group objective of ``kind``."""
    m = case.model
    if kind == "sra":
        return None
    if kind in ("dts", "dts-as"):
        sep = kind == "dts-as"
        groups = GroupConfig(mask_ratios=(0.25,), dual_time=True, attention_separation=sep,
                             teacher_t="sra", teacher_mask=sep)
    else:  # one group per token: T modulations per image
        groups = GroupConfig(mask_ratios=(1.0,) * m.num_tokens, dual_time=True,
                             attention_separation=False, teacher_t="sra", teacher_mask=False)
    return DualTimeObjective(FlowMatching(FlowConfig()), groups, case.align, LABEL_DROPOUT,
                             m.num_classes, grid=m.grid_size, patch=m.patch_size)


def run_case(name: str, device: torch.device, warmup: int, repeats: int, seed: int,
             batch: int | None = None, paths: tuple[str, ...] = ("sra", "dts-as", "per-token"),
             before: dict | None = None) -> dict:
    case = case_for(name, batch)
    torch.manual_seed(seed)
    base = unzero_init(build_model(case.model), seed)
    x0, y = make_batch(case, seed, device)
    steps = {kind: build_path("ours", base, case, device, None, seed, x0, y,
                              objective=objective_for(kind, case)) for kind in paths}
    if before is not None:
        model, objective = before_path(before, base, case)
        steps["dts-as@before"] = build_path("ours", model, case, device, None, seed, x0, y,
                                            objective=objective)
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    losses: dict[str, list] = {}
    timings = time_interleaved(steps, device, warmup, repeats, clock=clock,
                               on_result=lambda k, i, r: losses.setdefault(k, []).append(r[0]))
    med = {k: t.summary()["median_s"] for k, t in timings.items()}
    out = {"case": f"{case.title}, batch {case.batch}",
           "clock": "process CPU time" if device.type == "cpu" else "wall",
           "paths": {k: {"median_ms": 1000 * m, "ratio_to_sra": m / med["sra"]}
                     for k, m in med.items()}}
    if before is not None and "dts-as" in steps:  # same weights and draws: the same losses
        out["dts_as_loss_max_abs_diff_vs_before"] = max(
            abs(float(a) - float(b)) for a, b in zip(losses["dts-as"], losses["dts-as@before"]))
    return out


def to_markdown(results: dict) -> str:
    lines = []
    for c in results["cases"]:
        lines += [f"**{c['case']}** ({c['clock']}, median of {results['repeats']})", "",
                  "| path | step | vs SRA |", "|---|---|---|"]
        lines += [f"| {k} | {v['median_ms']:.1f} ms | {v['ratio_to_sra']:.3f}× |"
                  for k, v in c["paths"].items()]
        if "dts_as_loss_max_abs_diff_vs_before" in c:
            lines.append(f"\ndts-as vs dts-as@before, loss max |Δ| over the steps: "
                         f"{c['dts_as_loss_max_abs_diff_vs_before']:.2e}")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", nargs="+", default=["digits", "sit-b4"],
                   help="digits | sit-b4 | sit-b2 | sit-xl2 | tiny (see train_cases.py)")
    p.add_argument("--batch", type=int, default=None, help="override the cases' batch size")
    p.add_argument("--paths", nargs="+", default=["sra", "dts-as", "per-token"], choices=PATHS,
                   help="which steps to time (sra is always included: the ratios are to it)")
    p.add_argument("--before", default=None, metavar="SRC",
                   help="also time dts-as on the sra package under SRC (another commit's src/)")
    add_run_args(p, unit="steps", warmup=2, repeats=8, seed_help="seed of the model and batch")
    add_common_args(p, section="groups")
    args = p.parse_args(argv)
    device, results = start_results(args, "benchmarks/bench_groups.py", argv)
    paths = ("sra",) + tuple(k for k in args.paths if k != "sra")
    before = import_other_sra(args.before) if args.before else None
    for name in args.case:
        results["cases"].append(run_case(name, device, args.warmup, args.repeats, args.seed,
                                         args.batch, paths, before))
    publish(results, to_markdown(results), args)
    return results


if __name__ == "__main__":
    main()
