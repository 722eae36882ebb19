"""A run's cumulative training compute, the x-axis of equal-compute comparisons (``sra compare``).

What is counted: the seconds spent training — the optimizer steps and the loop around them —
summed over processes; evaluations, sample grids and checkpoint writing are left out (the
loop pauses the clock around them). On CPU it is process CPU time (``time.process_time``: all
threads of a process; robust to other jobs on the machine), on an accelerator wall time
(device-seconds = wall × processes). The total is continued across resumes through the
checkpoint's ``meta.json``.

Reading the clock is a collective (a sum over processes) and, on CUDA, waits for the queued
work: the loop reads it at log and checkpoint steps only.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch

CPU_UNIT = "cpu-process-s"  # process CPU seconds summed over processes
DEVICE_UNIT = "device-s"  # wall seconds × processes


def compute_unit(device: torch.device) -> str:
    """The unit of ``compute_s`` on ``device`` (written into the run's config.json)."""
    return CPU_UNIT if device.type == "cpu" else DEVICE_UNIT


class ComputeClock:
    """Counts this process's training seconds; :meth:`total` sums them over processes."""

    def __init__(self, acc, start_s: float = 0.0) -> None:
        self.acc = acc
        self.unit = compute_unit(acc.device)
        self.start_s = float(start_s)  # the run's total when this process started (resume)
        self._local = 0.0  # seconds counted by this process since it started
        self._since: float | None = None

    def _now(self) -> float:
        return time.process_time() if self.unit == CPU_UNIT else time.perf_counter()

    def _settle(self) -> None:
        """Let queued device work finish so it is counted where it was launched (sync point:
        called at log/eval/checkpoint steps only)."""
        if self.acc.device.type == "cuda":
            torch.cuda.synchronize(self.acc.device)

    def start(self) -> None:
        if self._since is None:
            self._since = self._now()

    def stop(self) -> None:
        if self._since is not None:
            self._settle()
            self._local += self._now() - self._since
            self._since = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave out what runs inside (evaluation, grids, checkpoints)."""
        running = self._since is not None
        self.stop()
        try:
            yield
        finally:
            if running:
                self.start()

    def total(self) -> float:
        """The run's compute so far, summed over processes (a collective: every process calls
        it at the same step)."""
        running = self._since is not None
        self.stop()
        local = self._local
        if running:
            self.start()
        if self.acc.num_processes > 1:
            t = torch.tensor([local], dtype=torch.float64, device=self.acc.device)
            local = float(self.acc.reduce(t, reduction="sum").item())
        return self.start_s + local
