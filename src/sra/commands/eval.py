"""``sra eval``: ADM-suite metrics (FID, sFID, IS, precision/recall) or the digits metric of a sample npz."""

from __future__ import annotations

import argparse
from pathlib import Path

from sra.eval.metrics import IS_SPLIT_SIZE, PR_K


def register(subparsers) -> None:
    """Add the ``eval`` subcommand."""
    p = subparsers.add_parser(
        "eval",
        help="FID / sFID / IS / precision / recall of a sample npz (or the digits metric)",
        description=(
            "Evaluate samples as the ADM evaluation suite does: SAMPLES.npz holds arr_0, uint8 "
            "(N, H, W, 3). Inception activations are cached beside each npz; results go to a JSON "
            "file and a printed table. With --digits, the project's digit classifier gives a Frechet "
            "distance and (if the npz has 'labels') the class accuracy instead."
        ),
    )
    p.add_argument("samples", type=Path, help="sample batch (.npz with arr_0, as written by `sra sample`)")
    p.add_argument("--ref", default=None,
                   help="ADM reference batch .npz (arr_0 images; mu/sigma/mu_s/sigma_s used as stored "
                        "when present): a file, a registry name (imagenet256, imagenet512), "
                        "hf://owner/repo/path or an https:// URL; required unless --digits")
    p.add_argument("--digits", action="store_true",
                   help="digits metric (classifier Frechet distance + class accuracy) instead of Inception")
    p.add_argument("--inception-weights", default=None,
                   help="Inception-v3 state dict: a local .pth/.pt or .safetensors file, a URL, "
                        "hf://… or a registry name (default: inception-2015-12-05, torch-fidelity's "
                        "port of the TF graph); read as tensors only, never as pickled code")
    p.add_argument("--batch-size", type=int, default=100,
                   help="images per Inception forward pass (default: %(default)s)")
    p.add_argument("--device", default=None,
                   help="torch device for Inception (default: cuda if available, else cpu)")
    p.add_argument("--is-split-size", type=int, default=IS_SPLIT_SIZE,
                   help="samples per Inception Score split (default: %(default)s, ADM's: 10 splits for 50K)")
    p.add_argument("--pr-k", type=int, default=PR_K,
                   help="k of the k-NN precision/recall radii (default: %(default)s as in ADM: the "
                        "4th-nearest distance including self)")
    p.add_argument("--out", type=Path, default=None,
                   help="metrics JSON path (default: SAMPLES.metrics.json beside the samples)")
    p.add_argument("--no-cache", action="store_true",
                   help="neither read nor write the activation caches beside the npz files")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Parse → :class:`EvalConfig` → :func:`evaluate`; print the table."""
    from sra.errors import SraError
    from sra.eval.evaluate import EvalConfig, evaluate, format_table

    if not args.digits and args.ref is None:
        raise SraError("--ref REF.npz is required (or pass --digits for the digits metric)")
    if args.batch_size < 1 or args.is_split_size < 1 or args.pr_k < 1:
        raise SraError("--batch-size, --is-split-size and --pr-k must be >= 1")
    cfg = EvalConfig(
        samples=args.samples,
        ref=args.ref,
        digits=args.digits,
        inception_weights=args.inception_weights,
        batch_size=args.batch_size,
        device=args.device,
        is_split_size=args.is_split_size,
        pr_k=args.pr_k,
        cache=not args.no_cache,
        out=args.out,
        progress=not args.no_progress,
    )
    results = evaluate(cfg)
    print(format_table(results))
    print(f"metrics written to {results['json']}")
    return 0
