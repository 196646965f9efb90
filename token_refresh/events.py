"""What the scheduler tells ``on_event``: one immutable record per lifecycle step.

Every event carries the session id, the scheduler's label and the wall time
(Unix seconds) it happened; none carries a token, only a fingerprint at most.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "CallbackError",
    "Cancelled",
    "Event",
    "GaveUp",
    "RefreshFailed",
    "RefreshStarted",
    "RefreshTimedOut",
    "Refreshed",
    "Scheduled",
    "StaleDropped",
    "TimerKept",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base class of every event."""

    session_id: str
    label: str
    time: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Scheduled(Event):
    """A refresh was armed ``delay`` seconds out, due at wall time ``due``.

    It comes at ``due`` or once ``delay`` has run on the monotonic clock,
    whichever is first (they differ once a clock jumps). ``reason`` says why:
    a JWT's ``exp`` (``delay`` 0 when it refreshes at once), an
    ``expires_in``, a ``retry`` after a failure, or a ``follow_up``.
    ``after_expiry`` is True when the floor on ``expires_in``
    (``expires_in_floor``, 30 s) puts the refresh after the token has expired.
    """

    due: float
    delay: float
    reason: Literal["exp", "expires_in", "retry", "follow_up"]
    after_expiry: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class TimerKept(Event):
    """schedule() got a token with no usable ``exp`` and kept the existing timer."""

    token_fingerprint: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RefreshStarted(Event):
    """get_access_token() is about to be called for the session."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Refreshed(Event):
    """A new token is being delivered to on_refresh (the seed's analytics event)."""

    token_fingerprint: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RefreshFailed(Event):
    """No token this time: ``attempt`` of ``max_attempts`` consecutive failures.

    ``error_type`` names the exception get_access_token raised, or the type it
    wrongly returned; it is None when it returned None or an empty string.
    """

    attempt: int
    max_attempts: int
    error_type: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class RefreshTimedOut(RefreshFailed):
    """get_access_token ran past ``timeout`` seconds (``fetch_timeout``): a failure.

    Sent instead of a plain ``RefreshFailed`` (``error_type`` is
    ``"TimeoutError"``); the late result, if the call ever returns, is dropped.
    """

    timeout: float


@dataclass(frozen=True, slots=True, kw_only=True)
class GaveUp(Event):
    """The session's refresh chain stopped: too many failures, or no timer could be armed."""

    failures: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StaleDropped(Event):
    """A refresh finished after its session was rescheduled or cancelled; its result was dropped."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Cancelled(Event):
    """The session was cancelled by cancel(), cancel_all() or close()."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CallbackError(Event):
    """on_refresh raised ``error_type``; the follow-up refresh is armed all the same."""

    error_type: str
