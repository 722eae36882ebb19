"""The training benchmark's cases: a model, its SRA blocks, a batch size and where the batch
comes from (random latents or the bundled digits), plus the one fixed batch every path uses."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sra.models import ModelConfig, model_config
from sra.objectives import AlignConfig


@dataclass(frozen=True)
class TrainCase:
    """A model, its alignment blocks, a batch and where the batch comes from."""

    name: str
    title: str
    model: ModelConfig
    align: AlignConfig
    batch: int
    data: str = "latents"  # "latents": N(0, 1) latents; "digits": the bundled digits


def _latent_case(name: str, title: str, model: str, input_size: int, batch: int, s: int, t: int,
                 **overrides) -> TrainCase:
    mcfg = model_config(model, **{"input_size": input_size, "in_channels": 4, "num_classes": 1000,
                                  **overrides})
    return TrainCase(name, title, mcfg, AlignConfig(student_block=s, teacher_block=t), batch)


def _digits_case() -> TrainCase:
    from sra.training.config import preset
    from sra.data.digits import DIGITS_CLASSES, DIGITS_SIZE

    cfg = preset("digits")
    spec = cfg.model
    mcfg = model_config(spec.name, depth=spec.depth, hidden_size=spec.hidden_size,
                        num_heads=spec.num_heads, patch_size=spec.patch_size,
                        input_size=DIGITS_SIZE, in_channels=1, num_classes=DIGITS_CLASSES)
    return TrainCase("digits", f"digits preset ({spec.depth}×{spec.hidden_size}, patch "
                     f"{spec.patch_size}, 16×16×1)", mcfg, cfg.align, cfg.loop.global_batch_size,
                     data="digits")


def make_case(name: str) -> TrainCase:
    """Registered cases: ``sit-b4``, ``digits`` (CPU), ``sit-xl2`` (GPU), ``tiny`` (tests)."""
    if name == "sit-b4":  # the release's default blocks s = 4, t = 8
        return _latent_case(name, "SiT-B/4, 32×32×4 latents", "SiT-B/4", 32, 8, 4, 8)
    if name == "sit-xl2":  # the paper's XL recipe s = 8, t = 20
        return _latent_case(name, "SiT-XL/2, 32×32×4 latents (256 px)", "SiT-XL/2", 32, 32, 8, 20)
    if name == "digits":
        return _digits_case()
    if name == "tiny":
        return _latent_case(name, "tiny SiT (3×32, patch 2, 8×8×4)", "SiT-S/2", 8, 4, 1, 2,
                            depth=3, hidden_size=32, num_heads=2, num_classes=10)
    raise SystemExit(f"unknown case {name!r}; choose from sit-b4, digits, sit-xl2, tiny")


def make_batch(case: TrainCase, seed: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One fixed batch (x0, y) reused by every step of every path."""
    g = torch.Generator().manual_seed(seed)
    m = case.model
    if case.data == "digits":
        from sra.data.digits import DigitsDataset

        ds = DigitsDataset(m.input_size)
        idx = torch.randperm(len(ds), generator=g)[: case.batch]
        return ds.images[idx].to(device), ds.labels[idx].to(device)
    x0 = torch.randn(case.batch, m.in_channels, m.input_size, m.input_size, generator=g)
    y = torch.randint(0, m.num_classes, (case.batch,), generator=g)
    return x0.to(device), y.to(device)
