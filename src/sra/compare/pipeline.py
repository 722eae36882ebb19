"""``sra compare`` end to end: read the run directories, pick the metric, form the arms, build the
tables on the three axes, and write ``compare.md``, ``compare.json`` and ``compare.png``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from sra.compare import analysis
from sra.compare.analysis import AxisTable
from sra.compare.arms import Arm, form_arms, pick_baseline, size_warnings
from sra.compare.metric import check_definitions, choose_metric, lower_is_better
from sra.compare.runs import Run, cost_per_step, images_at, metric_points, read_run
from sra.compare.stats import Estimate, mean_se
from sra.errors import SraError

DEFAULT_LATE = 1 / 3


@dataclass
class Comparison:
    """Everything the report and the figure show."""

    metric: str
    lower_is_better: bool
    arms: list[Arm]
    baseline: Arm
    late_fraction: float
    compute_unit: str | None
    tables: dict[str, AxisTable]  # "steps", "compute", and "images" when the batches differ
    cost: dict[str, Estimate] = field(default_factory=dict)  # compute per step, per arm
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # runs without the metric


def load_runs(run_dirs: Sequence[str | Path]) -> list[Run]:
    """Each directory once, in the order given."""
    seen, runs = set(), []
    for d in run_dirs:
        key = Path(d).resolve()
        if key not in seen:
            seen.add(key)
            runs.append(read_run(d))
    if not runs:
        raise SraError("no run directories given")
    return runs


def compare(run_dirs: Sequence[str | Path], metric: str | None = None, baseline: str | None = None,
            name_by: Sequence[str] = (), late: float = DEFAULT_LATE) -> Comparison:
    """The comparison of the runs in ``run_dirs`` (see ``sra compare --help``)."""
    if not 0 < late <= 1:
        raise SraError(f"--late must be a fraction in (0, 1], got {late}")
    runs = load_runs(run_dirs)
    metric = choose_metric(runs, metric)
    have = [r for r in runs if metric_points(r, metric)]
    left_out = [f"{r.name}: no {metric} records ({len(r.records)} records in all)"
                for r in runs if r not in have]
    check_definitions(have, metric)
    arms = form_arms(have, name_by)
    base = pick_baseline(arms, baseline)
    unit = base.runs[0].compute_unit
    cmp = Comparison(metric, lower_is_better(metric), arms, base, late, unit, {},
                     left_out=left_out, warnings=size_warnings(arms))
    _describe_runs(cmp)
    steps_all = analysis.common_steps(have, metric)
    base_steps = analysis.common_steps(base.runs, metric)
    cmp.tables["steps"] = analysis.axis_table("steps", "step", arms, base, steps_all, metric,
                                              analysis.step_x, late)
    if not steps_all:
        cmp.tables["steps"].unavailable = "no evaluation step is common to all runs"
    if _batches_differ(arms):
        cmp.tables["images"] = analysis.axis_table("images", "images", arms, base, base_steps,
                                                   metric, analysis.images_x, late)
    cmp.tables["compute"] = _compute_table(cmp, base_steps)
    return cmp


def _compute_table(cmp: Comparison, base_steps: list[int]) -> AxisTable:
    """The equal-compute table, the cost per step of each arm and the runs without compute."""
    unit = cmp.compute_unit
    runs = [r for a in cmp.arms for r in a.runs]
    without = [r.name for r in runs if cost_per_step(r) is None]
    if without:
        cmp.notes.append(f"no compute_s in the records of {', '.join(without)}: no compute axis "
                         f"for {'them' if len(without) > 1 else 'it'}")
    for arm in cmp.arms:
        for r in arm.runs:
            if cost_per_step(r) is not None and r.compute_unit != unit:
                cmp.warnings.append(f"{r.name} measures compute in {r.compute_unit}, the baseline "
                                    f"in {unit}: no equal-compute values for it")
        cmp.cost[arm.name] = mean_se([cost_per_step(r) for r in arm.runs if r.compute_unit == unit])
    xfun = analysis.compute_xfun(cmp.arms, unit, cmp.metric)
    table = analysis.axis_table("compute", unit or "s", cmp.arms, cmp.baseline, base_steps,
                                cmp.metric, xfun, cmp.late_fraction)
    if not cmp.cost[cmp.baseline.name].n:
        table.unavailable = (f"the baseline {cmp.baseline.name!r} records no compute "
                             f"(compute_s in metrics.jsonl)")
    return table


def _batches_differ(arms: Sequence[Arm]) -> bool:
    """Whether images seen per step differ between the arms (else images = steps × one batch)."""
    return len({images_at(r, 1) for a in arms for r in a.runs}) > 1


def _describe_runs(cmp: Comparison) -> None:
    """Notes on runs that stopped early, schedules that differ, seeds that cannot pair."""
    have = [r for a in cmp.arms for r in a.runs]
    for r in have:
        if r.status():
            cmp.notes.append(f"{r.name}: {r.status()}; the tables keep the steps it reached")
        cmp.notes.extend(r.notes)
    schedules = {tuple(p.step for p in metric_points(r, cmp.metric)) for r in have}
    if len(schedules) > 1:
        common = analysis.common_steps(have, cmp.metric)
        cmp.notes.append(f"evaluation schedules differ between runs: the equal-steps table keeps "
                         f"the {len(common)} steps every run evaluated")
    for arm in cmp.arms:
        seeds = arm.seeds
        if len(set(seeds)) < len(seeds):
            cmp.notes.append(f"arm {arm.name!r} has runs with the same seed ({seeds}): its Δ is "
                             f"unpaired (Welch)")
