"""Durations for people: days and hours for a long-lived token, not ``43199m 59s``."""

from __future__ import annotations

import math

_UNITS = (("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1))


def human_duration(seconds: float) -> str:
    """The two largest units that fit, cut down: ``"29d 23h"``, ``"2h 5m"``, ``"5m 30s"``.

    Cut, not rounded, so that the time left is never overstated. The library's
    ``format_duration`` keeps the seed's minutes-and-seconds format.
    """
    whole = max(math.floor(seconds), 0)
    for index, (name, size) in enumerate(_UNITS[:-1]):
        if whole >= size:
            count, rest = divmod(whole, size)
            small_name, small_size = _UNITS[index + 1]
            small = rest // small_size
            return f"{count}{name} {small}{small_name}" if small else f"{count}{name}"
    return f"{whole}s"
