"""Aggregation of a multi-arm ("family") regime: every arm against the regime's vanilla arm,
paired by seed, at equal steps and at equal compute, with the differences beyond 2 standard
errors marked.

Equal compute: an arm's cost per optimizer step is its runs' mean process CPU time per step
(``cpu_per_step_s``; one thread per run). At vanilla's eval step s (cumulative cost s·c_v) the arm
has reached step s·c_v/c_a; its FD there is linearly interpolated between its two neighbouring
eval points (no extrapolation: before its first or after its last eval there is no value).
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

from convergence_setup import Regime
from convergence_stats import _arm_table, late_steps, mean_over, mean_std

SIG_SE = 2.0  # |Δ| beyond this many standard errors is marked


def interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float | None:
    """Linear interpolation of (xs ascending, ys) at x; None outside [xs[0], xs[-1]]."""
    if not xs or x < xs[0] - 1e-9 or x > xs[-1] + 1e-9:
        return None
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 - 1e-9 <= x <= x1 + 1e-9:
            w = 0.0 if x1 == x0 else min(max((x - x0) / (x1 - x0), 0.0), 1.0)
            return y0 + w * (y1 - y0)
    return float(ys[0])  # a single eval point, x equal to it


def significance(mean: float, se: float, k: float = SIG_SE) -> str:
    """"better" (Δ FD < 0) or "worse" when |mean| > k·se, else "" (also when se is undefined)."""
    if not (math.isfinite(mean) and math.isfinite(se)) or abs(mean) <= k * se:
        return ""
    return "better" if mean < 0 else "worse"


def paired(arm: dict[int, float | None], van: dict[int, float | None]) -> dict[str, Any]:
    """Paired Δ = arm − vanilla over the seeds both have a finite value for: mean, its standard
    error (sample std / √n; NaN for one seed), n, the per-seed differences, the 2-SE mark and
    the arm's own values on those seeds."""
    d = {s: arm[s] - van[s] for s in sorted(set(arm) & set(van))
         if arm[s] is not None and van[s] is not None and math.isfinite(arm[s] - van[s])}
    m, sd = mean_std(list(d.values()))
    se = sd / math.sqrt(len(d)) if len(d) > 1 else math.nan
    return {"mean": m, "se": se, "n": len(d), "per_seed": d, "sig": significance(m, se),
            "values": {s: arm[s] for s in d}}


def eval_curve(run: dict, key: str = "fd") -> tuple[list[int], list[float]]:
    """A run's (eval steps, metric values), ascending, finite values only."""
    pts = sorted((e["step"], e[key]) for e in run["eval"]
                 if e.get(key) is not None and math.isfinite(e[key]))
    return [p[0] for p in pts], [p[1] for p in pts]


def cost_per_step(runs: Sequence[dict]) -> tuple[float, float]:
    """Mean ± std over runs of the CPU seconds per optimizer step (NaN when none measured)."""
    return mean_std([r.get("cpu_per_step_s") for r in runs])


def fd_at_cost(run: dict, cost: float, c_step: float) -> float | None:
    """The run's FD where its cumulative cost (steps × ``c_step``) equals ``cost``."""
    if not (math.isfinite(c_step) and c_step > 0):
        return None
    steps, fds = eval_curve(run)
    return interp(steps, fds, cost / c_step)


