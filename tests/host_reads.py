"""Counts host reads of tensor values — what would make a GPU step wait for the device — for the
sync-count tests of the training step, the objectives and the samplers."""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# behind .item(), bool(), int(), float() and torch.equal
_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default)


class HostReads(TorchDispatchMode):
    """A dispatch mode recording every host read while active and ``armed``, plus .tolist() and
    .numpy() (they do not dispatch on the CPU but copy device → host on a GPU). ``label()``, if
    given, tags each event: events are then ``(*label(), what)``."""

    def __init__(self, monkeypatch, label: Callable[[], tuple] | None = None) -> None:
        super().__init__()
        self.armed, self.events, self.label = True, [], label
        for name in ("tolist", "numpy"):
            real = getattr(torch.Tensor, name)

            def wrapper(t, *a, _real=real, _name=name, **k):
                self.record(_name)
                return _real(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, wrapper)

    def record(self, what: str) -> None:
        if self.armed:
            self.events.append(what if self.label is None else (*self.label(), what))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _READS:
            self.record(str(func))
        return func(*args, **(kwargs or {}))
