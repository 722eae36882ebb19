"""The optimizer: AdamW as the release configures it, and the learning-rate warm-up."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and clipping (the release's defaults)."""

    learning_rate: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    warmup_steps: int = 0  # linear LR warm-up (0: constant LR like the release)


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``model``'s parameters. Fused (one kernel for all tensors) on CUDA and CPU
    (torch ≥ 2.4); the fused kernel also skips a non-finite step on the device (``found_inf``)."""
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(
        model.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon,
        fused=fused, foreach=None if fused else True,
    )


def learning_rate(cfg: OptimConfig, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warm-up, then constant."""
    return cfg.learning_rate * min(1.0, (step + 1) / max(1, cfg.warmup_steps))


def optimizer_step(opt, scaler, fused: bool, finite: torch.Tensor, grads_to_none: bool) -> None:
    """One AdamW step (accelerate's wrapped optimizer ``opt``), skipped where ``finite`` is False
    — decided on the device — then the gradients zeroed (None, or zeros in place where they are
    views into DDP's buckets)."""
    inner = opt.optimizer  # accelerate's wrapper around torch's AdamW
    if scaler is not None:
        opt.step()  # fp16: the grad scaler skips non-finite steps itself
    elif fused:
        # The fused kernel takes `found_inf` (what GradScaler hands it) and leaves parameters,
        # moments and the step count untouched where it is 1: a skip without a host sync.
        inner.found_inf = (~finite).to(torch.float32)
        try:
            opt.step()
        finally:
            del inner.found_inf
    elif bool(finite):  # sync point: only optimizers without the fused kernel get here
        opt.step()
    opt.zero_grad(set_to_none=grads_to_none)
