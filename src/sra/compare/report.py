"""The comparison as text: ``compare.md`` (also printed) and ``compare.json`` (every number,
NaN written as null)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from sra.atomic import atomic_write_json
from sra.compare.analysis import AxisTable
from sra.compare.arms import differing_keys, fmt_value
from sra.compare.pipeline import Comparison
from sra.compare.stats import SIG_SE, Delta, Estimate, best_index, marked

AXIS_TITLES = {"steps": "Equal steps", "images": "Equal images seen",
               "compute": "Equal compute: at the baseline's mean cumulative compute"}


def _decimals(x: float, digits: int) -> int:
    """Decimals that show ``digits`` significant digits of x (0 … 6)."""
    if not math.isfinite(x) or x == 0:
        return 2
    return min(6, max(0, digits - 1 - math.floor(math.log10(abs(x)))))


def fmt(mean: float, se: float = math.nan, signed: bool = False) -> str:
    """"m ± se" with one decimal count: 2 significant digits of the SE, at least 3 of the mean
    (4 when there is no SE)."""
    if not math.isfinite(mean):
        return "–"
    d = max(_decimals(mean, 3), _decimals(se, 2)) if math.isfinite(se) else _decimals(mean, 4)
    text = f"{mean:+.{d}f}" if signed else f"{mean:.{d}f}"
    return text + (f" ± {se:.{d}f}" if math.isfinite(se) else "")


def fmt_est(e: Estimate | None) -> str:
    return "–" if e is None or not e.n else fmt(e.mean, e.se)


def fmt_delta(d: Delta | None) -> str:
    """Δ ± SE, bold with ↓/↑ beyond 2 SE, "(W)" when unpaired."""
    if d is None or not d.n or not math.isfinite(d.mean):
        return "–"
    text = fmt(d.mean, d.se, signed=True)
    mark = d.mark()
    text = f"**{text}** {mark}" if mark else text
    return text + ("" if d.paired else " (W)")


def _header(cmp: Comparison) -> list[str]:
    better = "lower" if cmp.lower_is_better else "higher"
    f = f"{cmp.late_fraction:.3g}"
    late = f"the last ⌈{f}·n⌉ of a table's n evaluation points (`--late {f}`)"
    return [f"# sra compare: `{cmp.metric}` ({better} is better)", "",
            f"Baseline `{cmp.baseline.name}`. Mean ± standard error over seeds. Δ = arm − "
            f"baseline, paired by seed where the baseline has each of the arm's seeds, else "
            f"unpaired with Welch's SE (marked (W)); **bold ↓/↑**: |Δ| > {SIG_SE:g} SE (↓ lower, "
            f"↑ higher than the baseline). Late: the mean over {late}. Values between "
            f"evaluations are interpolated linearly, never extrapolated.", ""]


def _ratio(cost: Estimate | None, base: Estimate | None) -> float | None:
    """Compute per step × the baseline's (None where either is unmeasured)."""
    if not (cost and cost.n and base and base.n and base.mean > 0):
        return None
    return cost.mean / base.mean


