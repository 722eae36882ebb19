"""Loss curves from a run's ``metrics.jsonl`` as one PNG."""

from __future__ import annotations

import json
from pathlib import Path

from sra.atomic import atomic_path

# The panels drawn, in order, when the run logged them.
PANELS = (("loss", "total loss"), ("denoise", "denoising loss"), ("align", "alignment loss"),
          ("cosine", "student·target cosine"), ("grad_norm", "grad norm"), ("lr", "learning rate"),
          ("fid", "FID (EMA, in training)"), ("digits_fd", "digits FD (EMA, in training)"))


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSON-lines file. Only a torn *last* line (a run killed mid-write leaves one,
    without its newline) is skipped; any other unreadable line is an error naming it."""
    from sra.errors import SraError

    lines = Path(path).read_text().splitlines(keepends=True)
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1 and not line.endswith("\n"):
                break  # torn by a kill
            raise SraError(f"{path}: line {i + 1} is not JSON ({exc.msg})") from None
    return rows


def plot_curves(metrics_jsonl: str | Path, out_png: str | Path, title: str = "") -> Path | None:
    """Plot every logged panel against the step; returns the PNG path (None if nothing logged)."""
    rows = [r for r in read_jsonl(metrics_jsonl) if "step" in r]
    panels = [(k, label) for k, label in PANELS if any(k in r for r in rows)]
    if not rows or not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, (key, label) in zip(axes.flat, panels):
        pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        if key in ("loss", "denoise", "grad_norm") and all(p[1] > 0 for p in pts):
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out_png)
    try:
        with atomic_path(out) as tmp:  # never a torn PNG, also on a full disk
            fig.savefig(tmp, dpi=110, format=out.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return out
