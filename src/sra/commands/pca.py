"""``sra pca``: the feature-PCA figure across blocks and noise levels (docs/method.md §10), for any model.

    sra pca --ckpt runs/sit-b2 --label 207 --out figs/pca.png
    sra pca --ckpt SiT-XL-2-vanilla.pt --compare SiT-XL-2-SRA.pt --baseline --label 88
"""

from __future__ import annotations

import argparse

from sra.commands._args import float_list, int_list, str2bool

_DESCRIPTION = (
    "Noise one image to several flow times (one fixed noise sample), run the model up to the "
    "last block asked for, and show a 3-component PCA of each block's tokens as RGB on the token "
    "grid: rows = times, columns = blocks. Works for our run dirs/checkpoints, the release's .pt "
    "and bare SiT/DiT state dicts, any size/resolution/patch. Writes OUT (.png), plus OUT's stem "
    ".npz (raw maps) and .json (resolved settings). DiT models are fed step round(t*999)."
)


def register(subparsers) -> None:
    """Add ``sra pca``."""
    from sra.data.vae import DEFAULT_VAE
    from sra.viz.pca import DEFAULT_TIMES

    p = subparsers.add_parser(
        "pca", help="feature-PCA figure of a model's blocks across noise levels",
        description=_DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--ckpt", required=True,
                   help="run dir, checkpoint dir, release .pt, or state dict (.pt/.safetensors)")
    p.add_argument("--compare", default=None,
                   help="a second checkpoint whose grid is drawn below the first (e.g. vanilla vs SRA)")
    p.add_argument("--image", default=None,
                   help="image file (ADM center crop); default: scikit-learn's bundled china.jpg "
                   "photo, or for 1-channel pixel models the first bundled digit of --label "
                   "(sklearn:flower.jpg picks the other bundled photo)")
    p.add_argument("--label", type=int, default=0, help="class label fed to the model (0..classes-1)")
    p.add_argument("--times", type=float_list, default=",".join(f"{t:g}" for t in DEFAULT_TIMES),
                   help="comma-separated flow times in 0..1 (t=0 data, t=1 noise), one row each")
    p.add_argument("--blocks", type=int_list, default=None,
                   help="comma-separated 1-indexed blocks, one column each; default: spread over "
                   "the depth (1,4,8,13,18,23,28 for XL)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise sample shared by all times")
    p.add_argument("--weights", choices=("ema", "model"), default="ema",
                   help="which weights of a checkpoint holding both")
    p.add_argument("--vae", default=DEFAULT_VAE,
                   help="diffusers AutoencoderKL (hub id or local folder); used only for latent models")
    p.add_argument("--resolution", type=int, default=None,
                   help="image side in pixels; default: the checkpoint's data resolution, else "
                   "latent size × 8 (must match the model)")
    p.add_argument("--out", default="pca.png", help="output PNG; the .npz and .json go beside it")
    p.add_argument("--baseline", type=str2bool, nargs="?", const=True, default=False, metavar="BOOL",
                   help="--ckpt is a plain model trained without SRA; only labels the figure (the "
                   "SRA head is never used here). '--baseline' or '--baseline=true' / '=false'")
    p.add_argument("--device", default="auto", help="torch device: auto (cuda if available), cpu, cuda")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sra.viz.pca_run import PcaConfig, run_pca

    cfg = PcaConfig(
        ckpt=args.ckpt, compare=args.compare, image=args.image, label=args.label,
        times=tuple(args.times), blocks=tuple(args.blocks) if args.blocks else None,
        seed=args.seed, weights=args.weights, vae=args.vae, resolution=args.resolution,
        out=args.out, baseline=args.baseline, device=args.device,
    )
    result = run_pca(cfg)
    grids = ", ".join(f"{m.shape[2]}x{m.shape[3]}" for m in result.maps)
    print(f"wrote {result.png} ({len(cfg.times)} times × blocks, token grid {grids}), "
          f"{result.npz}, {result.json} in {result.settings['seconds']:.1f}s")
    return 0
