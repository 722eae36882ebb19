"""``compare.png``: the metric vs optimizer steps and vs compute, one colour per arm — each seed a
faint line, the arm's mean a solid line with a ± standard-error band."""

from __future__ import annotations

from pathlib import Path

from sra.compare import stats
from sra.compare.analysis import arm_compute
from sra.compare.arms import Arm
from sra.compare.pipeline import Comparison
from sra.compare.runs import compute_at, metric_points


def _arm_curves(arm: Arm, metric: str) -> tuple[list[int], list[stats.Estimate]]:
    """The arm's mean ± SE at the steps all its runs evaluated."""
    sets = [{p.step: p.value for p in metric_points(r, metric)} for r in arm.runs]
    steps = sorted(set.intersection(*(set(s) for s in sets)))
    return steps, [stats.mean_se([s[k] for s in sets]) for k in steps]


def _draw_arm(ax, arm: Arm, cmp: Comparison, color, compute: bool) -> bool:
    """One arm on one panel; False when the panel has nothing of it (no compute)."""
    xs_of = arm_compute(arm, cmp.compute_unit, cmp.metric) if compute else None
    drawn = False
    for run in arm.runs:
        pts = metric_points(run, cmp.metric)
        if compute:  # each seed at its own measured compute
            if run.compute_unit != cmp.compute_unit:
                continue
            pts = [(compute_at(run, p.step), p.value) for p in pts]
            pts = [(x, v) for x, v in pts if x is not None]
        else:
            pts = [(p.step, p.value) for p in pts]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, alpha=0.25, lw=0.8)
            drawn = True
    steps, est = _arm_curves(arm, cmp.metric)
    if compute:
        keep = [i for i, s in enumerate(steps) if s in xs_of]
        x = [xs_of[steps[i]] for i in keep]
        est = [est[i] for i in keep]
    else:
        x = steps
    if x:
        m = [e.mean for e in est]
        se = [e.se if e.se == e.se else 0.0 for e in est]
        ax.plot(x, m, color=color, lw=2, marker="o", ms=3, label=f"{arm.name} (n={len(arm.runs)})")
        ax.fill_between(x, [a - b for a, b in zip(m, se)], [a + b for a, b in zip(m, se)],
                        color=color, alpha=0.2, lw=0)
    return drawn or bool(x)


def write_plot(cmp: Comparison, path: str | Path) -> Path:
    """Draw both panels into ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if len(cmp.arms) > len(colors):  # the default cycle has 10: more arms would share colours
        colors = list(plt.get_cmap("tab20").colors)
    values = [p.value for a in cmp.arms for r in a.runs for p in metric_points(r, cmp.metric)]
    log_y = min(values) > 0 and max(values) / min(values) > 20  # FD falls 40-fold early on
    any_compute = False
    for k, arm in enumerate(cmp.arms):
        color = colors[k % len(colors)]
        _draw_arm(axes[0], arm, cmp, color, compute=False)
        any_compute |= _draw_arm(axes[1], arm, cmp, color, compute=True)
    better = "↓" if cmp.lower_is_better else "↑"
    axes[0].set_xlabel("optimizer step")
    axes[1].set_xlabel(f"cumulative training compute ({cmp.compute_unit or 's'})")
    if not any_compute or cmp.tables["compute"].unavailable:
        axes[1].text(0.5, 0.5, "compute unavailable\n(no compute_s in the records)",
                     ha="center", va="center", transform=axes[1].transAxes)
    for ax in axes:
        ax.set_ylabel(f"{cmp.metric} ({better})")
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{cmp.metric}: mean ± SE over seeds, baseline {cmp.baseline.name}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
