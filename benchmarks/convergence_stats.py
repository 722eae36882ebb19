"""Aggregation of the convergence study's runs: per-step mean ± std over seeds for each arm,
and the late-window effect size (Welch Δ; paired Δ where both arms share each seed's start)."""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

from convergence_setup import Regime

LATE_FRACTION = 2 / 3  # "late" summary: mean over eval steps ≥ this share of the last one
NAN_PAIR = (math.nan, math.nan)


def mean_std(xs: Sequence[float | None]) -> tuple[float, float]:
    """Mean and sample std of the finite values (std 0 for one value, NaN for none)."""
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return NAN_PAIR
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def mean_over(res: dict, key: str, steps: Sequence[int]) -> float:
    """A run's mean of eval metric ``key`` over ``steps``."""
    vals = [e[key] for e in res["eval"] if e["step"] in steps and e[key] is not None]
    return statistics.fmean(vals) if vals else math.nan


def diff(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """mean(a) − mean(b) and its standard error sqrt(s_a²/n_a + s_b²/n_b) (NaN if undefined)."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    if len(a) < 2 or len(b) < 2:
        return ma - mb, math.nan
    return ma - mb, math.sqrt(sa**2 / len(a) + sb**2 / len(b))


def late_steps(steps: Sequence[int]) -> list[int]:
    """The eval steps of the "late" window (where curves have flattened): those ≥ LATE_FRACTION
    of the last one (1500 steps, every 250 → 1000, 1250, 1500)."""
    last = max(steps)
    return [s for s in sorted(steps) if s >= LATE_FRACTION * last - 1e-9]


def _arm_table(arm: str, results: dict[str, dict]) -> dict:
    """One arm's runs (by seed) and its per-step mean ± std of FD and accuracy."""
    runs = sorted((r for r in results.values() if r["arm"] == arm), key=lambda r: r["seed"])
    steps = sorted({e["step"] for r in runs for e in r["eval"]})
    table = {}
    for s in steps:
        fd = [e["fd"] for r in runs for e in r["eval"] if e["step"] == s]
        acc = [e["acc"] for r in runs for e in r["eval"] if e["step"] == s]
        table[s] = {"fd": mean_std(fd), "acc": mean_std(acc), "n": len(fd)}
    return {"arm": arm, "seeds": [r["seed"] for r in runs], "table": table, "runs": runs}


def summarize_regime(regime: Regime, results: dict[str, dict]) -> dict:
    """Per-step mean/std of FD and accuracy for both arms, plus the late-window effect size."""
    arms = {role: _arm_table(arm, results)
            for role, arm in (("vanilla", regime.vanilla), ("sra", regime.sra))}
    common = sorted(set(arms["vanilla"]["table"]) & set(arms["sra"]["table"]))
    window = late_steps(common) if common else []
    late: dict[str, Any] = {"steps": window}
    for role in ("vanilla", "sra"):
        runs = arms[role]["runs"]
        late[role] = {k: mean_std([mean_over(r, k, window) for r in runs]) for k in ("fd", "acc")}
    # Δ = SRA − vanilla of the means, ± its standard error (Welch), for every regime.
    for key in ("fd", "acc"):
        late[f"{key}_diff"] = diff([mean_over(r, key, window) for r in arms["sra"]["runs"]],
                                   [mean_over(r, key, window) for r in arms["vanilla"]["runs"]])
    # Paired Δ where one seed gave both arms the same initial backbone and data order (runs made
    # after the head was moved behind the backbone's init): mean of the per-seed differences ±
    # its standard error. The noise streams still differ (the teacher's time draws random numbers).
    van = {r["seed"]: r for r in arms["vanilla"]["runs"]}
    pairs = [(r, van[r["seed"]]) for r in arms["sra"]["runs"]
             if r.get("paired_init") and r["seed"] in van]
    if pairs and len(pairs) == len(arms["sra"]["runs"]):
        for key in ("fd", "acc"):
            d = [mean_over(a, key, window) - mean_over(b, key, window) for a, b in pairs]
            m, sd = mean_std(d)
            late[f"{key}_paired"] = (m, sd / math.sqrt(len(d)) if len(d) > 1 else math.nan)
            late["pairs"] = len(d)
    per_step = {st: diff([mean_over(r, "fd", [st]) for r in arms["sra"]["runs"]],
                         [mean_over(r, "fd", [st]) for r in arms["vanilla"]["runs"]])
                for st in common}
    return {"regime": regime, "arms": arms, "late": late, "fd_diff_by_step": per_step}
