"""Timestep respacing: which steps of a DDPM schedule a sampler keeps, and their betas.

A respaced diffusion keeps a subset of the original steps and recomputes betas so that ᾱ at every
kept step is unchanged (improved DDPM's ``space_timesteps``); see
:meth:`sra.diffusion.ddpm.GaussianDiffusion.respaced`.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np

from sra.errors import SraError

Respacing = Union[int, str, Sequence[int]]


def space_timesteps(num_timesteps: int, section_counts: Respacing) -> list[int]:
    """Sorted subset of ``range(num_timesteps)`` to keep when respacing.

    ``section_counts``:
    - an int or a string of comma-separated ints ("250", "10,15,20"): the range is cut into
      that many equal sections (earlier sections get the remainder) and each section keeps
      the given number of evenly strided steps (first and last of the section included);
    - "ddimN": the integer stride whose ``range(0, T, stride)`` has exactly N steps (DDIM);
    - "": no respacing;
    - a sequence of ints: exactly those steps.
    """
    T = num_timesteps
    allowed = "an int, '' , 'N', 'N1,N2,...', 'ddimN' or a list of step indices"
    if isinstance(section_counts, (int, np.integer)) and not isinstance(section_counts, bool):
        counts = [int(section_counts)]
    elif isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec == "":
            return list(range(T))
        if spec.startswith("ddim"):
            try:
                desired = int(spec[len("ddim"):])
            except ValueError:
                raise SraError(f"bad timestep respacing {section_counts!r}; allowed: {allowed}") from None
            for stride in range(1, T + 1):
                steps = list(range(0, T, stride))
                if len(steps) == desired:
                    return steps
            raise SraError(
                f"cannot take exactly {desired} DDIM steps with an integer stride from {T} steps; "
                f"allowed: counts N with len(range(0, {T}, stride)) == N"
            )
        try:
            counts = [int(p) for p in spec.split(",")]
        except ValueError:
            raise SraError(f"bad timestep respacing {section_counts!r}; allowed: {allowed}") from None
    elif isinstance(section_counts, Sequence):
        try:
            steps = sorted({int(s) for s in section_counts})
        except (TypeError, ValueError):
            raise SraError(f"bad timestep respacing {section_counts!r}; allowed: {allowed}") from None
        if not steps or steps[0] < 0 or steps[-1] >= T:
            raise SraError(f"respacing steps must be a non-empty subset of 0..{T - 1}, got {list(section_counts)!r}")
        return steps
    else:
        raise SraError(f"bad timestep respacing {section_counts!r}; allowed: {allowed}")

    if len(counts) > T:
        raise SraError(f"respacing {section_counts!r} has more sections than the {T} steps")
    size_per, extra = divmod(T, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count < 1 or count > size:
            raise SraError(
                f"respacing section {i} asks for {count} steps; allowed: 1..{size} "
                f"(sections of {T} steps split into {len(counts)})"
            )
        stride = 1.0 if count == 1 else (size - 1) / (count - 1)
        kept.extend(start + round(k * stride) for k in range(count))
        start += size
    return sorted(set(kept))


def respaced_betas(alphas_cumprod: np.ndarray, keep: Sequence[int]) -> np.ndarray:
    """Betas of the schedule that visits only the steps ``keep`` (sorted) of a schedule with
    cumulative products ``alphas_cumprod``, with ᾱ at every kept step unchanged."""
    new_betas = []
    last = 1.0
    for i in keep:
        ac = alphas_cumprod[i]
        new_betas.append(1.0 - ac / last)
        last = ac
    return np.asarray(new_betas)
