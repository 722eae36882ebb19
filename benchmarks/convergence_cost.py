"""Cost per training step of a regime's arms measured side by side: a cross-check of the cost
each study run records while training (two runs at a time on a shared machine, whose load
changes between arms).

Every arm's :class:`~sra.training.loop.Trainer` is built from the study's config for that arm
(seed 0, a throw-away output folder) and its real optimizer step (objective, backward, AdamW,
EMA) is timed in turn — A B C …, then C B A … — on process CPU time with one thread, so a load
change hits every arm alike. The median per arm and its ratio to vanilla go to
``DOCS/convergence_cost_REGIME.json``; the family report shows them beside the in-run cost.

    .venv/bin/python benchmarks/convergence_cost.py --regime family --repeats 30
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from convergence_setup import (  # noqa: E402
    DEFAULT_DOCS_DIR, DEFAULT_WORK_DIR, REGIMES, Regime, RunSpec, StudyConfig, build_config,
)


def cost_path(docs_dir: Path, regime_name: str) -> Path:
    """Where the side-by-side cost of a regime is written."""
    return Path(docs_dir) / f"convergence_cost_{regime_name}.json"


def measure_costs(regime: Regime, study: StudyConfig, repeats: int = 30, warmup: int = 3) -> dict:
    """Median process CPU seconds per optimizer step of every arm, interleaved; and / vanilla."""
    import torch

    from sra.training.loop import Trainer

    torch.set_num_threads(1)
    arms = (regime.vanilla, *regime.arms)
    with tempfile.TemporaryDirectory() as tmp:
        work = replace(study, work_dir=Path(tmp))
        trainers, batches = {}, {}
        for arm in arms:
            tr = Trainer(build_config(RunSpec(arm, 0, 10**6, 10**6), work))
            trainers[arm], batches[arm] = tr, iter(tr.loader)
        times: dict[str, list[float]] = {a: [] for a in arms}
        for i in range(warmup + repeats):
            for arm in (arms if i % 2 == 0 else arms[::-1]):
                c0 = time.process_time()
                trainers[arm]._train_step(batches[arm])
                trainers[arm].step += 1
                if i >= warmup:
                    times[arm].append(time.process_time() - c0)
    med = {a: statistics.median(t) for a, t in times.items()}
    return {"regime": regime.name, "repeats": repeats, "clock": "process CPU time, 1 thread",
            "arms": {a: {"median_s": med[a], "ratio": med[a] / med[regime.vanilla],
                         "min_s": min(times[a]), "max_s": max(times[a])} for a in arms}}


def main(argv: Sequence[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--regime", default="family", help="a family regime")
    ap.add_argument("--repeats", type=int, default=30, help="timed steps per arm")
    ap.add_argument("--docs-dir", type=Path, default=DEFAULT_DOCS_DIR)
    ap.add_argument("--batch-size", type=int, default=None, help="global batch (default: preset)")
    args = ap.parse_args(argv)
    os.environ.setdefault("SRA_CACHE_DIR", str(DEFAULT_WORK_DIR / "cache"))  # the study's encoder
    study = StudyConfig(docs_dir=args.docs_dir, batch_size=args.batch_size)
    out = measure_costs(REGIMES[args.regime], study, args.repeats)
    path = cost_path(args.docs_dir, args.regime)
    path.write_text(json.dumps(out, indent=1))
    for a, v in out["arms"].items():
        print(f"{a:22s} {1000 * v['median_s']:7.1f} ms  {v['ratio']:.3f}× vanilla")
    return path


if __name__ == "__main__":
    print(main())
