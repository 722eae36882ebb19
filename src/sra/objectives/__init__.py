"""Objectives: denoising losses of each family and the SRA alignment."""

from sra.objectives.denoising import DDPMProcess, FlowConfig, FlowMatching, make_process, mean_flat
from sra.objectives.sra import (
    LOSS_TYPES, SCHEDULES, AlignConfig, LossOutput, SRAObjective, align_loss, align_weight,
    drop_labels,
)

__all__ = [
    "DDPMProcess", "FlowConfig", "FlowMatching", "make_process", "mean_flat", "LOSS_TYPES",
    "SCHEDULES", "AlignConfig", "LossOutput", "SRAObjective", "align_loss", "align_weight",
    "drop_labels",
]
