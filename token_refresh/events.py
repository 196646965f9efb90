"""What the scheduler tells ``on_event``: one immutable record per lifecycle step.

Every event carries the session id, the scheduler's label and the wall time
(Unix seconds) it happened; none carries a token, only a fingerprint at most.

What a metrics exporter needs rides on the events too: when a refresh was due
and how late it started, what triggered it, how long ``get_access_token`` ran,
and, for a :class:`~token_refresh.shared.SharedToken`, who fetched the token
(``served_by``). :func:`token_refresh.otel.instrument` reads nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from ._expiry import SKEW_THRESHOLD
from ._format import session_label

#: What made a refresh attempt start: the token's ``exp``, an ``expires_in``,
#: a ``retry`` after a failure, the ``follow_up`` after a success, or
#: ``resume``: it fell due while the machine slept (or the wall clock stepped
#: past it), so it starts late, at least a second after its due time, well
#: before its delay has run out on the monotonic clock.
Trigger = Literal["exp", "expires_in", "retry", "follow_up", "resume"]

#: Who fetched the token a :class:`~token_refresh.shared.SharedToken` returned:
#: this very call (``fetch``), another call in this process (``thread``),
#: another process on this host (``process``), another host (``host``), or a
#: record whose writer is not known (``unknown``, written by token_refresh 0.1).
ServedBy = Literal["fetch", "thread", "process", "host", "unknown"]

__all__ = [
    "CallbackError",
    "Cancelled",
    "ClockSkew",
    "Event",
    "GaveUp",
    "RefreshFailed",
    "RefreshStarted",
    "RefreshTimedOut",
    "Refreshed",
    "RetryDropped",
    "Scheduled",
    "ServedBy",
    "StaleDropped",
    "TimerKept",
    "Trigger",
]


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class Event:
    """Base class of every event."""

    session_id: str
    label: str
    time: float

    def __repr__(self) -> str:
        # A session id that looks like a credential shows as a fingerprint, as in the logs.
        shown = ", ".join(
            f"{field.name}="
            + repr(
                session_label(self.session_id)
                if field.name == "session_id"
                else getattr(self, field.name)
            )
            for field in fields(self)
        )
        return f"{type(self).__name__}({shown})"


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
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


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class TimerKept(Event):
    """schedule() got a token with no usable ``exp`` and kept the existing timer."""

    token_fingerprint: str


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class RefreshStarted(Event):
    """get_access_token() is about to be called for the session.

    ``due`` is the wall time the attempt was due (the earlier of its two
    deadlines, as :meth:`~token_refresh.Scheduler.next_refresh_at` tells) and
    ``lateness`` how many seconds after it this start came (never negative): a
    suspend, a starved worker pool or a busy interpreter shows here first.
    ``attempt`` counts this refresh's calls from 1 (a retry is 2, then 3);
    ``trigger`` says what started this attempt.
    """

    due: float = 0.0
    lateness: float = 0.0
    trigger: Trigger = "exp"
    attempt: int = 1


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class Refreshed(Event):
    """A new token is being delivered to on_refresh (the seed's analytics event).

    ``trigger`` is what started the refresh (its first attempt's trigger, never
    ``retry``), ``attempts`` how many get_access_token calls it took,
    ``fetch_duration`` how long the last one ran (seconds), ``expires_at`` the
    token's ``exp`` if it is a JWT, and ``served_by`` who fetched it when
    get_access_token is a SharedToken (None otherwise).
    """

    token_fingerprint: str
    trigger: Trigger = "exp"
    attempts: int = 1
    fetch_duration: float = 0.0
    expires_at: float | None = None
    served_by: ServedBy | None = None


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class RefreshFailed(Event):
    """No token this time: ``attempt`` of ``max_attempts`` consecutive failures.

    ``max_attempts`` is 0 on a :class:`~token_refresh.RetryPolicy`, which
    retries until the error is terminal.

    ``error_type`` names the exception get_access_token raised, or the type it
    wrongly returned; it is None when it returned None or an empty string.
    ``final`` is True when no retry follows (the chain gives up, the error is
    terminal on a retry policy, or no timer could be armed for the retry):
    the refresh has failed, not just an attempt.
    ``called`` is False when get_access_token was not called at all, because
    an earlier call for the session still hangs past ``fetch_timeout``.
    ``trigger`` and ``fetch_duration`` are as in :class:`Refreshed`.
    """

    attempt: int
    max_attempts: int
    error_type: str | None
    final: bool = False
    called: bool = True
    trigger: Trigger = "exp"
    fetch_duration: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class RefreshTimedOut(RefreshFailed):
    """get_access_token ran past ``timeout`` seconds (``fetch_timeout``): a failure.

    Sent instead of a plain ``RefreshFailed`` (``error_type`` is
    ``"TimeoutError"``); the late result, if the call ever returns, is dropped.
    """

    timeout: float


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class GaveUp(Event):
    """The session's refresh chain stopped: too many failures, a terminal error, or no timer.

    ``failures`` is 0 when the operating system refused a timer thread.
    ``reason`` says why: ``"failures"`` (the seed's rule: three in a row),
    ``"no timer"``, or, on a :class:`~token_refresh.RetryPolicy`,
    ``"terminal: <why>"`` (``"terminal: invalid_client"``,
    ``"terminal: unauthorized_client"``, ``"terminal: invalid_grant"``, or
    what the policy's ``terminal`` callable said).
    """

    failures: int
    reason: str = "failures"


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class StaleDropped(Event):
    """A refresh finished after its session was rescheduled or cancelled; its result was dropped.

    ``trigger`` is what started the dropped refresh; ``fetch_duration`` how
    long its get_access_token call ran.
    """

    trigger: Trigger = "exp"
    fetch_duration: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class RetryDropped(Event):
    """A failed refresh's retry was dropped: the session was cancelled or rescheduled first.

    The refresh ends here, without a token; ``trigger`` is what started it.
    Sent before the ``Cancelled`` or ``Scheduled`` event that dropped it.
    """

    trigger: Trigger = "exp"


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class Cancelled(Event):
    """The session was cancelled by cancel(), cancel_all() or close()."""


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class CallbackError(Event):
    """on_refresh raised ``error_type``; the follow-up refresh is armed all the same."""

    error_type: str


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class ClockSkew(Event):
    """The token server's clock and this host's differ by ``skew`` seconds (or no longer do).

    ``skew`` is the server's clock minus ours (positive: the server is
    ahead), learned from a token just received (its ``iat``, or the token
    response's ``Date``) or from an ``iat`` in the future; ``0.0`` when it has
    come back within ``threshold`` seconds. Past ``threshold``, refresh times
    follow each token's lifetime counted from its receipt instead of its
    ``exp``. Sent once per change, not per refresh; ``session_id`` is the
    session whose token told it.
    """

    skew: float = 0.0
    threshold: float = SKEW_THRESHOLD
