"""Cost per training step of a study regime's arms, measured side by side in one process: a
check of the ``compute_s`` each study run records while training (two runs at a time on a
shared machine, whose load changes between arms).

Every arm's :class:`~sra.training.loop.Trainer` is built from the regime file
(``studies/regimes/NAME.toml``, seed 0, a throw-away run dir) and its real optimizer step
(objective, backward, AdamW, EMA) is timed interleaved — A B C …, then … C B A — on process CPU
time. An arm with ``--align-until`` is timed before its switch-off (its steps after it cost what
its arm without alignment costs).

    .venv/bin/python benchmarks/bench_arms.py --regime family --threads 1 --repeats 30 \\
        --json docs/convergence_family/bench_arms.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "studies"))

from common import ROOT, add_common_args, add_run_args, start_results, time_interleaved  # noqa: E402
from report import publish  # noqa: E402
from spec import Study, load_study, regime_names, resolved_config  # noqa: E402


def build_trainers(study: Study, work: Path) -> dict:
    """One trainer per arm and the iterator over its data, in the regime file's order."""
    from sra.training.loop import Trainer

    out = {}
    for arm in study.arms:
        args = study.train_args(arm.name, 0, work) + ["--fid-every", "0"]  # no probe set-up
        trainer = Trainer(resolved_config(args))
        out[arm.name] = (trainer, iter(trainer.loader))
    return out


def measure(study: Study, warmup: int, repeats: int) -> dict:
    """Median process CPU seconds per optimizer step of every arm, and its ratio to the
    baseline's."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        trainers = build_trainers(study, Path(tmp))

        def step(name: str):
            def fn(i: int) -> None:
                trainer, batches = trainers[name]
                trainer._train_step(batches)
                trainer.step += 1
            return fn

        timings = time_interleaved({n: step(n) for n in trainers}, torch.device("cpu"), warmup,
                                   repeats, clock=time.process_time)
    med = {n: t.summary()["median_s"] for n, t in timings.items()}
    return {"regime": study.name, "clock": "process CPU time",
            "arms": {n: {**timings[n].summary(), "ratio": med[n] / med[study.baseline]}
                     for n in trainers}}


def to_markdown(results: dict) -> str:
    case = results["cases"][0]
    lines = [f"**{case['regime']}**: one optimizer step per arm ({case['clock']}, "
             f"{results['machine']['torch_threads']} thread(s), median of {results['repeats']})",
             "", "| arm | step | × baseline |", "|---|---|---|"]
    lines += [f"| `{n}` | {1000 * v['median_s']:.1f} ms | {v['ratio']:.3f} |"
              for n, v in case["arms"].items()]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--regime", default="family", help=f"a regime ({', '.join(regime_names())}) or a .toml")
    add_run_args(p, unit="steps", warmup=3, repeats=30, seed_help="unused (the arms' seed is 0)")
    add_common_args(p, section="arms")
    args = p.parse_args(argv)
    # The study's cache: the digit classifier and the positive control's encoder trained once.
    os.environ.setdefault("SRA_CACHE_DIR", str(ROOT / "runs" / "study" / "cache"))
    _, results = start_results(args, "benchmarks/bench_arms.py", argv)
    results["cases"].append(measure(load_study(args.regime), args.warmup, args.repeats))
    publish(results, to_markdown(results), args)
    return results


if __name__ == "__main__":
    main()
