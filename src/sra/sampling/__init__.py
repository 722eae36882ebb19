"""Samplers: pure solver functions with one signature; guidance (CFG + interval) apart."""

from sra.sampling.config import MODES, PRESETS, SamplerConfig, preset
from sra.sampling.guidance import cfg_combine, guided
from sra.sampling.solvers import SOLVERS, generate

__all__ = ["MODES", "PRESETS", "SamplerConfig", "preset", "cfg_combine", "guided", "SOLVERS", "generate"]
