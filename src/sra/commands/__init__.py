"""CLI subcommands: each module defines ``register(subparsers)`` which adds its parser and
sets ``func=run``. Modules are imported lazily by :mod:`sra.cli` so ``sra --help`` stays fast."""

# name -> module path; the order is the order shown by ``sra --help``.
COMMANDS: dict[str, str] = {
    "models": "sra.commands.models",
    "preprocess": "sra.commands.preprocess",
    "train": "sra.commands.train",
    "sample": "sra.commands.sample",
    "eval": "sra.commands.eval",
    "export": "sra.commands.export",
    "compare": "sra.commands.compare",
    "pca": "sra.commands.pca",
    "artefacts": "sra.commands.artefacts",
}
