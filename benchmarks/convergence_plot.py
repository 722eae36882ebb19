"""The convergence study's figure: digit-classifier FD vs step, one panel per regime, each arm's
mean line over seeds plus faint per-seed lines."""

from __future__ import annotations

from pathlib import Path

COLORS = {"vanilla": "tab:gray", "sra": "tab:red"}


def write_plot(summaries: list[dict], path: Path) -> Path | None:
    """FD vs step: one panel per regime, mean line + faint per-seed lines per arm."""
    if not summaries:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(summaries)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.3 * rows), squeeze=False)
    for ax, summ in zip(axes.flat, summaries):
        for role in ("vanilla", "sra"):
            arm = summ["arms"][role]
            for r in arm["runs"]:
                ax.plot([e["step"] for e in r["eval"]], [e["fd"] for e in r["eval"]],
                        color=COLORS[role], alpha=0.25, lw=0.8)
            steps = sorted(arm["table"])
            ax.plot(steps, [arm["table"][s]["fd"][0] for s in steps], color=COLORS[role], lw=2,
                    marker="o", ms=3, label=f"{arm['arm']} (n={len(arm['runs'])})")
        ax.set_title(summ["regime"].name, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("digit-classifier FD (↓)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


FAMILY_COLORS = {"vanilla": "tab:gray", "sra": "tab:red", "dts-as": "tab:blue",
                 "dts-sf": "tab:cyan", "dts-as-full": "tab:olive", "dts-noalign": "tab:purple",
                 "repa": "tab:green"}


def write_family_plot(summ: dict, path: Path) -> Path | None:
    """A family regime: FD vs step and FD vs cumulative CPU time (steps × the arm's CPU seconds
    per step), every arm's mean over seeds with a ± standard-error band."""
    from convergence_family import curve_bands
    from convergence_family_report import short

    if not summ["arms"][summ["regime"].vanilla]["runs"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for arm, table in summ["arms"].items():
        runs, name = table["runs"], short(summ, arm)
        if not runs:
            continue
        c = summ["cost"][arm][0]
        for ax, scale in ((axes[0], 1.0), (axes[1], c / 60 if c == c else None)):
            if scale is None:
                continue
            xs, ms, ses = curve_bands(runs, scale)
            color = FAMILY_COLORS.get(name)
            ax.plot(xs, ms, marker="o", ms=3, lw=1.6, color=color, label=f"{name} (n={len(runs)})")
            ax.fill_between(xs, [m - s for m, s in zip(ms, ses)], [m + s for m, s in zip(ms, ses)],
                            color=color, alpha=0.2, lw=0)
    axes[0].set_xlabel("optimizer step")
    axes[1].set_xlabel("cumulative training CPU time (min, one thread)")
    for ax in axes:
        ax.set_ylabel("digit-classifier FD (↓)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{summ['regime'].name}: mean ± SE over seeds", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
