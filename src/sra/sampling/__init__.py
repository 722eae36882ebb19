"""Samplers: pure solver functions on given time grids; guidance (CFG + interval) apart; jobs on top.

- :mod:`~sra.sampling.flow` (Euler/Heun/SDE), :mod:`~sra.sampling.ddpm` (ancestral/DDIM): solvers
  taking their grid and a per-step callback; :mod:`~sra.sampling.schedules` builds the grids;
  :mod:`~sra.sampling.callbacks`: the step info and progress bars;
- :mod:`~sra.sampling.solvers`: :func:`generate`, a :class:`SamplerConfig` → grid + solver + guidance;
- :mod:`~sra.sampling.seeding` and :mod:`~sra.sampling.fixed`: the one fixed-noise scheme
  (:func:`sample_fixed`);
- :mod:`~sra.sampling.job`, :mod:`~sra.sampling.outputs`, :mod:`~sra.sampling.runner`: ``sra sample``.
"""

from sra.sampling.config import MODES, PRESETS, SamplerConfig, preset
from sra.sampling.fixed import sample_fixed
from sra.sampling.guidance import cfg_combine, guided
from sra.sampling.solvers import SOLVERS, generate

__all__ = ["MODES", "PRESETS", "SamplerConfig", "preset", "cfg_combine", "guided", "SOLVERS", "generate",
           "sample_fixed"]
