"""User-facing errors.

Anything a user can cause (bad flag, missing file, wrong shape, mismatched checkpoint) raises
:class:`SraError` (a ``ValueError``) whose message is one line that names the allowed values.
The CLI prints such errors as ``sra: error: <message>`` without a traceback.
"""

from __future__ import annotations

from typing import Iterable


class SraError(ValueError):
    """An error caused by user input; its message is shown to the user as one line."""


def choice_error(what: str, value: object, allowed: Iterable[object]) -> SraError:
    """Build an error for ``value`` not among ``allowed`` (the message lists them)."""
    allowed = list(allowed)
    return SraError(f"unknown {what} {value!r}; allowed: {', '.join(map(str, allowed))}")


def check_choice(what: str, value: object, allowed: Iterable[object]) -> None:
    """Raise :class:`SraError` unless ``value`` is in ``allowed``."""
    allowed = list(allowed)
    if value not in allowed:
        raise choice_error(what, value, allowed)
