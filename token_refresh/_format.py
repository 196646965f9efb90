"""Human-readable durations, log-safe token fingerprints and timestamps."""

from __future__ import annotations

import hashlib
import math
import re
from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _js_round(value: float) -> int:
    """Round half up, as JavaScript's ``Math.round`` does (``-2.5`` -> ``-2``)."""
    whole = math.floor(value)
    return whole + 1 if value - whole >= 0.5 else whole


def format_duration(seconds: float) -> str:
    """Format a duration as the seed does: ``"45s"``, ``"2m"``, ``"5m 30s"``.

    Under a minute, whole seconds rounded half up (``59.5`` -> ``"60s"``);
    otherwise whole minutes and the rounded remaining seconds.
    """
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"seconds must be a number, not {type(seconds).__name__}")
    try:
        finite = math.isfinite(seconds)
    except OverflowError:  # an int too large for a float
        finite = False
    if not finite:
        raise ValueError(f"seconds must be finite, not {seconds!r}")
    milliseconds = seconds * 1000
    if math.isinf(milliseconds):  # beyond any timer; whole minutes say enough
        return f"{math.floor(seconds / 60)}m"
    if milliseconds < 60_000:
        return f"{_js_round(milliseconds / 1000)}s"
    minutes = math.floor(milliseconds / 60_000)
    rest = _js_round(math.fmod(milliseconds, 60_000) / 1000)
    return f"{minutes}m {rest}s" if rest > 0 else f"{minutes}m"


def fingerprint(token: str) -> str:
    """A short, non-reversible stand-in for a token in logs and events."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:8]


# A JWS or JWE: a base64url JSON header ("eyJ" is '{"') and then a dot.
_JOSE_SHAPE = re.compile(r"eyJ[A-Za-z0-9_-]*\.")


def looks_like_credential(value: str) -> bool:
    """Whether an identifier looks like a token (a JWS or JWE, or the ``sk-ant-si-`` prefix)."""
    return "sk-ant-si-" in value or _JOSE_SHAPE.search(value) is not None


def session_label(session_id: str) -> str:
    """A session id as logs and reprs show it: a fingerprint if it looks like a credential."""
    return fingerprint(session_id) if looks_like_credential(session_id) else session_id


def format_seconds(value: float) -> str:
    """Print a number of seconds as JavaScript would: ``300``, not ``300.0``."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def format_instant(unix_seconds: float) -> str:
    """ISO 8601 in UTC with milliseconds, like ``Date.prototype.toISOString``.

    Fractions of a millisecond are cut toward zero, as ``Date`` does.
    """
    try:
        milliseconds = math.trunc(unix_seconds * 1000)
        instant = _EPOCH + timedelta(milliseconds=milliseconds)
    except (OverflowError, ValueError):
        # Beyond what datetime holds (the seed throws a RangeError here).
        return f"{format_seconds(unix_seconds)} (Unix seconds)"
    return (
        f"{instant.replace(tzinfo=None).isoformat(timespec='seconds')}.{milliseconds % 1000:03d}Z"
    )


def format_skew(skew: float) -> str:
    """A clock skew (server minus ours) in words: ``"15m ahead of"``, ``"15m behind"``."""
    return f"{format_duration(abs(skew))} {'ahead of' if skew > 0 else 'behind'}"
