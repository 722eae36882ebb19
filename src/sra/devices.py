"""Which torch device a run uses: ``auto`` (CUDA when available, else CPU) or a named one."""

from __future__ import annotations

import torch

from sra.errors import SraError

AUTO = "auto"


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"`` → ``cuda`` when available, else ``cpu``; any other name as
    ``torch.device(name)``, an unknown one a one-line :class:`SraError`."""
    if isinstance(name, torch.device):
        return name
    if name is None or name == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except (RuntimeError, TypeError):
        raise SraError(f"unknown device {name!r}; allowed: auto, cpu, cuda, cuda:N, mps") from None
