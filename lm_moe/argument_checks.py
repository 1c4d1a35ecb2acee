"""Argument checks for every constructor that takes user settings (layers, models, Lightning and
data modules): fail before any work starts, and name the argument, the bad value and what is allowed."""

import math
from collections.abc import Callable, Collection


def _require(name: str, value, acceptable: bool, allowed: str) -> None:
    if not acceptable:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not to a user


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def require_number(name: str, value, in_range: Callable[[float], bool], allowed: str) -> float:
    """A finite number (not a bool) for which `in_range` holds; `allowed` says which, in the error.
    (YAML reads `.inf` and `.nan` as floats, and a run would train on to NaN weights.)"""
    if _is_number(value) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number ({allowed}), got {value!r}")
    _require(name, value, _is_number(value) and in_range(value), allowed)
    return float(value)


def require_positive_int(name: str, value) -> int:
    _require(name, value, _is_int(value) and value > 0, "a positive integer")
    return value


def require_non_negative_int(name: str, value) -> int:
    _require(name, value, _is_int(value) and value >= 0, "an integer >= 0")
    return value


def require_positive_float(name: str, value) -> float:
    return require_number(name, value, lambda v: v > 0, "a positive number")


def require_non_negative_float(name: str, value) -> float:
    return require_number(name, value, lambda v: v >= 0, "a number >= 0")


def require_fraction(name: str, value) -> float:
    """A probability or rate in [0, 1): dropout, jitter noise, label smoothing, Adam's betas."""
    return require_number(name, value, lambda v: 0 <= v < 1, "a number in [0, 1)")


def require_proper_fraction(name: str, value) -> float:
    """A share strictly between 0 and 1: a held-out fraction, which must leave data on both sides."""
    return require_number(name, value, lambda v: 0 < v < 1, "a number in (0, 1)")


def require_unit_interval(name: str, value) -> float:
    """A ratio from 0 to 1, both ends included."""
    return require_number(name, value, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def require_choice(name: str, value, allowed: Collection) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {sorted(allowed)}, got {value!r}")
