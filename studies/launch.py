"""Runs ``sra train`` for every arm × seed of a study: finished runs are skipped, half-finished
ones continue with ``--resume auto``, ``jobs`` at a time, one thread each.

A run is finished when its metrics hold the quality record of the study's last step (its
checkpoints only serve resuming), in the work folder or in the records folder: the small files of
finished runs (``config.json``, ``metrics.jsonl``, ``log.txt``) copied to
``RECORDS/REGIME/sSEED/ARM``, which is how a study spread over several machines or sessions, whose
work folders are lost, is completed and reported. Each run's output goes to
``WORK/REGIME/logs/ARM-sSEED.txt``; a run that fails (or whose run dir another launch holds:
``sra train`` keeps a lock on it) is named at the end and the others go on.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from spec import Study, resolved_config

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
RECORD_FILES = ("config.json", "metrics.jsonl", "log.txt")  # what sra compare reads, and the log


@dataclass(frozen=True)
class RunPlan:
    """One run of the study and what the launcher does with it."""

    arm: str
    seed: int
    run_dir: Path
    args: tuple[str, ...]  # sra train's arguments (``--resume auto`` included when resuming)
    action: str  # "skip" (finished) | "resume" | "start"


@dataclass(frozen=True)
class RunResult:
    plan: RunPlan
    returncode: int
    wall_s: float
    last_line: str


def finished(run_dir: Path, steps: int, metric: str) -> bool:
    """Whether the run has a ``metric`` record at step ``steps`` (its results are complete)."""
    from sra.compare.runs import metric_points, read_run

    if not (run_dir / "config.json").is_file():
        return False
    return any(p.step == steps for p in metric_points(read_run(run_dir), metric))


def keep_records(run_dir: Path, dest: Path) -> None:
    """Copy a finished run's small files to ``dest`` (checkpoints stay behind); each file goes
    through a temporary name, so a kill leaves the old copy or the new one."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in RECORD_FILES:
        if (run_dir / name).is_file():
            tmp = dest / f".{name}.tmp"
            shutil.copyfile(run_dir / name, tmp)
            os.replace(tmp, dest / name)


def plan_runs(study: Study, work: Path, seeds: Sequence[int] | None = None,
              steps: int | None = None, arms: Sequence[str] | None = None,
              records: Path | None = None) -> list[RunPlan]:
    """Every run (of ``arms`` only, when given) in launch order: seed-major (a partial study holds
    whole seeds), and within a seed the baseline and the positive control first (can the harness
    see a gain at all?). A run finished in ``records`` is skipped too."""
    steps = steps or study.steps
    first = [a for a in (study.baseline, study.control) if a]
    order = first + [a.name for a in study.arms if a.name not in first]
    unknown = sorted(set(arms or ()) - set(order))
    if unknown:
        raise SystemExit(f"study {study.name}: no arm {', '.join(unknown)}; arms: {', '.join(order)}")
    arms = [a for a in order if arms is None or a in arms]
    plans = []
    for seed in seeds if seeds is not None else study.seeds:
        for arm in arms:
            run_dir = study.run_dir(work, arm, seed)
            args = study.train_args(arm, seed, work, steps)
            kept = records is not None and finished(study.run_dir(records, arm, seed), steps,
                                                    study.metric)
            if kept or finished(run_dir, steps, study.metric):
                action = "skip"
            elif (run_dir / "config.json").is_file():
                action, args = "resume", args + ["--resume", "auto"]
            else:
                action = "start"
            plans.append(RunPlan(arm, seed, run_dir, tuple(args), action))
    return plans


def check_arms(study: Study, work: Path) -> None:
    """Resolve every arm's config before anything trains: a flag ``sra train`` refuses stops
    the study here, naming the arm."""
    for arm in study.arms:
        try:
            resolved_config(study.train_args(arm.name, study.seeds[0], work))
        except SystemExit:  # argparse has printed the reason
            raise SystemExit(f"study {study.name}: arm {arm.name!r}: sra train refuses its flags") from None
        except Exception as exc:  # noqa: BLE001 -- the config's one-line error, with the arm's name
            raise SystemExit(f"study {study.name}: arm {arm.name!r}: {exc}") from None


def warm_caches(study: Study, work: Path) -> None:
    """Train (or read) the digit classifier and the control's encoder once, before parallel
    runs would each train them (the same deterministic files; this only saves the time)."""
    from sra.encoders import build_encoder
    from sra.eval.digits import load_digits_classifier

    configs = [resolved_config(study.train_args(a.name, study.seeds[0], work)) for a in study.arms]
    if any(c.data.data_dir == "digits" for c in configs):
        load_digits_classifier()
    for name in sorted({c.encoder_align.encoder for c in configs if c.uses_encoder}):
        build_encoder(name, None, None)


def run_env(cache_dir: Path | None) -> dict[str, str]:
    """One thread per run (torch reads OMP_NUM_THREADS at start-up), no progress bars in the
    logs, and the study's cache of the classifier and encoder."""
    env = dict(os.environ, TQDM_DISABLE="1", **{k: "1" for k in THREAD_ENV})
    if cache_dir is not None:
        env["SRA_CACHE_DIR"] = str(cache_dir)
    return env


def train_one(plan: RunPlan, log_dir: Path, env: dict[str, str]) -> RunResult:
    """``sra train`` for one run, its output into the run's log file."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{plan.arm}-s{plan.seed}.txt"
    t0 = time.perf_counter()
    with log.open("a") as out:
        out.write(f"$ sra train {' '.join(plan.args)}\n")
        out.flush()
        rc = subprocess.call([sys.executable, "-m", "sra.cli", "train", *plan.args],
                             stdout=out, stderr=subprocess.STDOUT, env=env)
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return RunResult(plan, rc, time.perf_counter() - t0, lines[-1] if lines else "")


def launch(plans: Sequence[RunPlan], log_dir: Path, jobs: int, env: dict[str, str],
           train: Callable[[RunPlan, Path, dict[str, str]], RunResult] = train_one,
           say: Callable[[str], None] = print,
           done: Callable[[RunPlan], None] | None = None) -> list[RunResult]:
    """Train every run that is not finished, ``jobs`` at a time; one line per finished run, and
    ``done(plan)`` after each run that succeeded (e.g. keeping its records)."""
    todo = [p for p in plans if p.action != "skip"]
    say(f"{len(plans) - len(todo)} runs finished, {len(todo)} to train "
        f"({sum(p.action == 'resume' for p in todo)} resumed), {jobs} at a time")

    def one(plan: RunPlan) -> RunResult:
        res = train(plan, log_dir, env)
        if res.returncode == 0 and done is not None:
            done(plan)
        status = "done" if res.returncode == 0 else f"FAILED (exit {res.returncode}): {res.last_line}"
        say(f"{plan.arm} seed {plan.seed}: {status} in {res.wall_s / 60:.1f} min")
        return res

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        return list(pool.map(one, todo))
