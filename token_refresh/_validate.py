"""One set of validators for what users pass: durations, counts and strings.

The scheduler, ``SharedToken`` and the stores all check their arguments here,
so that one rule holds everywhere: seconds are any real number (``int``,
``float``, ``Fraction``, ``Decimal``, numpy's floats) or a ``timedelta``, and
never a bool, NaN or an infinity.
"""

from __future__ import annotations

import math
import numbers
import threading
from datetime import timedelta
from decimal import Decimal

__all__ = ["at_least", "count", "positive", "require_str", "seconds", "wait_limit"]

# A wait longer than this is a wait for ever (threading refuses longer timeouts).
LONGEST_WAIT = float(threading.TIMEOUT_MAX)


def seconds(value: object, name: str) -> float:
    """A finite duration in seconds, from a real number or a ``timedelta``."""
    if isinstance(value, timedelta):
        # The base class's method: a subclass cannot make a duration NaN.
        return timedelta.total_seconds(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real | Decimal):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    try:
        result = float(value)
    except OverflowError:
        raise ValueError(f"{name} is out of range") from None
    if not math.isfinite(result):
        raise ValueError(f"{name} must be finite, not {result!r}")
    return result


def at_least(value: object, name: str, least: float, why: str = "") -> float:
    """A duration in seconds no shorter than ``least``."""
    result = seconds(value, name)
    if result < least:
        if not least:
            raise ValueError(f"{name} must not be negative, not {result!r}")
        because = f" ({why})" if why else ""
        unit = "second" if least == 1 else "seconds"
        raise ValueError(f"{name} must be at least {least:g} {unit}{because}, not {result!r}")
    return result


def positive(value: object, name: str) -> float:
    """A duration in seconds above zero."""
    result = seconds(value, name)
    if not result > 0:
        raise ValueError(f"{name} must be a positive number of seconds, not {result!r}")
    return result


def wait_limit(value: object, name: str = "timeout") -> float | None:
    """A wait's bound in seconds: None for ever (None, or longer than threading can wait)."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > LONGEST_WAIT:
        return None  # an int too large for a float included
    if isinstance(value, float) and value == math.inf:
        return None
    result = at_least(value, name, 0.0)
    return None if result > LONGEST_WAIT else result


def count(value: object, name: str, least: int) -> int:
    """A whole number no smaller than ``least``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < least:
        raise ValueError(f"{name} must be at least {least}, not {value}")
    return value


def require_str(value: object, name: str) -> str:
    """``value`` itself, if it is a ``str``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    return value
