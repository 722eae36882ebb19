"""Exponential moving average of the weights: one lerp kernel per dtype group, no host sync.

The EMA and the model keep their parameters in one flat buffer per (device, dtype) group (each
parameter is a view into it, see :func:`flatten_parameters`), so an update is a single
``lerp_`` per group — whatever the number of parameter tensors (≈ 300 for SiT-XL/2). A list
``_foreach_lerp_`` with a 0-d device weight, which the masked update needs, would fall back to
one kernel per tensor on CUDA; a flat lerp with a 0-d weight tensor is one kernel and gives the
same bits (tests/test_train.py checks it against the per-tensor update).
"""

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


def flatten_parameters(module: nn.Module) -> list[torch.Tensor]:
    """Move ``module``'s parameters into one contiguous buffer per (device, dtype), in
    parameter order; every parameter becomes a view into its buffer (same object, same values).

    Call it where the module will stay (after ``.to(device)``, before the optimizer and DDP are
    built): a later ``.to()`` to another device or dtype gives each parameter its own storage
    again. Returns the buffers in first-appearance order of their group.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[nn.Parameter]] = {}
    for p in module.parameters():
        groups.setdefault((p.device, p.dtype), []).append(p)
    flats = []
    with torch.no_grad():
        for (device, dtype), params in groups.items():
            flat = torch.empty(sum(p.numel() for p in params), device=device, dtype=dtype)
            offset = 0
            for p in params:
                view = flat[offset: offset + p.numel()].view_as(p)
                view.copy_(p)
                p.data = view  # the Parameter object (optimizer, DDP hooks) is unchanged
                offset += p.numel()
            flats.append(flat)
    return flats


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


def _check_pairs(ema: nn.Module, model: nn.Module) -> None:
    pairs = list(zip(ema.named_parameters(), model.named_parameters()))
    if len(pairs) != len(list(model.parameters())) or len(pairs) != len(list(ema.parameters())):
        raise RuntimeError("EMA and model have different parameter lists")
    for (ne, pe), (nm, pm) in pairs:
        if ne != nm or pe.shape != pm.shape or pe.dtype != pm.dtype or pe.device != pm.device:
            raise RuntimeError(f"EMA parameter {ne} {tuple(pe.shape)} does not match the model's "
                               f"{nm} {tuple(pm.shape)}")


class EMAUpdater:
    """ema ← decay·ema + (1 − decay)·model, one ``lerp_`` per dtype group.

    Both modules' parameters are flattened here (see :func:`flatten_parameters`); build it
    once, on the device, before the optimizer and DDP see the model. Buffers (the fixed
    position table) are never trained; they are copied once here.
    """

    def __init__(self, ema: nn.Module, model: nn.Module) -> None:
        _check_pairs(ema, model)
        self.ema_flats = flatten_parameters(ema)
        self.model_flats = flatten_parameters(model)
        with torch.no_grad():
            for b_ema, b in zip(ema.buffers(), model.buffers()):
                b_ema.copy_(b)

    @torch.no_grad()
    def update(self, decay: float, apply: torch.Tensor | None = None) -> None:
        """One EMA step. ``apply``: a boolean 0-d device tensor; where it is False the EMA stays
        exactly as it is. It is folded into the interpolation weight on the device (a 0-d tensor
        weight), so skipping costs no host sync."""
        for ema_flat, model_flat in zip(self.ema_flats, self.model_flats):
            if apply is None:
                ema_flat.lerp_(model_flat, 1.0 - decay)
            else:
                weight = apply.to(device=ema_flat.device, dtype=ema_flat.dtype) * (1.0 - decay)
                ema_flat.lerp_(model_flat, weight)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float,
               apply: torch.Tensor | None = None) -> None:
    """One EMA step on modules that were not flattened (one kernel per tensor; the trainer uses
    :class:`EMAUpdater`). Same semantics and bits as :meth:`EMAUpdater.update`."""
    _check_pairs(ema, model)
    ema_params = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]
    if apply is None:
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    else:
        weight = apply.to(device=ema_params[0].device, dtype=ema_params[0].dtype) * (1.0 - decay)
        torch._foreach_lerp_(ema_params, params, [weight] * len(params))
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)
