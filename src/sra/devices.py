"""Which torch device a run uses (``auto``: CUDA when available, else CPU) and its matmul precision."""

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


def set_tf32(enabled: bool, device: torch.device) -> None:
    """TF32 for CUDA matmuls and cuDNN convolutions on ``device`` when ``enabled`` (the release's
    training and sampling both enable it); nothing on other devices. ``sra eval``'s Inception
    turns it off around itself, so FID features stay fp32 either way."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled
