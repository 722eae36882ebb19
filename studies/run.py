"""A study from the command line: train every arm × seed of a regime with ``sra train`` (resumable,
two at a time), then compare them with one ``sra compare`` (tables, JSON and figure in ``--out``).

    .venv/bin/python studies/run.py family                     # the whole study (hours on 2 cores)
    .venv/bin/python studies/run.py family --compare-only      # the report from the runs so far
    nohup .venv/bin/python studies/run.py family > runs/study/family.log 2>&1 &
    .venv/bin/python studies/run.py family --records studies/results   # finish the committed study

Regimes are the files in ``studies/regimes/`` (or a path to a .toml); runs go to
``WORK/REGIME/sSEED/ARM`` and the classifier/encoder cache to ``WORK/cache``. With ``--records
DIR``, every finished run's small files are kept in ``DIR/REGIME/sSEED/ARM`` (the repository's
``studies/results`` holds the published study), runs found there are not trained again, and the
report is made from ``DIR``: a study can be completed over several sessions or machines.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from launch import check_arms, finished, keep_records, launch, plan_runs, run_env, warm_caches  # noqa: E402
from spec import Study, load_study, regime_names  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORK = ROOT / "runs" / "study"


def compare_runs(study: Study, work: Path, out: Path, seeds: Sequence[int] | None = None) -> dict:
    """One ``sra compare`` over the study's run dirs that exist (arms in the file's order, named
    by exp_name): ``compare.md``, ``compare.json`` and ``compare.png`` in ``out``."""
    from sra.compare import compare
    from sra.compare.plot import write_plot
    from sra.compare.report import write_report

    dirs = [study.run_dir(work, a.name, s) for a in study.arms
            for s in (seeds if seeds is not None else study.seeds)]
    # Relative to the current folder where they are inside it: the report names the runs as a
    # reader of the repository finds them, not by this machine's absolute paths.
    here = Path.cwd()
    dirs = [Path(os.path.relpath(d, here)) if d.is_relative_to(here) else d
            for d in dirs if (d / "config.json").is_file()]
    cmp = compare(dirs, metric=study.metric, baseline=study.baseline, name_by=["exp_name"],
                  late=study.late)
    paths = write_report(cmp, out)
    paths["plot"] = write_plot(cmp, Path(out) / "compare.png")
    return paths


def parse_list(text: str | None, cast: type = str) -> list | None:
    """A comma-separated flag value as a list (None: the flag was not given)."""
    return None if text is None else [cast(v.strip()) for v in text.split(",") if v.strip()]


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("regime", help=f"a regime ({', '.join(regime_names())}) or a .toml file")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default: the regime's)")
    ap.add_argument("--arms", default=None,
                    help="comma-separated arms to train (default: all); the report covers every arm run")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the regime's)")
    ap.add_argument("--jobs", type=int, default=2, help="runs trained in parallel (one thread each)")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK, help="where runs and the cache live")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for compare.md/.json/.png (default: WORK/REGIME/compare)")
    ap.add_argument("--records", type=Path, default=None,
                    help="keep finished runs' config/metrics/log here, skip runs found here, "
                         "report from here (e.g. studies/results)")
    ap.add_argument("--compare-only", action="store_true", help="no training: only the report")
    args = ap.parse_args(argv)
    study = load_study(args.regime)
    seeds = parse_list(args.seeds, int)
    work = args.work.resolve()
    records = args.records.resolve() if args.records is not None else None
    out = args.out or (records or work) / study.name / "compare"
    cache = work / "cache"
    steps = args.steps or study.steps

    def keep(arm: str, seed: int) -> None:
        keep_records(study.run_dir(work, arm, seed), study.run_dir(records, arm, seed))

    results = []
    if not args.compare_only:
        check_arms(study, work)
        os.environ["SRA_CACHE_DIR"] = str(cache)  # the warm-up fills the runs' cache
        warm_caches(study, work)
        plans = plan_runs(study, work, seeds, steps, parse_list(args.arms), records)
        results = launch(plans, work / study.name / "logs", args.jobs, run_env(cache),
                         done=None if records is None else lambda p: keep(p.arm, p.seed))
    if records is not None:  # also runs finished by an earlier launch without --records
        for arm in study.arms:
            for seed in seeds if seeds is not None else study.seeds:
                if finished(study.run_dir(work, arm.name, seed), steps, study.metric):
                    keep(arm.name, seed)
    paths = compare_runs(study, records or work, out, seeds)
    failed = [f"{r.plan.arm} seed {r.plan.seed}" for r in results if r.returncode != 0]
    if failed:
        print(f"failed runs (rerun to resume them): {', '.join(failed)}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return {"paths": paths, "results": results}


if __name__ == "__main__":
    main()
