"""Small argparse types shared by the subcommands (booleans that parse, comma lists)."""

from __future__ import annotations

import argparse

TRUE_WORDS = ("true", "1", "yes", "y", "on")
FALSE_WORDS = ("false", "0", "no", "n", "off")


def str2bool(value: str | bool) -> bool:
    """Parse a boolean flag value: true/false, 1/0, yes/no, on/off (any case).

    Unlike ``type=bool`` (where ``"False"`` is truthy), ``--flag=False`` really gives False.
    Use with ``nargs="?", const=True`` so a bare ``--flag`` means True.
    """
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(
        f"expected a boolean, got {value!r}; allowed: {', '.join(TRUE_WORDS + FALSE_WORDS)}"
    )


def _split(text: str) -> list[str]:
    return [part.strip() for part in str(text).split(",") if part.strip()]


def int_list(text: str) -> tuple[int, ...]:
    """``"1,4,8"`` → (1, 4, 8)."""
    try:
        values = tuple(int(part) for part in _split(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers (e.g. 1,4,8), got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer (e.g. 1,4,8)")
    return values


def float_list(text: str) -> tuple[float, ...]:
    """``"0.7,0.5"`` → (0.7, 0.5)."""
    try:
        values = tuple(float(part) for part in _split(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers (e.g. 0.7,0.5), got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number (e.g. 0.7,0.5)")
    return values
