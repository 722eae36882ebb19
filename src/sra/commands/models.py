"""``sra models``: list the registry with parameter counts."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``models`` subcommand."""
    p = sub.add_parser(
        "models", help="list the model registry with parameter counts",
        description="List every registered model name (SiT/DiT × S/B/L/XL × patch 2/4/8) with its "
        "depth, width, heads, tokens and parameter counts (backbone; + SRA head).",
    )
    p.add_argument("--resolution", type=int, default=256,
                   help="image resolution in pixels; the latent is resolution/8 (sets token count)")
    p.add_argument("--num-classes", type=int, default=1000, help="number of classes")
    p.add_argument("--filter", default="", help="only names containing this text (e.g. 'SiT-XL')")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print one row per registered model."""
    import torch

    from sra.data.formats import VAE_DOWNSAMPLE
    from sra.models import MODEL_NAMES, build_model, count_parameters, model_config

    print(f"{'name':<10} {'depth':>5} {'width':>5} {'heads':>5} {'tokens':>6} "
          f"{'params (M)':>10} {'+head (M)':>10}")
    for name in MODEL_NAMES:
        if args.filter and args.filter not in name:
            continue
        cfg = model_config(name, input_size=args.resolution // VAE_DOWNSAMPLE, num_classes=args.num_classes)
        with torch.device("meta"):  # shapes only: no memory, no init cost
            model = build_model(cfg)
        total = count_parameters(model) / 1e6
        backbone = count_parameters(model, include_head=False) / 1e6
        print(f"{name:<10} {cfg.depth:>5} {cfg.hidden_size:>5} {cfg.num_heads:>5} "
              f"{cfg.num_tokens:>6} {backbone:>10.2f} {total:>10.2f}")
    return 0
