"""Which metric ``sra compare`` reads, which direction is better, and that every run measured it
the same way (one reference batch, sampler, sample count and seed): otherwise the numbers are
not comparable and the comparison stops with one line."""

from __future__ import annotations

import json
from typing import Sequence

from sra.compare.runs import Point, Run, metric_names, metric_points
from sra.errors import SraError

DEFAULT_METRICS = ("fid", "digits_fd")  # the first one any run has is the default
# What the in-training quality probe writes (sra.training.fid); their definition is checked.
QUALITY_METRICS = {"fid", "inception_score", "digits_fd", "digits_acc"}
INCEPTION_METRICS = {"fid", "inception_score"}  # these also depend on the reference and network
HIGHER_IS_BETTER = {"inception_score", "digits_acc", "precision", "recall", "accuracy", "acc", "is"}


def lower_is_better(metric: str) -> bool:
    """Lower is better unless the metric is known to be higher-is-better (IS, accuracy, P/R)."""
    return metric not in HIGHER_IS_BETTER


def choose_metric(runs: Sequence[Run], metric: str | None) -> str:
    """``metric`` if some run has it, else the default (``fid``, then ``digits_fd``)."""
    found = set().union(*(metric_names(r) for r in runs)) if runs else set()
    if metric is None:
        metric = next((m for m in DEFAULT_METRICS if m in found), None)
        if metric is None:
            raise SraError(f"no run has fid or digits_fd records (train with --fid-every N); "
                           f"pass --metric, one of: {', '.join(sorted(found)) or 'none found'}")
    elif metric not in found:
        raise SraError(f"no run has {metric!r} records; allowed: {', '.join(sorted(found)) or 'none found'}")
    return metric


def definition(run: Run, point: Point, metric: str) -> dict[str, str]:
    """How ``point`` was measured, as flag → value text (the fields that change the number)."""
    fid = run.config.get("fid") or {}
    sampler = fid.get("sampler") or {}
    # The probe samples with the run's own interpolant: path_type belongs to the model.
    out = {f"--fid-sampler {k}": json.dumps(v) for k, v in sorted(sampler.items()) if k != "path_type"}
    out["--fid-samples"] = str(point.samples)
    out["fid seed"] = str(fid.get("seed"))
    if metric in INCEPTION_METRICS:
        out["--fid-ref"] = str(fid.get("ref"))
        out["--inception-weights"] = str(fid.get("inception_weights"))
    return out


def check_definitions(runs: Sequence[Run], metric: str) -> None:
    """One line naming the first field measured differently across the runs' evaluations."""
    if metric not in QUALITY_METRICS:
        return
    seen: dict[str, dict[str, list[str]]] = {}  # field → value → runs
    for run in runs:
        for p in metric_points(run, metric):
            for k, v in definition(run, p, metric).items():
                names = seen.setdefault(k, {}).setdefault(v, [])
                if run.name not in names:
                    names.append(run.name)
    for k, values in seen.items():
        if len(values) > 1:
            parts = " vs ".join(f"{k} {v} ({', '.join(rs)})" for v, rs in values.items())
            raise SraError(f"{metric} is measured differently across the runs: {parts}; compare "
                           f"runs scored with the same --fid-ref, --fid-sampler, --fid-samples "
                           f"and seed")
