"""Non-finite steps: counted on the device every step, judged at log/checkpoint steps only.

A step whose gradients are not finite is skipped (see the loop's optimizer step). Two kinds are
told apart, on the device and without a sync:

- a **grad-scaler overflow** (fp16 only): the loss is finite but the scaled gradients overflow.
  That is how ``GradScaler`` finds its scale (its first steps from 2¹⁶ always overflow) and how
  it backs off later; it is counted and logged as such, never as a divergence;
- a **divergent step**: anything else (a non-finite loss, or non-finite gradients without a
  scaler). K of them in a row stop the run. When it happens, the inputs of the latest one are
  checked on the host (at the check, never in the step), so the message can say when the data
  itself holds NaN/inf and name the samples.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from sra.data.checks import nonfinite_report, nonfinite_samples
from sra.errors import SraError
from sra.training.batches import Position, ShardedBatchSampler, advance

log = logging.getLogger("sra.train")


class NonFiniteGuard:
    """Device-side counters of skipped steps (all of them and the scaler's overflows), the longest
    run of consecutive divergent steps since the last read, and the latest divergent step."""

    def __init__(self, device: torch.device, skipped: int = 0) -> None:
        def zero() -> torch.Tensor:
            return torch.zeros((), dtype=torch.int64, device=device)

        self.skipped = torch.tensor(skipped, dtype=torch.int64, device=device)
        self.overflows = zero()  # since the last read
        self.consecutive = zero()
        self.worst = zero()  # since the last read
        self.last_bad = torch.full((), -1, dtype=torch.int64, device=device)

    def update(self, finite: torch.Tensor, overflow: torch.Tensor | None = None,
               step: int = 0) -> None:
        """Count one step. ``finite``: its update was applied; ``overflow``: it was skipped as a
        grad-scaler overflow (a subset of the non-finite ones); ``step``: its 0-based index."""
        bad = ~finite
        divergent = bad if overflow is None else bad & ~overflow
        self.skipped += bad.to(torch.int64)
        if overflow is not None:
            self.overflows += overflow.to(torch.int64)
        # A finite step ends a run; an overflow neither ends nor extends it.
        self.consecutive = torch.where(finite, 0, self.consecutive + divergent.to(torch.int64))
        self.worst = torch.maximum(self.worst, self.consecutive)
        self.last_bad = torch.where(divergent, step, self.last_bad)

    def read(self) -> tuple[int, int, int, int]:
        """(skipped in all, overflows and longest divergent run since the last read, latest
        divergent step or −1) — a sync point."""
        values = torch.stack([self.skipped, self.overflows, self.worst, self.last_bad]).tolist()
        self.worst = self.consecutive.clone()  # a run still going on carries over
        self.overflows = torch.zeros_like(self.overflows)
        skipped, overflows, worst, last_bad = (int(v) for v in values)
        return skipped, overflows, worst, last_bad


def overflowed(finite: torch.Tensor, loss: torch.Tensor, scaler) -> torch.Tensor | None:
    """On the device: whether a skipped step is the grad scaler's overflow (finite loss, scaled
    gradients overflowed). None without a scaler (then every skip is divergent)."""
    if scaler is None:
        return None
    return ~finite & torch.isfinite(loss.detach()).all()


def nonfinite_inputs(dataset, sampler: ShardedBatchSampler, start: Position, steps_after: int,
                     accumulation: int) -> list[int]:
    """This process's dataset indices, in the step ``steps_after`` optimizer steps after the
    data position ``start``, whose inputs hold NaN/inf. The step's micro-batches are found again
    from the deterministic data order (no copy of any batch is kept) and read on the host."""
    found: list[int] = []
    for j in range(accumulation):
        at = advance(start, steps_after * accumulation + j, sampler.batches_per_epoch)
        indices = sampler.indices_at(at)
        x = torch.stack([torch.as_tensor(dataset[i][0]) for i in indices])
        found += nonfinite_samples(x, indices)
    return found


class Health:
    """The non-finite policy of one run: counts, warnings, the K-in-a-row stop."""

    def __init__(self, acc, max_consecutive: int, skipped: int = 0) -> None:
        self.acc, self.k = acc, max_consecutive
        self.guard = NonFiniteGuard(acc.device, skipped)

    def check(self, step: int, bad_samples: Callable[[int], list[int]], dataset,
              batch_size: int) -> int:
        """Read the counters (a sync point; every process calls it and sees the same verdict),
        log what happened since the last check and raise after K divergent steps in a row.
        ``bad_samples(s)``: this process's dataset indices of step ``s`` whose inputs are not
        finite; ``batch_size``: the global batch. Returns the number of skipped steps so far."""
        skipped, overflows, worst, last_bad = self.guard.read()
        if self.acc.num_processes > 1:  # one verdict: processes may differ (e.g. a rank's loss)
            t = torch.tensor([overflows, worst, last_bad], device=self.acc.device)
            overflows, worst, last_bad = (int(v) for v in self.acc.reduce(t, "max").tolist())
        if overflows:
            scale = self.acc.scaler.get_scale() if self.acc.scaler is not None else float("nan")
            log.info("grad scaler: %d overflow step(s) skipped since the last check (scale now "
                     "%g); this is how fp16 loss scaling calibrates, not a divergence",
                     overflows, scale)
        if not worst:
            return skipped
        cause = self._data_cause(last_bad, bad_samples, dataset, batch_size)
        log.warning("non-finite loss/gradients: update skipped (%d in a row at most since the "
                    "last check, %d skipped in all, by step %d)%s", worst, skipped, step,
                    f"; {cause}" if cause else "")
        if worst >= self.k:
            advice = cause or "lower the learning rate, or use bf16 instead of fp16"
            raise SraError(f"stopping: {self.k} consecutive non-finite steps reached by step "
                           f"{step} ({advice})")
        return skipped

    def _data_cause(self, last_bad: int, bad_samples: Callable[[int], list[int]], dataset,
                    batch_size: int) -> str | None:
        """Whom to blame when the latest divergent step's inputs hold NaN/inf (None: not the
        data). Every process looks at its own share of that step's batch."""
        if last_bad < 0:
            return None
        found = bad_samples(last_bad)
        if self.acc.num_processes > 1:
            from accelerate.utils import gather_object

            found = [i for part in gather_object([found]) for i in part]
        report = nonfinite_report(found, batch_size, dataset)
        return None if report is None else f"step {last_bad + 1}: {report}"
