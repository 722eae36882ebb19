"""Per-step solver callbacks (k-diffusion's pattern): the info dict every solver hands out, and
the progress bar built on it.

After each step a solver calls ``callback(info)`` with

- ``"i"``: the step, 0 … ``"steps"`` − 1; ``"steps"``: how many steps the solver takes;
- ``"t"``, ``"t_next"``: the step's start and end time (flow: floats in [0, 1]; DDPM: original
  integer steps 0..999, ``t_next`` −1 after the last step);
- ``"x"``: the state after the step (the solver's state dtype);
- flow solvers: ``"velocity"``, the guided model velocity at (x, t) before the step; DDPM
  solvers: ``"denoised"``, the x̂0 prediction at t.

Callbacks only read: the tensors are the solver's own, so a callback must not modify them.
"""

from __future__ import annotations

from typing import Any, Callable

from tqdm.auto import tqdm

StepCallback = Callable[[dict[str, Any]], None]


def progress_bar(total: int, desc: str) -> StepCallback:
    """A callback that advances a ``tqdm`` bar of ``total`` steps and closes it after the last."""
    bar = tqdm(total=total, desc=desc, leave=False)

    def callback(info: dict[str, Any]) -> None:
        bar.update(1)
        if info["i"] == info["steps"] - 1:
            bar.close()

    return callback


def chain(*callbacks: StepCallback | None) -> StepCallback | None:
    """One callback calling every given one in order (None when none is given)."""
    given = [c for c in callbacks if c is not None]
    if not given:
        return None
    if len(given) == 1:
        return given[0]

    def callback(info: dict[str, Any]) -> None:
        for c in given:
            c(info)

    return callback
