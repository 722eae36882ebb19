"""The one fixed-noise sampling scheme, shared by ``sra sample``, training's EMA grids and the
digits metric, and the convergence study: same seed, labels and batch size → same samples.

Sample i's initial noise comes from its own generator seeded by (seed, i) (:func:`sample_noise`),
and the solver noise of batch k = [k·B, (k+1)·B) from one generator on the sampling device
seeded by (seed, k) (:func:`solver_generator`). So a sample never depends on which process ran
its batch; SDE/DDPM samples do depend on the batch size B (the solver stream is per batch).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn as nn

from sra.errors import SraError
from sra.sampling.config import SamplerConfig
from sra.sampling.seeding import batch_ranges, sample_noise, solver_generator
from sra.sampling.solvers import check_labels, generate

if TYPE_CHECKING:
    from sra.models import TransformerOutput

AutocastFactory = Callable[[], AbstractContextManager]


class Autocast(nn.Module):
    """Runs the network inside ``autocast()`` (e.g. ``torch.autocast``) and hands float32 back to
    the solver, so only the network's own arithmetic is in low precision."""

    def __init__(self, model: nn.Module, autocast: AutocastFactory) -> None:
        super().__init__()
        self.inner = model
        self.config = model.config
        self.autocast = autocast

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> "TransformerOutput":
        with self.autocast():
            out = self.inner(x, t, y)
        return out._replace(output=out.output.float())


def sample_batch(model: nn.Module, *, seed: int, batch: int, indices: range, labels: torch.Tensor,
                 sampler: SamplerConfig, device: torch.device | str,
                 autocast: AutocastFactory | None = None) -> torch.Tensor:
    """Batch ``batch`` of the scheme: samples ``indices`` (that batch's index range) with their
    host ``labels`` (n,), in range (from :func:`~sra.sampling.seeding.make_labels`, or checked
    once per job with :func:`~sra.sampling.solvers.check_labels`). Returns the model's samples
    (n, C, H, W) on ``device``."""
    m = model.config
    noise = sample_noise(seed, indices, (m.in_channels, m.input_size, m.input_size))  # (n, C, H, W)
    net = Autocast(model, autocast) if autocast is not None else model
    return generate(net, noise.to(device), labels.to(device), sampler,
                    generator=solver_generator(seed, batch, device))


@torch.no_grad()
def sample_fixed(model: nn.Module, n: int, *, seed: int, sampler: SamplerConfig,
                 labels: torch.Tensor | None = None, batch_size: int = 256,
                 device: torch.device | str | None = None,
                 autocast: AutocastFactory | None = None) -> torch.Tensor:
    """``n`` samples (n, C, H, W) float32 on the CPU, as model outputs (not decoded).

    ``labels`` (n,) default to ``arange(n) % num_classes``; ``device`` to the model's; ``autocast``
    is an optional context-manager factory the network runs in (``accelerator.autocast``,
    ``lambda: torch.autocast("cuda", torch.bfloat16)``). With the labels and batch size of an
    ``sra sample`` job (``--per-proc-batch-size``), this gives exactly that job's samples.
    """
    m = model.config
    if n < 1 or batch_size < 1:
        raise SraError(f"sample count and batch size must be ≥ 1, got {n} and {batch_size}")
    if labels is None:
        labels = torch.arange(n) % m.num_classes
    if labels.shape != (n,):
        raise SraError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    check_labels(labels.cpu(), m.num_classes)  # once per job, on the host (no step reads them)
    if device is None:
        device = next(model.parameters(), torch.empty(0)).device
    out = []
    for k, (start, stop) in enumerate(batch_ranges(n, batch_size)):
        x = sample_batch(model, seed=seed, batch=k, indices=range(start, stop), labels=labels[start:stop],
                         sampler=sampler, device=device, autocast=autocast)
        out.append(x.float().cpu())  # sync point: once per batch, after its last step
    return torch.cat(out)
