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
