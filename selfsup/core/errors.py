"""User-facing errors: the CLI prints them as one line and exits with status 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input from the user (a name, a key, a value, a file). Never a bug in selfsup."""


def closest(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    choices = list(choices)
    found = difflib.get_close_matches(word, choices, n=n, cutoff=0.5)
    if not found:  # fall back to prefix/substring matches so that e.g. 'vit' still suggests something
        found = [c for c in choices if word and (c.startswith(word) or word in c)][:n]
    if not found:  # always name the nearest choice, however far it is
        found = difflib.get_close_matches(word, choices, n=1, cutoff=0.0)
    return found


def unknown_choice(kind: str, value: str, choices: Iterable[str]) -> UserError:
    choices = sorted(choices)
    near = closest(value, choices)
    hint = f"did you mean {' or '.join(repr(c) for c in near)}? " if near else ""
    return UserError(f"unknown {kind} {value!r}: {hint}valid: {', '.join(choices)}")
