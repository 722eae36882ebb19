"""``python -m sra …``: the same command line as the ``sra`` console script."""

from __future__ import annotations

import sys

from sra.cli import main

if __name__ == "__main__":
    sys.exit(main())
