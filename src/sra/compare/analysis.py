"""The comparison on one axis (optimizer steps, images seen or compute): every run's metric at
the grid points, each arm's mean ± SE over seeds, Δ vs the baseline, and the late window.

The grid: for steps, the evaluation steps every run has (common points only); for images seen
and compute, the baseline's common evaluation steps, converted to that axis. A run's value at a
grid point is linear interpolation between its own evaluations on the axis (exact where the point
is one of them), never extrapolated. On the compute axis an evaluation sits at its arm's mean
cumulative compute at that step (over the arm's runs that record compute), so one seed's machine
load does not move its points; a run that records no compute has no value there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from sra.compare import stats
from sra.compare.arms import Arm
from sra.compare.runs import Run, compute_at, images_at, metric_points
from sra.compare.stats import Delta, Estimate

# x of a run's evaluation at a step on one axis, None where the axis has no value for it
XFun = Callable[[Arm, Run, int], "float | None"]
Rows = list[tuple["int | None", str, list["float | None"]]]  # (seed, run name, value per point)


@dataclass
class AxisTable:
    """One axis's table; ``values[arm]`` is a list of (seed, run name, value per grid point)."""

    axis: str
    unit: str
    steps: list[int]  # the (baseline's) evaluation steps behind the grid
    x: list[float]
    images: list[int | None] = field(default_factory=list)  # the baseline's images seen there
    values: dict[str, Rows] = field(default_factory=dict)
    mean: dict[str, list[Estimate]] = field(default_factory=dict)
    delta: dict[str, list[Delta]] = field(default_factory=dict)
    late: list[int] = field(default_factory=list)  # grid indices of the late window
    late_mean: dict[str, Estimate] = field(default_factory=dict)
    late_delta: dict[str, Delta] = field(default_factory=dict)
    unavailable: str = ""  # why the axis has no table (empty when it has one)


def common_steps(runs: Sequence[Run], metric: str) -> list[int]:
    """The evaluation steps every run has."""
    sets = [{p.step for p in metric_points(r, metric)} for r in runs]
    return sorted(set.intersection(*sets)) if sets else []


def step_x(arm: Arm, run: Run, step: int) -> float:
    """x on the steps axis: the step itself."""
    return float(step)


def images_x(arm: Arm, run: Run, step: int) -> float | None:
    """x on the images axis: the images the run had seen by the step."""
    n = images_at(run, step)
    return None if n is None else float(n)


def arm_compute(arm: Arm, unit: str | None, metric: str) -> dict[int, float]:
    """The arm's mean cumulative compute at each of its evaluation steps, over its runs that
    record compute in ``unit``; kept non-decreasing (the mean can dip only where a run that
    stopped early leaves the average)."""
    runs = [r for r in arm.runs if r.compute_unit == unit]
    steps = sorted({p.step for r in arm.runs for p in metric_points(r, metric)})
    out: dict[int, float] = {}
    top = 0.0
    for s in steps:
        est = stats.mean_se([compute_at(r, s) for r in runs])
        if est.n:
            top = max(top, est.mean)
            out[s] = top
    return out


def compute_xfun(arms: Sequence[Arm], unit: str | None, metric: str) -> XFun:
    """x on the compute axis: the arm's mean compute at the step, for runs that record it."""
    curves = {a.name: arm_compute(a, unit, metric) for a in arms}

    def x(arm: Arm, run: Run, step: int) -> float | None:
        if run.compute_unit != unit or compute_at(run, step) is None:
            return None
        return curves[arm.name].get(step)
    return x


def _run_values(arm: Arm, run: Run, metric: str, xfun: XFun, grid: Sequence[float]) -> list[float | None]:
    """The run's metric at each grid x, interpolated on the axis between its evaluations."""
    pts = [(xfun(arm, run, p.step), p.value) for p in metric_points(run, metric)]
    pts = sorted((x, v) for x, v in pts if x is not None)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return [stats.interp(xs, ys, g) for g in grid]


def axis_table(axis: str, unit: str, arms: Sequence[Arm], baseline: Arm, steps: Sequence[int],
               metric: str, xfun: XFun, late_fraction: float) -> AxisTable:
    """The table on one axis at the baseline's ``steps`` (converted to the axis by ``xfun``)."""
    grid = []
    for s in steps:
        est = stats.mean_se([xfun(baseline, r, s) for r in baseline.runs])
        grid.append(est.mean)
    keep = [i for i, g in enumerate(grid) if g == g]  # steps the axis has a value for
    t = AxisTable(axis, unit, [steps[i] for i in keep], [grid[i] for i in keep])
    t.images = [images_at(baseline.runs[0], s) for s in t.steps]
    if not steps:
        t.unavailable = f"the runs of the baseline {baseline.name!r} share no evaluation step"
    elif not t.x:
        t.unavailable = f"the baseline {baseline.name!r} has no {axis} at its evaluations"
    if t.unavailable:
        return t
    for arm in arms:
        t.values[arm.name] = [(r.seed, r.name, _run_values(arm, r, metric, xfun, t.x))
                              for r in arm.runs]
    n = stats.late_count(len(t.x), late_fraction)
    t.late = list(range(len(t.x) - n, len(t.x)))
    base = t.values[baseline.name]
    for arm in arms:
        rows = t.values[arm.name]
        t.mean[arm.name] = [stats.mean_se([v[i] for _, _, v in rows]) for i in range(len(t.x))]
        late = [(seed, stats.window_mean([v[i] for i in t.late])) for seed, _, v in rows]
        t.late_mean[arm.name] = stats.mean_se([v for _, v in late])
        if arm is baseline:
            continue
        t.delta[arm.name] = [stats.delta(_present(rows, i), _present(base, i)) for i in range(len(t.x))]
        base_late = [(seed, stats.window_mean([v[i] for i in t.late])) for seed, _, v in base]
        t.late_delta[arm.name] = stats.delta(_drop_none(late), _drop_none(base_late))
    return t


def _present(rows: Rows, i: int) -> list[tuple[int | None, float]]:
    """(seed, value) at grid point i for the runs that have a value there."""
    return [(seed, v[i]) for seed, _, v in rows if v[i] is not None]


def _drop_none(pairs: list[tuple[int | None, float | None]]) -> list[tuple[int | None, float]]:
    """The (seed, value) pairs that have a value."""
    return [(s, v) for s, v in pairs if v is not None]
