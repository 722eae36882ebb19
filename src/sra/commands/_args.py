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


def _number_list(text: str, kind: type, example: str) -> tuple:
    what = "integers" if kind is int else "numbers"
    try:
        values = tuple(kind(part) for part in _split(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated {what} (e.g. {example}), got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(
            f"expected at least one {what[:-1] if kind is int else 'number'} (e.g. {example})")
    return values


def int_list(text: str) -> tuple[int, ...]:
    """``"1,4,8"`` → (1, 4, 8)."""
    return _number_list(text, int, "1,4,8")


def float_list(text: str) -> tuple[float, ...]:
    """``"0.7,0.5"`` → (0.7, 0.5)."""
    return _number_list(text, float, "0.7,0.5")
