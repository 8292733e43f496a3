"""Argument checks shared across fastedit: whole counts, plain integers, numbers in an interval,
and a name from a fixed set.

Every function takes the argument's name (for the message) and its value, raises on a bad value
and otherwise returns it in a normal form (``int``, ``float``, or the value itself). A bool is
never a number here, although Python counts ``True`` as the integer 1. NumPy scalars are accepted
wherever a Python ``int`` or ``float`` is, except by ``check_real(..., tensor_ok=True)`` (see there).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Collection

from torch import Tensor

__all__ = ["check_count", "check_int", "check_real", "check_choice"]


def check_count(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an ``int``, which must be an integer ``≥ minimum`` (a Python or NumPy integer).

    Raises ``ValueError`` for anything else, a value of the wrong type included: a count of steps,
    samples or neighbours is "bad" however it is wrong.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r}")
    return int(value)


def check_int(name: str, value: Any) -> int:
    """``value`` as an ``int``: any integer (a Python or NumPy integer), e.g. a seed.

    Raises ``TypeError`` for anything else: every integer is a good value, so only the type can be
    wrong.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    return f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def check_real(name: str, value: Any, low: float, high: float, *, low_open: bool = False,
               high_open: bool = False, tensor_ok: bool = False,
               wrong_type: type[Exception] = TypeError) -> float:
    """``value`` as a ``float``, which must be finite and lie in the interval from ``low`` to
    ``high``, each end excluded when ``low_open`` / ``high_open`` (``math.inf`` for no bound).

    Args:
        tensor_ok: also accept a one-element tensor (read once, here; e.g. a learnable
            hyper-parameter). Its callers keep the value as given and multiply tensors by it, so
            then only the kinds of numbers that tensor arithmetic takes count as numbers: a Python
            ``int`` or ``float`` (a NumPy ``float64`` is a ``float``). Without it, any real
            number (``numbers.Real``: NumPy scalars too) is accepted, and the caller keeps the float
            returned.
        wrong_type: the exception raised for a value that is not a number at all (default
            ``TypeError``); a tensor with more than one element, a non-finite number and a number
            outside the interval always raise ``ValueError``.
    """
    where = _interval(low, high, low_open, high_open)
    if isinstance(value, Tensor) and tensor_ok:
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        number = float(value.detach())
    elif isinstance(value, bool) or not isinstance(value, (int, float) if tensor_ok else numbers.Real):
        kinds = "a number or a one-element tensor" if tensor_ok else "a number"
        raise wrong_type(f"{name} must be {kinds} in {where}, got {type(value).__name__} {value!r}")
    else:
        number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number in {where}, got {number}")
    if (number <= low if low_open else number < low) or (number >= high if high_open else number > high):
        raise ValueError(f"{name} must lie in {where}, got {number}")
    return number


def check_choice(what: str, value: Any, choices: Collection) -> Any:
    """``value`` itself, which must be one of ``choices`` (e.g. the keys of a table of methods).

    Raises ``ValueError`` naming ``what`` and listing the choices, also for an unhashable value
    (which cannot be a key of a table)."""
    try:
        known = value in choices
    except TypeError:
        known = False
    if not known:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(repr(c) for c in choices)}")
    return value
