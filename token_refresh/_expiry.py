"""When a token expires and when it is refreshed, by this host's clock: the one rule.

Pure functions over plain values (no I/O, no clock of their own), used by
``Scheduler.schedule()``, ``SharedToken`` and the grants of ``token_refresh.oauth``:

- a lifetime told as ``expires_in`` (or ``refresh_in``) counts from when the
  request was sent, less the response's ``Age``;
- the earlier of that and the JWT's ``exp`` wins;
- ``exp`` is on the token server's clock: when the skew between that clock and
  ours is past :data:`SKEW_THRESHOLD`, it is moved onto ours (``exp - skew``),
  which for a token just received is its lifetime (``exp - iat``) counted from
  its receipt.

Skew (the server's clock minus ours, in seconds) is learned only where it can
be told from age: from a token just received (its ``iat``, or the response's
``Date``, against the local time of receipt), or from an ``iat`` in the future.
A token that is merely old (``iat`` 20 minutes ago, from a cache) says nothing.
"""

from __future__ import annotations

import os
import threading
import weakref

from ._jwt import decode_jwt_payload, finite_number

__all__ = [
    "SKEW_STEP",
    "SKEW_THRESHOLD",
    "SkewTracker",
    "claims",
    "effective_skew",
    "expires",
    "lifetime_end",
    "local_exp",
    "measured_skew",
    "received_skew",
    "reuse_until",
    "skew_changed",
]

#: Seconds of skew past which refresh times follow token lifetimes, not ``exp``.
#: Below it the seed's rule holds unchanged; at or above it a 5-minute
#: ``refresh_buffer`` would be eaten (or a token sent expired) on a 10-minute token.
SKEW_THRESHOLD = 120.0
#: A learned skew is reported again only when it moves by more than this
#: (``iat`` and ``Date`` have one-second resolution, and a request takes time).
SKEW_STEP = 30.0


def claims(token: str) -> tuple[float | int | None, float | int | None]:
    """A JWT's ``exp`` and ``iat`` (Unix seconds), each None when missing or unusable.

    An ``exp`` of 0 counts as missing, as in the seed.
    """
    payload = decode_jwt_payload(token)
    if not isinstance(payload, dict):
        return None, None
    return finite_number(payload.get("exp")) or None, finite_number(payload.get("iat"))


def lifetime_end(sent: float, lifetime: object, age: float = 0.0) -> float | None:
    """``sent + lifetime - age`` for a positive lifetime (a number, or a numeric str), else None.

    ``sent`` is when the request left (local clock); ``age`` the response's
    ``Age`` header: how long it sat in a cache before we got it.
    """
    if isinstance(lifetime, str):
        try:
            lifetime = float(lifetime)
        except ValueError:
            return None
    seconds = finite_number(lifetime)
    if seconds is None or seconds <= 0:
        return None
    return sent + seconds - age


def measured_skew(token: str, received: float, date: float | None = None) -> float | None:
    """The server's clock minus ours, from a token received at ``received`` (local time).

    From the token's ``iat``; without one, from the response's ``Date``
    (``date``, Unix seconds); None when neither is known.
    """
    _, iat = claims(token)
    if iat is not None:
        return iat - received
    return None if date is None else date - received


def effective_skew(iat: float | None, learned: float | None, now: float) -> float:
    """The skew that moves a token's ``exp``: 0 when it is within :data:`SKEW_THRESHOLD`.

    ``learned`` is the skew measured when a token was received (None: never);
    an ``iat`` in the future shows the server is at least that far ahead. A
    token with neither a learned skew nor an ``iat`` keeps the seed's rule.
    """
    skew = learned or 0.0
    if iat is not None:
        skew = max(skew, iat - now)  # an old iat (a cached token) says nothing
    return skew if abs(skew) > SKEW_THRESHOLD else 0.0


def local_exp(exp: float, iat: float | None, learned: float | None, now: float) -> float:
    """A JWT's ``exp`` moved onto this host's clock by :func:`effective_skew`."""
    skew = effective_skew(iat, learned, now)
    return exp - skew if skew else exp


def expires(
    token: str, expires_at: float | None, learned: float | None, now: float
) -> float | None:
    """When the token expires by this host's clock; None when nothing tells.

    The earlier of ``expires_at`` (already on our clock: from ``expires_in``)
    and the JWT's ``exp`` moved onto our clock by :func:`local_exp`.
    """
    exp, iat = claims(token)
    if exp is None:
        return expires_at
    local = local_exp(exp, iat, learned, now)
    return local if expires_at is None else min(local, expires_at)


def received_skew(token: str, received: float) -> float | None:
    """The skew a token from a plain ``get_access_token`` shows, if age cannot explain it.

    Its ``iat`` against the time it was returned; None without an ``iat``, or
    when the token is older than :data:`SKEW_THRESHOLD` by our clock but not
    yet expired: a function that caches tokens returns such a token, so its
    ``iat`` may be age, not skew. One already expired by our clock is no
    cache's answer: that is skew (a host 15 minutes fast and 10-minute tokens).
    """
    exp, iat = claims(token)
    if iat is None:
        return None
    skew = iat - received
    if skew >= -SKEW_THRESHOLD or (exp is not None and exp <= received):
        return skew
    return None


def reuse_until(expiry: float | None, refresh_at: float | None, min_ttl: float) -> float | None:
    """Until when a stored grant is reused: ``min_ttl`` before it expires, or at ``refresh_at``.

    The earlier of the two that are known; None when neither is (an opaque
    token of unknown lifetime).
    """
    until = None if expiry is None else expiry - min_ttl
    if refresh_at is None or (until is not None and until <= refresh_at):
        return until
    return refresh_at


def skew_changed(reported: float, skew: float) -> bool:
    """Whether an effective skew differs enough from the last one reported to report it."""
    return abs(skew - reported) > SKEW_STEP


class SkewTracker:
    """The skew one Scheduler or SharedToken has learned, and the one it last reported.

    ``learn()`` takes a measurement and says whether to report it: once per
    change (past :data:`SKEW_STEP`, or across :data:`SKEW_THRESHOLD`), not per
    token. Its lock is held for a few assignments only, and replaced in a
    forked child.
    """

    def __init__(self) -> None:
        self.learned: float | None = None  #: the last skew measured (server minus ours)
        self.reported = 0.0  #: the last effective skew reported (0: within the threshold)
        self._lock = threading.Lock()
        _trackers.add(self)

    def learn(self, skew: float) -> float | None:
        """Take a measured skew; the effective skew to report if it changed, else None."""
        effective = skew if abs(skew) > SKEW_THRESHOLD else 0.0
        with self._lock:
            self.learned = skew
            if not skew_changed(self.reported, effective):
                return None
            self.reported = effective
        return effective

    def _after_fork(self) -> None:  # pragma: no cover - runs in forked children (tested)
        self._lock = threading.Lock()


_trackers: weakref.WeakSet[SkewTracker] = weakref.WeakSet()


def _after_fork_in_child() -> None:  # pragma: no cover - runs in forked children
    for tracker in list(_trackers):
        tracker._after_fork()


if hasattr(os, "register_at_fork"):  # pragma: no branch - not on Windows
    os.register_at_fork(after_in_child=_after_fork_in_child)
