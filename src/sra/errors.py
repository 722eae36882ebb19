"""User-facing errors: the one error type a user can cause, and one-line wording of library errors.

Anything a user can cause (bad flag, missing file, wrong shape, mismatched checkpoint) raises
:class:`SraError` (a ``ValueError``) whose message is one line that names the allowed values.
The CLI prints such errors as ``sra: error: <message>`` without a traceback. A library's own
exception is relayed inside such a line through :func:`first_line`.
"""

from __future__ import annotations

from typing import Iterable

# Lines of library errors that advise loading a file unsafely (torch suggests
# ``weights_only=False``, i.e. running the file's code): we never pass that advice on.
UNSAFE_ADVICE = ("weights_only", "weights only", "trusted source")


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


def first_line(
    source: BaseException | str,
    *,
    skip: Iterable[str] = UNSAFE_ADVICE,
    with_type: bool = False,
    limit: int | None = None,
) -> str:
    """The first non-blank line of an error message, stripped, to quote inside a one-line error.

    Lines containing any of ``skip`` (case-insensitive) are passed over. ``limit`` caps the
    line's length. For an exception, ``with_type`` gives ``"TypeName: line"``, and a message
    without a usable line gives ``"TypeName"``; for text, no usable line gives ``""``.
    """
    text = str(source)
    words = [w.lower() for w in skip]
    line = ""
    for candidate in text.splitlines():
        candidate = candidate.strip()
        if candidate and not any(w in candidate.lower() for w in words):
            line = candidate if limit is None else candidate[:limit]
            break
    if not isinstance(source, BaseException):
        return line
    name = type(source).__name__
    if not line:
        return name
    return f"{name}: {line}" if with_type else line
