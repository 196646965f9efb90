"""``token-refresh inspect``: when a token expires, and when a Scheduler would refresh it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

from token_refresh._format import format_seconds
from token_refresh._jwt import decode_jwt_expiry, decode_jwt_payload

from ._duration import human_duration

#: The claims whose values are shown: timing only, never anything about a person.
TIMING_CLAIMS = ("exp", "iat", "nbf")


class NotAJWTError(ValueError):
    """The text is not a JWT with a usable ``exp`` claim (the message never quotes it)."""


@dataclass(frozen=True, slots=True)
class Inspection:
    """What ``inspect`` tells about one token: timings and claim names, no values."""

    now: float  #: wall time of the inspection, Unix seconds
    expires_at: float  #: the exp claim
    refresh_buffer: float  #: seconds, as Scheduler(refresh_buffer=...)
    claims: tuple[str, ...]  #: every claim's name, sorted
    timing_claims: dict[str, float]  #: the values of exp, iat and nbf, when numbers

    @property
    def expires_in(self) -> float:
        """Seconds left; negative once expired."""
        return self.expires_at - self.now

    @property
    def expired(self) -> bool:
        return self.expires_at <= self.now

    @property
    def refresh_at(self) -> float:
        """When ``schedule()`` would refresh: ``exp - refresh_buffer``, or now if that passed."""
        return max(self.expires_at - self.refresh_buffer, self.now)

    def as_json(self) -> dict[str, object]:
        """The facts as a JSON object; the keys are documented in ``inspect --help``."""
        expires_utc, expires_local = _iso(self.expires_at)
        refresh_utc, refresh_local = _iso(self.refresh_at)
        return {
            "expired": self.expired,
            "expires_at": self.expires_at,
            "expires_at_utc": expires_utc,
            "expires_at_local": expires_local,
            "expires_in": self.expires_in,
            "refresh_buffer": self.refresh_buffer,
            "refresh_at": self.refresh_at,
            "refresh_at_utc": refresh_utc,
            "refresh_at_local": refresh_local,
            "refresh_in": self.refresh_at - self.now,
            "claims": list(self.claims),
            "timing_claims": self.timing_claims,
        }

    def as_text(self) -> str:
        """The facts for a person, one per line."""
        if self.expired:
            left = f"expired {human_duration(-self.expires_in)} ago"
            refresh = "now: the token has expired"
        else:
            left = human_duration(self.expires_in)
            buffer = human_duration(self.refresh_buffer)
            wait = self.refresh_at - self.now
            refresh = (
                f"{_when(self.refresh_at)}, in {human_duration(wait)}"
                if wait > 0
                else f"now: it expires within the {buffer} buffer"
            )
        timings = [f"{name}={format_seconds(value)}" for name, value in self.timing_claims.items()]
        others = [_printable(name) for name in self.claims if name not in self.timing_claims]
        names = ", ".join(timings)
        if others:
            names += f"; also {', '.join(others)} (values not shown)"
        return "\n".join(
            (
                f"expires:  {_when(self.expires_at)}",
                f"left:     {left}",
                f"refresh:  {refresh} (--buffer {format_seconds(self.refresh_buffer)})",
                f"claims:   {names}",
                "The signature is not shown, and not verified.",
            )
        )


def inspect_token(token: str, *, now: float, refresh_buffer: float) -> Inspection:
    """Decode ``token`` (``sk-ant-si-`` prefix allowed) without verifying it.

    Raises NotAJWTError if it is not a JWT with a JSON object payload and a
    usable ``exp`` (a finite, non-zero number, as ``Scheduler.schedule`` needs).
    """
    payload = decode_jwt_payload(token)
    if payload is None:
        raise NotAJWTError("not a JWT: expected header.payload.signature, with a JSON payload")
    if not isinstance(payload, dict):
        raise NotAJWTError("not a JWT: its payload is not a JSON object")
    expires_at = decode_jwt_expiry(token)
    if not expires_at:  # 0 too: Scheduler.schedule() treats it as no expiry
        raise NotAJWTError("the token has no usable exp claim (Unix seconds, a finite number)")
    timing = {
        name: value for name in TIMING_CLAIMS if (value := _number(payload.get(name))) is not None
    }
    return Inspection(
        now=now,
        expires_at=expires_at,
        refresh_buffer=refresh_buffer,
        claims=tuple(sorted(payload)),
        timing_claims=timing,
    )


def _number(value: object) -> float | None:
    """``value`` if it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return value if math.isfinite(value) else None
    except OverflowError:  # an int too large for a float
        return None


def _moments(unix_seconds: float) -> tuple[datetime, datetime] | None:
    """The moment in UTC and in local time; None beyond what datetime holds."""
    try:
        utc = datetime.fromtimestamp(unix_seconds, UTC)
        return utc, utc.astimezone()
    except (OverflowError, OSError, ValueError):
        return None


def _when(unix_seconds: float) -> str:
    moments = _moments(unix_seconds)
    if moments is None:
        return f"{format_seconds(unix_seconds)} (Unix seconds, beyond the calendar)"
    utc, local = moments
    return f"{utc:%Y-%m-%d %H:%M:%S} UTC ({local:%Y-%m-%d %H:%M:%S %Z} local time)"


def _iso(unix_seconds: float) -> tuple[str | None, str | None]:
    moments = _moments(unix_seconds)
    if moments is None:
        return None, None
    utc, local = moments
    return (
        utc.isoformat(timespec="seconds").replace("+00:00", "Z"),
        local.isoformat(timespec="seconds"),
    )


def _printable(name: str) -> str:
    """A claim name as it can be shown on a terminal: escaped if it holds control characters."""
    return name if name.isprintable() else ascii(name)
