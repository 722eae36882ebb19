"""One run directory as ``sra compare`` sees it: its resolved config, its metrics records, the
evaluations of one metric (with ``eval_digits.json`` merged in), and its cumulative compute and
images seen at any step.

Records read (``metrics.jsonl``, written by :mod:`sra.training.loop` and :mod:`sra.training.fid`):
every record has ``step``; training log records carry ``loss`` …, quality records ``fid`` /
``inception_score`` or ``digits_fd`` / ``digits_acc`` with ``fid_samples``; records may carry
``compute_s`` (cumulative training compute, seconds) and ``images_seen``. ``config.json`` may
carry ``compute_unit`` (``cpu-process-s`` or ``device-s``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sra.compare.stats import interp
from sra.errors import SraError
from sra.training.fid import EVAL_DIGITS_FILE
from sra.training.monitor import METRICS_FILE
from sra.viz.curves import read_jsonl

# Record keys that count or time the run rather than measure the model: never a --metric.
BOOKKEEPING = {"step", "compute_s", "images_seen", "fid_samples", "fid_seconds", "epoch",
               "skipped", "lr", "weight"}
# eval_digits.json's keys → the metrics.jsonl names of the same measurement
EVAL_DIGITS_KEYS = {"fd": "digits_fd", "acc": "digits_acc"}


@dataclass(frozen=True)
class Point:
    """One evaluation of a metric: the step, the value and how many samples it scored."""

    step: int
    value: float
    samples: int | None


@dataclass
class Run:
    """A run directory's config and records."""

    path: Path
    config: dict
    records: list[dict]
    eval_digits: dict | None = None
    notes: list[str] = field(default_factory=list)
    # what the functions below derive from the records, once per run (runs can hold 10⁵ records)
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def name(self) -> str:
        return str(self.path)

    @property
    def seed(self) -> int | None:
        return (self.config.get("loop") or {}).get("seed")

    @property
    def max_steps(self) -> int | None:
        return (self.config.get("loop") or {}).get("max_train_steps")

    @property
    def last_step(self) -> int:
        """The last step any record reached (0 for none)."""
        return max((int(r["step"]) for r in self.records if "step" in r), default=0)

    @property
    def compute_unit(self) -> str | None:
        return self.config.get("compute_unit")

    def status(self) -> str | None:
        """"still training" text when the run has not reached its last step, else None."""
        if self.max_steps and self.last_step < self.max_steps:
            return f"still training or stopped: step {self.last_step} of {self.max_steps}"
        return None


def read_run(path: str | Path) -> Run:
    """Read ``config.json`` (required), ``metrics.jsonl`` and ``eval_digits.json`` (optional)."""
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise SraError(f"{path} is not a run directory (no config.json); pass the folders that "
                       f"`sra train` wrote (OUTPUT_DIR/EXP_NAME)")
    try:
        config = json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise SraError(f"{cfg_path} is not JSON ({exc})") from None
    metrics = path / METRICS_FILE
    records = [r for r in read_jsonl(metrics) if isinstance(r, dict)] if metrics.is_file() else []
    ev = None
    if (path / EVAL_DIGITS_FILE).is_file():
        try:
            ev = json.loads((path / EVAL_DIGITS_FILE).read_text())
        except ValueError:
            ev = None
    run = Run(path, config, records, ev)
    if not metrics.is_file():
        run.notes.append(f"{path}: no {METRICS_FILE}")
    return run


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def metric_names(run: Run) -> set[str]:
    """Every numeric record key of the run (what ``--metric`` may name)."""
    names = {k for r in run.records for k, v in r.items() if _number(v)}
    if run.eval_digits:
        names |= {m for k, m in EVAL_DIGITS_KEYS.items() if _number(run.eval_digits.get(k))}
    return names - BOOKKEEPING


def metric_points(run: Run, metric: str) -> list[Point]:
    """The run's evaluations of ``metric``, ascending by step (a step logged twice keeps its
    last record). ``eval_digits.json`` (the same probe as ``--fid-every``, with
    ``--eval-samples`` samples) adds its end-of-run point when no record holds that step and it
    scored as many samples as the records — another count would be another measurement."""
    key = ("points", metric)
    if key in run.cache:
        return run.cache[key]
    by_step: dict[int, Point] = {}
    for r in run.records:
        if "step" in r and _number(r.get(metric)):
            by_step[int(r["step"])] = Point(int(r["step"]), float(r[metric]), r.get("fid_samples"))
    ev = run.eval_digits or {}
    name = next((k for k, m in EVAL_DIGITS_KEYS.items() if m == metric), None)
    counts = {p.samples for p in by_step.values()}
    if (name and _number(ev.get(name)) and isinstance(ev.get("step"), int)
            and ev["step"] not in by_step and (not counts or ev.get("num_samples") in counts)):
        by_step[ev["step"]] = Point(ev["step"], float(ev[name]), ev.get("num_samples"))
    run.cache[key] = [by_step[s] for s in sorted(by_step)]
    return run.cache[key]


def compute_curve(run: Run) -> tuple[list[int], list[float]] | None:
    """(steps, cumulative compute_s) from every record that has it, anchored at (0, 0); None
    when no record has compute (the compute axis is then unavailable for the run)."""
    if "compute" not in run.cache:
        pts = {int(r["step"]): float(r["compute_s"]) for r in run.records
               if "step" in r and _number(r.get("compute_s"))}
        if pts:
            pts.setdefault(0, 0.0)  # no training compute has been spent before the first step
        steps = sorted(pts)
        run.cache["compute"] = (steps, [pts[s] for s in steps]) if pts else None
    return run.cache["compute"]


def compute_at(run: Run, step: int) -> float | None:
    """Cumulative compute at ``step``: the record's own ``compute_s``, else interpolated between
    the nearest records that have it (a quality record written without it); None outside."""
    curve = compute_curve(run)
    return interp(curve[0], curve[1], step) if curve else None


def cost_per_step(run: Run) -> float | None:
    """Compute per optimizer step: the last recorded cumulative compute / its step."""
    curve = compute_curve(run)
    if not curve or curve[0][-1] <= 0:
        return None
    return curve[1][-1] / curve[0][-1]


def images_at(run: Run, step: int) -> int | None:
    """Images seen by ``step``: a record's ``images_seen`` there, else step × global batch."""
    if "images" not in run.cache:
        run.cache["images"] = {int(r["step"]): int(r["images_seen"]) for r in run.records
                               if "step" in r and _number(r.get("images_seen"))}
    if step in run.cache["images"]:
        return run.cache["images"][step]
    batch = (run.config.get("loop") or {}).get("global_batch_size")
    return step * int(batch) if batch else None