def _arms(cmp: Comparison) -> list[str]:
    unit = cmp.compute_unit or "s"
    steps, compute = cmp.tables["steps"], cmp.tables["compute"]
    base_cost = cmp.cost.get(cmp.baseline.name)
    lines = [f"| arm | runs | seeds | compute/step ({unit}) | × baseline | late ± SE | "
             f"late Δ, equal steps | late Δ, equal compute | best Δ, equal steps | "
             f"beyond {SIG_SE:g} SE, equal steps | beyond {SIG_SE:g} SE, equal compute |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm in cmp.arms:
        c = cmp.cost.get(arm.name)
        ratio = _ratio(c, base_cost)
        ratio = "–" if ratio is None else f"{ratio:.2f}"
        lines.append(f"| `{arm.name}` | {len(arm.runs)} | {', '.join(map(str, arm.seeds))} | "
                     f"{fmt_est(c)} | {ratio} | {fmt_est(steps.late_mean.get(arm.name))} | "
                     f"{fmt_delta(steps.late_delta.get(arm.name))} | "
                     f"{fmt_delta(compute.late_delta.get(arm.name)) if not compute.unavailable else '–'} | "
                     f"{_best(cmp, steps, arm.name)} | {_beyond(steps, arm.name)} | "
                     f"{_beyond(compute, arm.name) if not compute.unavailable else '–'} |")
    return lines


def _best(cmp: Comparison, t: AxisTable, arm: str) -> str:
    """The arm's strongest showing on the axis: "Δ ± SE @ step"."""
    deltas = t.delta.get(arm, [])
    i = best_index(deltas, cmp.lower_is_better)
    return "–" if i is None else f"{fmt_delta(deltas[i])} @ {t.steps[i]}"


def step_ranges(steps: Sequence[int], idx: Sequence[int]) -> str:
    """Grid indices → their steps, runs of neighbouring points as "a–b" ("375–1000, 125")."""
    parts, run = [], []
    for i in idx:
        if run and i != run[-1] + 1:
            parts.append(run)
            run = []
        run.append(i)
    if run:
        parts.append(run)
    return ", ".join(f"{steps[r[0]]}" if len(r) == 1 else f"{steps[r[0]]}–{steps[r[-1]]}"
                     for r in parts)


def _beyond(t: AxisTable, arm: str) -> str:
    """Where the arm's Δ is beyond 2 SE on the axis: "↓ 375–1000; ↑ 125", or "none"."""
    deltas = t.delta.get(arm)
    if deltas is None:
        return "–"
    out = [f"{m} {step_ranges(t.steps, marked(deltas, m))}" for m in ("↓", "↑") if marked(deltas, m)]
    return "; ".join(out) or "none"


def _axis(cmp: Comparison, t: AxisTable) -> list[str]:
    lines = [f"## {AXIS_TITLES[t.axis]}", ""]
    if t.unavailable:
        return lines + [f"Unavailable: {t.unavailable}.", ""]
    names = [a.name for a in cmp.arms]
    extra = t.axis == "compute"  # the compute column; the images axis is the images column
    head = ("| step | images seen |" if t.axis == "steps" else "| baseline step | images seen |"
            ) + (f" {t.unit} |" if extra else "")
    lines += [head + "".join(f" `{n}` |" for n in names),
              "|---|---|" + "---|" * (len(names) + extra)]
    for i, s in enumerate(t.steps):
        x = f" {t.x[i]:.4g} |" if extra else ""
        images = "–" if t.images[i] is None else t.images[i]
        lines.append(f"| {s} | {images} |{x}" + "".join(f" {fmt_est(t.mean[n][i])} |" for n in names))
    lines += ["", f"Late window: {'baseline ' if t.axis != 'steps' else ''}steps "
              f"{', '.join(str(t.steps[i]) for i in t.late)}."
              + (f" –: a run's evaluations do not reach that point on the {t.axis} axis "
                 f"(never extrapolated)." if t.axis != "steps" else "")]
    others = [n for n in names if n != cmp.baseline.name]
    if others:
        lines += ["", "Δ vs the baseline:", "", "| step |" + "".join(f" `{n}` |" for n in others),
                  "|---|" + "---|" * len(others)]
        for i, s in enumerate(t.steps):
            lines.append(f"| {s} |" + "".join(f" {fmt_delta(t.delta[n][i])} |" for n in others))
    return lines + [""]


def markdown(cmp: Comparison) -> str:
    """The whole report."""
    lines = _header(cmp) + ["## Arms", "", *_arms(cmp), ""]
    for axis in ("steps", "images", "compute"):
        if axis in cmp.tables:
            lines += _axis(cmp, cmp.tables[axis])
    for title, items in (("Warnings", cmp.warnings), ("Notes", cmp.notes),
                         ("Left out", cmp.left_out)):
        if items:
            lines += [f"## {title}", "", *(f"- {x}" for x in items), ""]
    return "\n".join(lines)


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def _est(e: Estimate | None) -> dict | None:
    return None if e is None else {"mean": _num(e.mean), "se": _num(e.se), "n": e.n}


def _delta(d: Delta | None) -> dict | None:
    return None if d is None else {"mean": _num(d.mean), "se": _num(d.se), "n": d.n,
                                   "n_baseline": d.n_base, "paired": d.paired, "mark": d.mark()}


def _table_json(t: AxisTable, lower_is_better: bool) -> dict[str, Any]:
    return {"unit": t.unit, "steps": t.steps, "images_seen": t.images, "x": [_num(x) for x in t.x],
            "late_steps": [t.steps[i] for i in t.late], "unavailable": t.unavailable or None,
            "arms": {name: {"mean": [_est(e) for e in t.mean[name]],
                            "delta": [_delta(d) for d in t.delta.get(name, [])] or None,
                            "late": _est(t.late_mean.get(name)),
                            "late_delta": _delta(t.late_delta.get(name)),
                            **_marks_json(t, name, lower_is_better),
                            "runs": [{"run": run, "seed": seed, "values": [_num(v) for v in vals]}
                                     for seed, run, vals in t.values[name]]}
                     for name in t.values}}


def _marks_json(t: AxisTable, arm: str, lower_is_better: bool) -> dict[str, Any]:
    """The arm's best point and the steps where its Δ is beyond 2 SE (none for the baseline)."""
    deltas = t.delta.get(arm)
    if not deltas:
        return {"best": None, "beyond_2se": None}
    i = best_index(deltas, lower_is_better)
    best = None if i is None else {"step": t.steps[i], "delta": _delta(deltas[i])}
    return {"best": best, "beyond_2se": {"lower": [t.steps[j] for j in marked(deltas, "↓")],
                                         "higher": [t.steps[j] for j in marked(deltas, "↑")]}}


def to_json(cmp: Comparison) -> dict[str, Any]:
    """The comparison as plain JSON data."""
    keys = differing_keys([a.config for a in cmp.arms])
    base_cost = cmp.cost.get(cmp.baseline.name)
    return {"metric": cmp.metric, "lower_is_better": cmp.lower_is_better,
            "baseline": cmp.baseline.name, "late_fraction": cmp.late_fraction,
            "compute_unit": cmp.compute_unit,
            "arms": [{"name": a.name, "runs": [r.name for r in a.runs], "seeds": a.seeds,
                      "differs": {k: fmt_value(a.config.get(k)) for k in keys},
                      "compute_per_step": _est(cmp.cost.get(a.name)),
                      "cost_ratio": _ratio(cmp.cost.get(a.name), base_cost)} for a in cmp.arms],
            "tables": {axis: _table_json(t, cmp.lower_is_better) for axis, t in cmp.tables.items()},
            "warnings": cmp.warnings, "notes": cmp.notes, "left_out": cmp.left_out}


def write_report(cmp: Comparison, out: str | Path) -> dict[str, Path]:
    """``compare.md`` and ``compare.json`` in ``out`` (created)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "compare.md"
    md.write_text(markdown(cmp))
    js = atomic_write_json(out / "compare.json", to_json(cmp))
    return {"markdown": md, "json": js}
