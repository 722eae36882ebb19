"""Seeds, noise, labels and batches of sampling jobs: what sample ``i`` gets depends on (seed, i) only.

- Sample i's initial noise comes from its own CPU generator seeded by (seed, :data:`STREAM_NOISE`,
  i), so it does not depend on which other samples share its batch.
- Labels are a fixed function of (seed, N, num_classes, label mode) (:func:`make_labels`).
- The index range [0, N) is cut into fixed batches [k·B, (k+1)·B) (:func:`batch_ranges`); the
  solver noise of batch k comes from one generator seeded by (seed, :data:`STREAM_SOLVER`, k).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from sra.errors import SraError, check_choice

LABEL_MODES = ("balanced", "random")
# Seed streams: independent generators for initial noise, solver noise, labels.
STREAM_NOISE, STREAM_SOLVER, STREAM_LABELS = 0, 1, 2


def derive_seed(seed: int, stream: int, index: int = 0) -> int:
    """A well-mixed 63-bit seed for (seed, stream, index); the same on every machine."""
    state = np.random.SeedSequence([seed, stream, index]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


def sample_noise(seed: int, indices: Iterable[int], shape: tuple[int, ...]) -> torch.Tensor:
    """Initial noise (n, *shape) float32 on CPU; row j depends only on (seed, indices[j])."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(derive_seed(seed, STREAM_NOISE, i)))
            for i in indices]
    return torch.stack(rows)


def solver_generator(seed: int, batch: int, device: torch.device | str) -> torch.Generator:
    """The generator of batch ``batch``'s solver noise (SDE, DDPM, DDIM with eta > 0) on ``device``."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, STREAM_SOLVER, batch))


def make_labels(seed: int, num_samples: int, num_classes: int, mode: str = "balanced",
                class_label: int | None = None) -> torch.Tensor:
    """Labels (N,) int64 for samples 0..N-1: one class; "balanced" (class i mod K over a seeded
    permutation of the indices, so every class appears ⌊N/K⌋ or ⌈N/K⌉ times, in shuffled
    order); or "random" (uniform draws from a seeded generator)."""
    check_choice("label mode", mode, LABEL_MODES)
    if class_label is not None:
        if not 0 <= class_label < num_classes:
            raise SraError(f"class label {class_label} is outside 0..{num_classes - 1}")
        return torch.full((num_samples,), class_label, dtype=torch.long)
    g = torch.Generator().manual_seed(derive_seed(seed, STREAM_LABELS))
    if mode == "balanced":
        return torch.randperm(num_samples, generator=g) % num_classes
    return torch.randint(0, num_classes, (num_samples,), generator=g)


def batch_ranges(num_samples: int, batch_size: int) -> list[tuple[int, int]]:
    """The fixed batches [k·B, min((k+1)·B, N)) of the global index range."""
    return [(s, min(s + batch_size, num_samples)) for s in range(0, num_samples, batch_size)]
