"""The value checks every edge shares (command-line options, profile fields, record fields): one wording, one rule.

Each raises ``UsageError`` naming the field; callers that know more (a profile's file and table) prefix it.
"""

from __future__ import annotations

import math

from obsdiff.errors import UsageError


def is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_whole(name: str, value, minimum: int, maximum: int | None = None) -> None:
    """A whole number in [minimum, maximum] (``True`` is not a number here)."""
    if not is_whole(value) or value < minimum or (maximum is not None and value > maximum):
        bound = f"in [{minimum}, {maximum}]" if maximum is not None else f"≥ {minimum}"
        raise UsageError(f"{name} must be a whole number {bound}, got {value!r}")


def check_number(name: str, value, low: float, high: float | None = None, *, open_low: bool = False,
                 open_high: bool = False) -> None:
    """A finite number between ``low`` and ``high``; each bound closed unless said open."""
    ok = is_number(value) and (value > low if open_low else value >= low)
    ok = ok and (high is None or (value < high if open_high else value <= high))
    if not ok:
        if high is None:
            bounds = f"{'>' if open_low else '≥'} {low:g}"
        else:
            bounds = f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        raise UsageError(f"{name} must be a finite number {bounds}, got {value!r}")
