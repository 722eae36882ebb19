"""A CUDA dry run without a GPU: modules and tensors faked onto device ``cuda`` (torch's FakeTensorMode).

Inside :func:`fake_cuda` every op runs on meta kernels (shapes, dtypes and devices only, no
arithmetic), so code that would run on a GPU can be checked on a CPU machine:

- a **device check**: a CPU tensor of one or more dimensions mixed into a CUDA op raises
  ``FakeTensorDeviceMismatchError`` (0-d CPU tensors are allowed, as on a real GPU), and a real
  (not fake) tensor reaching an op raises too (``allow_non_fake_inputs=False``);
- a **sync check**: any read of a tensor value on the host (``.item()``, ``bool()``, ``int()``,
  ``float()``, ``.tolist()``) raises ``DataDependentOutputException``, and an op whose output
  shape depends on tensor values (``nonzero``, ``repeat_interleave`` with tensor repeats, which
  read their size back on a GPU) raises ``DynamicOutputShapeException``.

Backward needs a real device (autograd's engine runs kernels), so only forward passes are
checked. What cannot be faked: a ``torch.Generator(device="cuda")`` (it needs a driver) — pass
``generator=None`` or patch the function that builds it. Host-side set-up (time grids, label
checks) runs before the mode, and what it makes is handed in through :func:`to_fake`.

    with fake_cuda() as mode:
        model = to_fake_cuda(build_model(cfg), mode)
        with torch.no_grad(), cuda_autocast(torch.bfloat16):
            out = model(torch.randn(2, 3, 8, 8, device="cuda"), ...)
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator
from unittest import mock

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily

CUDA = torch.device("cuda", 0)


@contextlib.contextmanager
def fake_cuda() -> Iterator[FakeTensorMode]:
    """A strict fake-tensor mode, entered: only fake tensors may reach an op. Inside it,
    ``module.to(device)`` on a module already faked onto that device returns it unchanged, as on a
    GPU (torch cannot re-wrap fake parameters: its ``swap_tensors`` refuses them)."""
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    real_to = nn.Module.to

    def to(module: nn.Module, *args, **kwargs) -> nn.Module:
        device, dtype, *_ = torch._C._nn._parse_to(*args, **kwargs)
        tensors = [*module.parameters(), *module.buffers()]
        if dtype is None and device is not None and tensors and all(
                isinstance(t, FakeTensor) and t.device.type == device.type for t in tensors):
            return module
        return real_to(module, *args, **kwargs)

    with mock.patch.object(nn.Module, "to", to), mode:
        yield mode


def to_fake(t: torch.Tensor, mode: FakeTensorMode, device: torch.device | str = CUDA) -> torch.Tensor:
    """A real tensor (host set-up: labels, tables) as a fake one of the same shape and dtype on
    ``device`` (CUDA by default; "cpu" keeps it a host tensor)."""
    if isinstance(t, FakeTensor):
        return t.to(device)
    with unset_fake_temporarily():
        host = t.detach()
    fake = mode.from_tensor(host)  # a fake twin on t's own device
    with mode:
        return fake.to(device)


def to_fake_cuda(module: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """``module`` with every parameter and buffer replaced by a fake CUDA tensor (in place, like
    ``module.cuda()``; requires_grad is kept). Returns the module."""
    return module._apply(lambda t: to_fake(t, mode))


def cuda_autocast(dtype: torch.dtype = torch.bfloat16) -> torch.autocast:
    """``torch.autocast("cuda", dtype)`` that stays on without a GPU. torch turns CUDA autocast off
    (with a warning) when no device is present; the dispatcher's autocast keys work on fake CUDA
    tensors all the same, so matmuls really run in ``dtype`` inside the mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctx = torch.autocast("cuda", dtype=dtype)
    ctx._enabled = True  # what __init__ would have set with a device present
    return ctx
