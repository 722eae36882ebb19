"""``sra export RUN --out DIR``: EMA weights (safetensors), the resolved config, the sampler and a
model card in one folder, ready for ``huggingface-cli upload OWNER/REPO DIR``.

    sra export runs/digits-sra --out exports/digits-sra
    sra sample --ckpt exports/digits-sra --output-dir samples     # the card's sampler by default
    sra sample --ckpt hf://OWNER/REPO --output-dir samples        # the same, once uploaded
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add ``sra export``."""
    from sra.sampling.config import PRESETS

    p = subparsers.add_parser("export", help="a run → an upload-ready folder with a model card",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run dir (its newest checkpoint) or one checkpoint dir")
    p.add_argument("--out", required=True, help="output folder (created; files are replaced)")
    p.add_argument("--sampler-preset", choices=sorted(PRESETS), default=None,
                   help="sampler the card recommends (default: the run's grid sampler for pixel "
                        "data, else the family's default: SiT SDE / DiT DDPM, 250 steps)")
    p.add_argument("--repo", default=None,
                   help="the Hub repo it will be uploaded to (OWNER/REPO): the card's sample "
                        "command then says --ckpt hf://OWNER/REPO")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sra.training.publish import export_run

    out = export_run(args.run, args.out, args.sampler_preset,
                     repo_hint=f"hf://{args.repo}" if args.repo else None)
    print(f"exported to {out} (upload: huggingface-cli upload OWNER/REPO {out})")
    return 0
