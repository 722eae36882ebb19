"""Convergence study on the bundled digits: vanilla SiT vs SiT + SRA, several seeds each.

Every run trains the ``digits`` preset (or a named variant of it) with identical everything but
the alignment term, writing an EMA checkpoint every ``--eval-every`` steps (the training loop is
not touched: checkpoint_steps = milestone_steps = N, nothing pruned). Afterwards each checkpoint's
EMA draws the SAME class-balanced samples (fixed noise and labels for every run and step) with a
fixed sampler, and the digit classifier's Fréchet distance (FD) and class accuracy are computed
(:func:`sra.eval.digits.digits_metrics`).

Outputs (``--docs-dir``, default ``docs/``):

- ``convergence.md``: setup, one table per regime (mean ± std over seeds at every eval step), the
  plot, and the alignment statistics; text between ``<!-- notes:begin -->`` and
  ``<!-- notes:end -->`` of an existing file (the hand-written conclusion) is kept;
- ``convergence.png``: FD vs step, one panel per regime, mean line plus faint per-seed lines;
- ``convergence_results.json``: every run's raw numbers.

Runs are resumable: each finished run leaves ``WORK/results/ARM-sSEED.json`` and is skipped next
time; a half-trained run resumes from its last checkpoint. Each run uses one thread; ``--jobs``
runs go in parallel (spawned processes).

    python benchmarks/convergence.py --regimes headline --seeds 0,1,2 --jobs 2

This file is the command line and the scheduling of runs; the parts live beside it:
``convergence_setup`` (arms, regimes, settings), ``convergence_run`` (one run),
``convergence_diagnostics`` (token diagnostics), ``convergence_stats`` (aggregation),
``convergence_report`` / ``convergence_plot`` / ``convergence_outputs`` (the outputs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from convergence_outputs import write_outputs  # noqa: E402
from convergence_run import run_one, run_worker  # noqa: E402
from convergence_setup import (  # noqa: E402
    DEFAULT_DOCS_DIR, DEFAULT_WORK_DIR, REGIMES, RunSpec, StudyConfig, build_config,
)


def _plan(study: StudyConfig, regime_names: Sequence[str]) -> tuple[int, list[RunSpec]]:
    """(how many runs are done, the runs still to do in seed-major order)."""
    specs: dict[str, RunSpec] = {}
    first: set[str] = set()  # vanilla and positive-control arms: trained before the rest
    for reg in (REGIMES[r] for r in regime_names):
        if reg.control:
            first |= {reg.vanilla, reg.control}
        for arm in (reg.vanilla, *reg.arms):
            for seed in study.seeds:
                spec = RunSpec(arm, seed, study.steps or reg.steps, study.eval_every or reg.eval_every)
                specs.setdefault(spec.key, spec)
    todo = [s for s in specs.values()
            if not (study.work_dir / "results" / f"{s.key}.json").exists()]
    # Seed-major order: a partial study still holds complete (vanilla, SRA) pairs; a family's
    # vanilla and positive control come first (whether the harness can see a gain at all).
    todo.sort(key=lambda s: (s.arm not in first, s.seed, list(specs).index(s.key)))
    return len(specs) - len(todo), todo


def run_study(study: StudyConfig, regime_names: Sequence[str]) -> dict[str, Path]:
    """Train/evaluate every missing run of the regimes, then write the outputs."""
    from sra.errors import SraError

    unknown = [r for r in regime_names if r not in REGIMES]
    if unknown:
        raise SraError(f"unknown regime(s) {unknown}; allowed: {', '.join(REGIMES)}")
    os.environ.setdefault("SRA_CACHE_DIR", str(study.work_dir / "cache"))
    from sra.eval.digits import load_digits_classifier

    load_digits_classifier()  # train the metric once, before workers race for it
    done, todo = _plan(study, regime_names)
    _warm_encoders(todo, study)
    print(f"{done} runs done, {len(todo)} to go", flush=True)
    if study.jobs <= 1:
        for spec in todo:
            _report_done(spec, run_one(spec, study), study)
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(study.jobs, mp_context=mp.get_context("spawn")) as pool:
            futs = {pool.submit(run_worker, (spec, study)): spec for spec in todo}
            for fut in as_completed(futs):
                _report_done(futs[fut], fut.result(), study)
    return write_outputs(study)


def _warm_encoders(todo: Sequence[RunSpec], study: StudyConfig) -> None:
    """Build (train and cache, on first use) every encoder a REPA arm needs, before workers race."""
    from sra.encoders import build_encoder

    for name in sorted({c.encoder_align.encoder for c in (build_config(s, study) for s in todo)
                        if c.uses_encoder}):
        build_encoder(name, None, None)


def _report_done(spec: RunSpec, r: dict, study: StudyConfig) -> None:
    """One line per finished run, and the outputs rewritten; a failing report does not stop
    the study (the runs' result files hold everything; ``--report-only`` rewrites them)."""
    cpu = r.get("cpu_per_step_s")
    print(f"done {spec.key}: train {r['train_s']:.0f}s eval {r['eval_s']:.0f}s "
          f"cpu/step {1000 * cpu if cpu else float('nan'):.0f}ms last FD {r['eval'][-1]['fd']:.2f}",
          flush=True)
    try:
        write_outputs(study)
    except Exception as exc:  # noqa: BLE001 -- keep training; the report is rewritten at the end
        print(f"report failed ({type(exc).__name__}: {exc}); runs continue", flush=True)


def _overrides(items: Sequence[str]) -> tuple[tuple[str, object], ...]:
    """``--set PATH=JSON`` items → (path, value); a value that is not JSON stays a string."""
    extra = []
    for item in items:
        path, _, value = item.partition("=")
        try:
            extra.append((path, json.loads(value)))
        except json.JSONDecodeError:
            extra.append((path, value))
    return tuple(extra)


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regimes", default="headline",
                    help=f"comma-separated regimes ({', '.join(REGIMES)})")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (each arm runs each)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the regime's)")
    ap.add_argument("--eval-every", type=int, default=None,
                    help="evaluate the EMA every this many steps (default: the regime's)")
    ap.add_argument("--samples", type=int, default=500, help="samples per evaluation")
    ap.add_argument("--sampler-steps", type=int, default=25, help="Heun steps per sample")
    ap.add_argument("--cfg-scale", type=float, default=1.0, help="guidance scale (1 = unguided)")
    ap.add_argument("--batch-size", type=int, default=None, help="global batch (default: preset)")
    ap.add_argument("--jobs", type=int, default=2, help="runs trained in parallel")
    ap.add_argument("--threads-per-job", type=int, default=1, help="torch threads per run")
    ap.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                    help="runs, per-run result JSONs and the classifier cache")
    ap.add_argument("--docs-dir", type=Path, default=DEFAULT_DOCS_DIR,
                    help="where convergence.md/.png/_results.json go")
    ap.add_argument("--set", action="append", default=[], metavar="PATH=JSON",
                    help="extra override for every run, e.g. model.depth=4 (value parsed as JSON)")
    ap.add_argument("--report-only", action="store_true",
                    help="only rewrite the outputs from finished runs")
    args = ap.parse_args(argv)
    study = StudyConfig(
        work_dir=args.work_dir, docs_dir=args.docs_dir,
        seeds=tuple(int(s) for s in args.seeds.split(",") if s.strip()), steps=args.steps,
        eval_every=args.eval_every, samples=args.samples, sampler_steps=args.sampler_steps,
        cfg_scale=args.cfg_scale, jobs=args.jobs, threads_per_job=args.threads_per_job,
        batch_size=args.batch_size, extra=_overrides(args.set),
    )
    names = [r.strip() for r in args.regimes.split(",") if r.strip()]
    if args.report_only:
        return write_outputs(study)
    return run_study(study, names)


if __name__ == "__main__":
    out = main()
    for k, v in out.items():
        print(f"{k}: {v}")
