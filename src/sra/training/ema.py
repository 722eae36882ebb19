"""Exponential moving average of the weights, updated with foreach ops (one kernel per group)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class EMAConfig:
    """EMA of the weights; the EMA model is also the SRA teacher."""

    decay: float = 0.9999
    # decay_n = min(decay, (1 + n)/(10 + n)): lets short runs leave the initial weights behind.
    warmup: bool = False


def make_ema(model: nn.Module) -> nn.Module:
    """A frozen copy equal to the model (the release initialises the EMA this way)."""
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


def ema_decay(cfg: EMAConfig, num_updates: int) -> float:
    """The decay for update number ``num_updates`` (0-based), with the optional warm-up."""
    if cfg.warmup:
        return min(cfg.decay, (1 + num_updates) / (10 + num_updates))
    return cfg.decay


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float,
               apply: torch.Tensor | None = None) -> None:
    """ema ← decay·ema + (1 − decay)·model for every parameter (buffers are copied).

    ``apply``: a boolean 0-d tensor; where it is False the EMA stays exactly as it is. It is
    folded into the interpolation weight on the device, so skipping costs no host sync (a 0-d
    tensor passed as the scalar weight would be read on the host; one per tensor in a list is not).
    """
    ema_params = [p for p in ema.parameters()]
    params = [p.detach() for p in model.parameters()]
    if len(ema_params) != len(params):
        raise RuntimeError("EMA and model have different parameter lists")
    if apply is None:
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    else:
        weight = apply.to(device=ema_params[0].device, dtype=ema_params[0].dtype) * (1.0 - decay)
        torch._foreach_lerp_(ema_params, params, [weight] * len(params))
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)