def summarize_family(regime: Regime, results: dict[str, dict], bench: dict | None = None) -> dict:
    """Per-arm tables, costs, paired Δ vs vanilla at equal steps and equal compute, late window,
    each arm's best step, the best DTS/AS variant and the positive control's verdict. ``bench``
    (:mod:`convergence_cost`'s side-by-side costs) adds the late Δ at equal compute under its
    cost ratios, a check of the in-run costs."""
    names = (regime.vanilla, *regime.arms)
    arms = {a: _arm_table(a, results) for a in names}
    van = arms[regime.vanilla]
    steps = sorted(van["table"])
    cost = {a: cost_per_step(arms[a]["runs"]) for a in names}
    c_v = cost[regime.vanilla][0]
    v_fd = {r["seed"]: {s: mean_over(r, "fd", [s]) for s in steps} for r in van["runs"]}
    out: dict[str, Any] = {"regime": regime, "arms": arms, "steps": steps, "cost": cost,
                           "equal_steps": {}, "equal_compute": {}, "late": {}, "best": {}}
    common = sorted(set(steps).intersection(*(set(arms[a]["table"]) for a in names))) or steps
    window = late_steps(common) if common else []
    out["late_steps"] = window
    for a in names:
        runs = {r["seed"]: r for r in arms[a]["runs"]}
        c_a = cost[a][0]
        at_step = {s: paired({k: mean_over(r, "fd", [s]) for k, r in runs.items()},
                             {k: v[s] for k, v in v_fd.items()}) for s in steps}
        at_cost = {s: paired({k: fd_at_cost(r, s * c_v, c_a) for k, r in runs.items()},
                             {k: v[s] for k, v in v_fd.items()}) for s in steps}
        out["equal_steps"][a], out["equal_compute"][a] = at_step, at_cost
        late_fd = {k: mean_over(r, "fd", window) for k, r in runs.items()}
        late_cost = {k: _mean_or_none([fd_at_cost(r, s * c_v, c_a) for s in window])
                     for k, r in runs.items()}
        v_late = {k: _mean_or_none([v[s] for s in window]) for k, v in v_fd.items()}
        fd_ms = mean_std(list(late_fd.values()))
        n = sum(math.isfinite(x) for x in late_fd.values())
        out["late"][a] = {
            "fd": fd_ms, "fd_se": fd_ms[1] / math.sqrt(n) if n > 1 else math.nan,
            "acc": mean_std([mean_over(r, "acc", window) for r in runs.values()]),
            "delta": paired(late_fd, v_late), "delta_compute": paired(late_cost, v_late),
            "cost_ratio": c_a / c_v if c_v and math.isfinite(c_v) else math.nan,
        }
        out["best"][a] = {"steps": _best(at_step), "compute": _best(at_cost)}
        b = (bench or {}).get("arms", {})
        if a in b and regime.vanilla in b and math.isfinite(c_v):
            c_b = c_v * b[a]["median_s"] / b[regime.vanilla]["median_s"]  # bench ratio, our scale
            out["late"][a]["bench_ratio"] = c_b / c_v
            out["late"][a]["delta_compute_bench"] = paired(
                {k: _mean_or_none([fd_at_cost(r, s * c_v, c_b) for s in window])
                 for k, r in runs.items()}, v_late)
    out["dts_best"] = best_dts(regime, results, out["late"])
    out["control"] = control_verdict(regime, out)
    return out


def _mean_or_none(xs: Sequence[float | None]) -> float | None:
    """Mean of the values, None if any is missing (a window average needs every point)."""
    if not xs or any(x is None or not math.isfinite(x) for x in xs):
        return None
    return statistics.fmean(xs)


def _best(by_step: dict[int, dict]) -> dict | None:
    """The arm's best showing: the step with the most negative Δ/SE (the strongest evidence of a
    lower FD than vanilla; FD's scale changes 40-fold over a run, so the raw Δ would pick the
    noisiest early step), or the most negative Δ where no step has an SE; with its paired Δ."""
    ok = [(s, d) for s, d in by_step.items() if d["n"] and math.isfinite(d["mean"])]
    with_se = [(s, d) for s, d in ok if math.isfinite(d["se"]) and d["se"] > 0]
    if with_se:
        s, d = min(with_se, key=lambda sd: sd[1]["mean"] / sd[1]["se"])
    elif ok:
        s, d = min(ok, key=lambda sd: sd[1]["mean"])
    else:
        return None
    return {"step": s, **d}


def best_dts(regime: Regime, results: dict[str, dict], late: dict[str, dict]) -> str | None:
    """The DTS/AS arm with alignment (groups on, SRA alignment on) with the lowest late FD."""
    cands = []
    for a in regime.arms:
        run = next((r for r in results.values() if r["arm"] == a), None)
        cfg = (run or {}).get("config", {})
        groups, align = cfg.get("groups") or {}, cfg.get("align") or {}
        if groups.get("mask_ratios") and align.get("enabled") and cfg.get("align_target") == "ema":
            if math.isfinite(late[a]["fd"][0]):
                cands.append((late[a]["fd"][0], a))
    return min(cands)[1] if cands else None


def control_verdict(regime: Regime, summary: dict) -> dict | None:
    """Whether the positive control beats vanilla by more than 2 SE at some eval step (equal
    steps), and where."""
    if not regime.control or regime.control not in summary["equal_steps"]:
        return None
    wins = [s for s, d in summary["equal_steps"][regime.control].items() if d["sig"] == "better"]
    return {"arm": regime.control, "detected": bool(wins), "steps": wins}


def curve_bands(runs: Sequence[dict], scale: float = 1.0) -> tuple[list[float], list[float], list[float]]:
    """(x = step × scale, mean FD, standard error) at each eval step the runs share."""
    steps = sorted(set.intersection(*(set(eval_curve(r)[0]) for r in runs))) if runs else []
    xs, ms, ses = [], [], []
    for s in steps:
        m, sd = mean_std([mean_over(r, "fd", [s]) for r in runs])
        xs.append(s * scale)
        ms.append(m)
        ses.append(sd / math.sqrt(len(runs)) if len(runs) > 1 else 0.0)
    return xs, ms, ses

