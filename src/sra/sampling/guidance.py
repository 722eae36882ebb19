"""Classifier-free guidance with a guidance interval, kept apart from the solvers.

:func:`guided` turns a network into the ``model_fn(x, t, y, t_host)`` every solver calls. Inside
the interval the batch is doubled (conditional ‖ null label) and combined as u + w·(c − u);
outside it, or with w = 1, the conditional model is evaluated once. The interval is decided from
``t_host``, the step's time as a Python number that the solver already holds: reading it back
from the (N,) tensor ``t`` would be a host–device sync on every model call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from sra.errors import SraError
from sra.sampling.config import SamplerConfig

if TYPE_CHECKING:
    from sra.models import TransformerOutput

# model_fn(x (N, C, H, W), t (N,), y (N,), t_host) -> (N, C_out, H, W). Every sample of a batch
# shares its time: ``t`` is what the network sees, ``t_host`` the same time as a host float
# (flow: t ∈ [0, 1]; DDPM: the original integer step), so no wrapper ever reads ``t``'s values.
ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def cfg_combine(
    cond: torch.Tensor, uncond: torch.Tensor, scale: float, learn_sigma: bool = False,
    channels: int | None = None,
) -> torch.Tensor:
    """u + w·(c − u).

    SiT (``learn_sigma`` False, ``channels`` None): every channel. DiT (``learn_sigma``): the
    outputs are ε ‖ v, (N, 2C, …); only the first ``channels`` ε channels are guided (None → all
    C; the DiT release guides 3) and the rest, variance half included, are the conditional ones.
    """
    if cond.shape != uncond.shape:
        raise SraError(f"conditional and unconditional outputs differ in shape: "
                       f"{tuple(cond.shape)} vs {tuple(uncond.shape)}")
    total = cond.shape[1]
    if learn_sigma and total % 2:
        raise SraError(f"learned-sigma outputs need an even channel count (ε ‖ v), got {total}")
    C = total // 2 if learn_sigma else total
    k = C if channels is None else int(channels)
    if not 1 <= k <= C:
        raise SraError(f"guided channels must be in 1..{C} (or None for all), got {channels!r}")
    if k == total:
        return uncond + scale * (cond - uncond)
    guided = uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k])
    return torch.cat([guided, cond[:, k:]], dim=1)


def guided(
    model: Callable[..., "TransformerOutput"], cfg: SamplerConfig, null_label: int,
    learn_sigma: bool = False, time_scale: float = 1.0,
) -> ModelFn:
    """Wrap ``model(x, t, y).output`` with CFG per ``cfg``; ``time_scale`` maps ``t_host`` to
    [0, 1] for the interval test (1000 for DiT's integer steps)."""
    scale = cfg.cfg_scale

    def model_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, t_host: float) -> torch.Tensor:
        t_now = t_host / time_scale  # host arithmetic only: no read of t
        if scale == 1.0 or not (cfg.guidance_low <= t_now <= cfg.guidance_high):
            return model(x, t, y).output
        out = model(torch.cat([x, x]), torch.cat([t, t]),
                    torch.cat([y, torch.full_like(y, null_label)])).output
        cond, uncond = out.chunk(2)
        return cfg_combine(cond, uncond, scale, learn_sigma, cfg.guidance_channels)

    return model_fn
