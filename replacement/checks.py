"""Checks of settings shared by the library and the command line, each one sentence of `BadInputError`."""
from __future__ import annotations

from .errors import BadInputError


def check_fraction(name: str, value: float) -> None:
    """``value`` in (0, 1] (a NaN is not)."""
    if not 0 < value <= 1:
        raise BadInputError(f"{name} must be in (0, 1], not {value}")


def check_count(name: str, value: int | None) -> None:
    """``value`` is None (no limit) or at least 1."""
    if value is not None and value < 1:
        raise BadInputError(f"{name} must be at least 1, not {value}")
