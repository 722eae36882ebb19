"""``sra artefacts``: the known external files (checkpoints, reference batches, weights), and
fetching them ahead of time (then usable offline with ``HF_HUB_OFFLINE=1`` / ``SRA_OFFLINE=1``)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add ``sra artefacts [fetch NAME …]``."""
    p = subparsers.add_parser(
        "artefacts", help="list the known checkpoints / reference batches / weights, or fetch them",
        description=__doc__ + "\nEvery name works wherever a file is accepted (--ckpt, --ref, "
        "--inception-weights, --init-from, --fid-ref), as do hf://owner/repo/path and https:// URLs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("action", nargs="?", choices=("list", "fetch"), default="list",
                   help="list (default) or fetch")
    p.add_argument("names", nargs="*", help="fetch: registry names, hf:// addresses or URLs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sra.artefacts import ARTEFACTS, resolve
    from sra.errors import SraError

    if args.action == "fetch":
        if not args.names:
            raise SraError("sra artefacts fetch needs at least one name; allowed: " + ", ".join(ARTEFACTS))
        for name in args.names:
            print(f"{name}: {resolve(name, what=name)}")
        return 0
    width = max(len(n) for n in ARTEFACTS)
    for art in ARTEFACTS.values():
        print(f"{art.name:<{width}}  {art.kind:<10}  {art.about}\n{'':<{width}}  {'':<10}  {art.url}")
    return 0
