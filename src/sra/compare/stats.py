"""The statistics of ``sra compare``: mean ± standard error over seeds, the difference from the
baseline (paired by seed, else Welch), the 2-SE mark, linear interpolation without extrapolation
and the late window. Pure functions of numbers; no file or config is read here."""

from __future__ import annotations

import bisect
import math
import statistics
from dataclasses import dataclass
from typing import Sequence

SIG_SE = 2.0  # |Δ| beyond this many standard errors is marked
NAN = math.nan


@dataclass(frozen=True)
class Estimate:
    """A mean over n values and its standard error (sample std / √n; NaN for n < 2)."""

    mean: float
    se: float
    n: int


@dataclass(frozen=True)
class Delta:
    """arm − baseline: the mean difference, its standard error, the seeds used, and whether the
    runs were paired by seed (else Welch: two independent samples)."""

    mean: float
    se: float
    n: int
    n_base: int
    paired: bool

    def mark(self, k: float = SIG_SE) -> str:
        """"↓" (lower than the baseline) or "↑" (higher) when |Δ| > k·SE, else ""."""
        if not (math.isfinite(self.mean) and math.isfinite(self.se)) or abs(self.mean) <= k * self.se:
            return ""
        return "↓" if self.mean < 0 else "↑"


def best_index(deltas: Sequence[Delta], lower_is_better: bool = True) -> int | None:
    """The point of an arm's strongest showing against the baseline: the most favourable Δ/SE
    (a metric's scale can change many-fold over a run, so the raw Δ would pick the noisiest early
    point), or the most favourable Δ where no point has an SE; None when no point has a Δ."""
    sign = 1.0 if lower_is_better else -1.0
    ok = [(i, d) for i, d in enumerate(deltas) if d.n and math.isfinite(d.mean)]
    with_se = [(i, d) for i, d in ok if math.isfinite(d.se) and d.se > 0]
    if with_se:
        return min(with_se, key=lambda p: sign * p[1].mean / p[1].se)[0]
    return min(ok, key=lambda p: sign * p[1].mean)[0] if ok else None


def marked(deltas: Sequence[Delta], mark: str) -> list[int]:
    """The indices of the points whose Δ carries ``mark`` (↓ or ↑: beyond 2 SE that way)."""
    return [i for i, d in enumerate(deltas) if d.mark() == mark]


def finite(xs: Sequence[float | None]) -> list[float]:
    """The values that are numbers (None and NaN dropped)."""
    return [float(x) for x in xs if x is not None and math.isfinite(x)]


def mean_se(xs: Sequence[float | None]) -> Estimate:
    """Mean ± standard error of the finite values."""
    v = finite(xs)
    if not v:
        return Estimate(NAN, NAN, 0)
    se = statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else NAN
    return Estimate(statistics.fmean(v), se, len(v))


def paired_delta(arm: dict[int, float | None], base: dict[int, float | None]) -> Delta:
    """Mean of the per-seed differences arm[s] − base[s] over the seeds both have a value for,
    ± the standard error of that mean (their std / √n)."""
    d = finite([arm[s] - base[s] for s in arm
                if s in base and arm[s] is not None and base[s] is not None])
    est = mean_se(d)
    return Delta(est.mean, est.se, est.n, est.n, paired=True)


def welch_delta(arm: Sequence[float | None], base: Sequence[float | None]) -> Delta:
    """mean(arm) − mean(base) ± sqrt(s_a²/n_a + s_b²/n_b) (Welch; NaN unless both n ≥ 2)."""
    a, b = mean_se(arm), mean_se(base)
    se = math.hypot(a.se, b.se) if a.n > 1 and b.n > 1 else NAN
    return Delta(a.mean - b.mean, se, a.n, b.n, paired=False)


def can_pair(arm_seeds: Sequence[int], base_seeds: Sequence[int]) -> bool:
    """Seeds pair when each arm seed appears once in the arm and once in the baseline."""
    return (len(set(arm_seeds)) == len(arm_seeds) and len(set(base_seeds)) == len(base_seeds)
            and bool(arm_seeds) and set(arm_seeds) <= set(base_seeds))


def delta(arm: Sequence[tuple[int, float | None]], base: Sequence[tuple[int, float | None]]) -> Delta:
    """arm − baseline from (seed, value) lists: paired by seed when :func:`can_pair`, else Welch."""
    arm_seeds, base_seeds = [s for s, _ in arm], [s for s, _ in base]
    if can_pair(arm_seeds, base_seeds):
        return paired_delta(dict(arm), dict(base))
    return welch_delta([v for _, v in arm], [v for _, v in base])


def interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float | None:
    """Linear interpolation of the points (xs ascending) at x; None outside [xs[0], xs[-1]] —
    an equal-compute value is never extrapolated."""
    if not xs:
        return None
    tol = 1e-9 * max(1.0, abs(xs[-1]))
    if x < xs[0] - tol or x > xs[-1] + tol:
        return None
    i = min(max(bisect.bisect_left(xs, x - tol), 1), len(xs) - 1)  # xs[i-1] < x ≤ xs[i]
    if len(xs) == 1:
        return float(ys[0])
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    w = 0.0 if x1 == x0 else min(max((x - x0) / (x1 - x0), 0.0), 1.0)
    return y0 + w * (y1 - y0)


def late_count(n: int, fraction: float) -> int:
    """How many of n evaluations the late window holds: the last ⌈fraction·n⌉ (at least one)."""
    return min(n, max(1, math.ceil(fraction * n - 1e-9))) if n else 0


def window_mean(values: Sequence[float | None]) -> float | None:
    """A run's mean over the window's points; None if any point is missing (a window average
    over fewer points would not be comparable with the other seeds')."""
    if not values or any(v is None or not math.isfinite(v) for v in values):
        return None
    return statistics.fmean(values)
