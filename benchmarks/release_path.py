"""The release's training compute path, re-created for the throughput benchmark: a teacher that
runs every block and the final layer in fp32 outside autocast, and the per-parameter EMA loop.

The library never takes these paths (its teacher stops after block t, its EMA is one foreach
lerp); they live here so the benchmark can time both sides with the same objective and step.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class ReleaseTeacher(nn.Module):
    """The release's teacher call around the EMA model: autocast off, float inputs cast to fp32,
    and the FULL forward (every block and the final layer) whatever ``stop_after`` asks for.

    The features of the asked-for blocks are the same as with the early stop, so the SRA loss is
    unchanged; only the work done differs.
    """

    def __init__(self, ema: nn.Module, device_type: str):
        super().__init__()
        self.ema = ema
        self.device_type = device_type

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                stop_after: int | None = None, **kwargs):
        del stop_after  # the release always runs the whole network
        with torch.autocast(self.device_type, enabled=False):
            t = t.float() if t.is_floating_point() else t
            return self.ema(x.float(), t, y, **kwargs)


@torch.no_grad()
def update_ema_loop(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """The release's EMA: a Python loop over parameters, ``mul_`` then ``add_`` for each."""
    model_params = dict(model.named_parameters())
    for name, p in ema.named_parameters():
        p.mul_(decay).add_(model_params[name].detach(), alpha=1 - decay)
