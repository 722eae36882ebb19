"""``sra compare``: training runs side by side — arms formed from the runs' configs, the metric
at equal steps, images seen and compute, mean ± SE over seeds, Δ vs a baseline (paired by seed,
else Welch), marks beyond 2 SE, the late window. Files by job: :mod:`~sra.compare.runs` (reading a
run), :mod:`~sra.compare.metric`, :mod:`~sra.compare.arms`, :mod:`~sra.compare.stats`,
:mod:`~sra.compare.analysis` (the tables), :mod:`~sra.compare.pipeline` (end to end),
:mod:`~sra.compare.report` (markdown, JSON) and :mod:`~sra.compare.plot` (the figure)."""

from sra.compare.pipeline import Comparison, compare

__all__ = ["Comparison", "compare"]
