"""The ``sra`` command line: parse → config → library call. Errors a user can cause are one line."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from sra import __version__
from sra.commands import COMMANDS
from sra.errors import SraError
from sra.oserrors import os_error_line
from sra.runlock import release_all


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="sra",
        description="Self-Representation Alignment (SRA) for diffusion transformers (SiT / DiT).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sra {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sra`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        result = args.func(args)
    except (SraError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
        print(f"sra {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a refused write no writer named (they raise WriteError, above)
        line = os_error_line(exc)
        if line is None:
            raise
        print(f"sra {args.command}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sra {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        release_all()  # the command's directory locks end with it (sra.runlock)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
