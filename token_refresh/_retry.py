"""The outage-proof retry policy: exponential backoff with a cap and jitter, until terminal.

A :class:`RetryPolicy` is an immutable value: the next delay is a function
of the number of failures in a row and one random draw, as tenacity's
``RetryCallState`` and urllib3's ``Retry`` keep it. The state machine asks
it for delays; the driver asks it, on the worker that caught the exception,
whether an error is terminal (the machine sees only the verdict).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from ._validate import at_least, seconds

__all__ = ["RetryPolicy", "Verdict", "checked"]

#: The least ``first_delay``: a shorter one would be a refresh loop.
MIN_FIRST_DELAY: Final = 0.1
#: The longest ``cap``: an outage never pushes a retry further than an hour.
MAX_CAP: Final = 3600.0
#: The most ``jitter``: a delay is never drawn under half its step.
MAX_JITTER: Final = 0.5
#: OAuth error codes that no retry can fix (the client itself is refused).
TERMINAL_ERRORS: Final = ("invalid_client", "unauthorized_client")

#: What the user's ``terminal`` callable returns: True or a reason (terminal),
#: False (retry, whatever the built-in rule says) or None (the built-in rule decides).
TerminalRule = Callable[[BaseException], "bool | str | None"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the driver learnt from a failed call: why it is terminal, and the server's wait."""

    terminal: str | None = None  # "terminal: invalid_client", ...; None: retry
    wait: float = 0.0  # a RateLimited's retry_after: the least delay before the retry


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Back off and keep retrying a failed refresh until its error is terminal.

    The ``n``-th failure in a row is retried after
    ``min(cap, first_delay * multiplier ** (n - 1))`` seconds, shortened at
    random by up to ``jitter`` of itself (a fraction, at most 0.5), and never
    sooner than a :class:`~token_refresh.shared.RateLimited`'s
    ``retry_after``. Defaults: 10 s, doubling, capped at 5 minutes, jitter 0.2.

    The chain ends only on a terminal error: an
    :class:`~token_refresh.oauth.OAuthError` whose ``error`` is
    ``invalid_client`` or ``unauthorized_client``, an
    :class:`~token_refresh.shared.InvalidGrant` (a ``SharedToken`` raises it
    after its ``invalid_grant_wait``), or what ``terminal(error)`` says:
    ``True`` or a reason string ends the chain, ``False`` retries (even a
    built-in terminal error), ``None`` leaves it to the built-in rule.
    """

    first_delay: float = 10.0
    cap: float = 300.0
    multiplier: float = 2.0
    jitter: float = 0.2
    terminal: TerminalRule | None = None

    def __post_init__(self) -> None:
        first = at_least(self.first_delay, "first_delay", MIN_FIRST_DELAY, "a refresh loop")
        cap = at_least(self.cap, "cap", first, "it is at least first_delay")
        if cap > MAX_CAP:
            raise ValueError(f"cap must be at most {MAX_CAP:g} seconds (an hour), not {cap!r}")
        multiplier = seconds(self.multiplier, "multiplier")
        if multiplier < 1:
            raise ValueError(f"multiplier must be at least 1, not {multiplier!r}")
        jitter = seconds(self.jitter, "jitter")
        if not 0 <= jitter <= MAX_JITTER:
            raise ValueError(f"jitter must be from 0 to {MAX_JITTER:g}, not {jitter!r}")
        if self.terminal is not None and not callable(self.terminal):
            raise TypeError("terminal must be callable or None")
        for name, value in (
            ("first_delay", first),
            ("cap", cap),
            ("multiplier", multiplier),
            ("jitter", jitter),
        ):
            object.__setattr__(self, name, value)  # a timedelta or Fraction kept as a float

    def step(self, failures: int) -> float:
        """The delay after ``failures`` failures in a row, before jitter."""
        try:
            grown = self.first_delay * self.multiplier ** max(0, failures - 1)
        except OverflowError:
            grown = math.inf
        return min(grown, self.cap)

    def delay(self, failures: int, draw: float, *, wait: float = 0.0) -> float:
        """The jittered delay (``draw``: uniform in [0, 1)), at least the server's ``wait``."""
        return max(self.step(failures) * (1.0 - self.jitter * draw), wait)

    def hold(self, failing_for: float, draw: float) -> float:
        """A shared hold-back after ``failing_for`` seconds of failures (for SharedToken).

        ``(multiplier - 1) * failing_for``, from ``first_delay`` to ``cap``:
        the same doubling as :meth:`delay` when every attempt comes when its
        hold-back ends, but counted from a time every process can read.
        """
        grown = max(self.first_delay, (self.multiplier - 1.0) * max(0.0, failing_for))
        return min(grown, self.cap) * (1.0 - self.jitter * draw)

    def verdict(self, error: BaseException) -> tuple[Verdict, BaseException | None]:
        """Classify a failure; the second item is an exception the user's callable raised."""
        wait = _retry_after(error)
        if self.terminal is not None:
            try:
                said = self.terminal(error)
            except BaseException as raised:  # the built-in rule decides; the driver logs it
                # (a KeyboardInterrupt too: it must not leave a refresh that never settles)
                return Verdict(_built_in(error), wait), raised
            if said is False:
                return Verdict(None, wait), None
            if said is True:
                return Verdict(f"terminal: {type(error).__name__}", wait), None
            if isinstance(said, str) and said:
                return Verdict(f"terminal: {said}", wait), None
        return Verdict(_built_in(error), wait), None


def checked(policy: object) -> RetryPolicy | None:
    """A ``retry_policy=`` option: a RetryPolicy or None."""
    if policy is not None and not isinstance(policy, RetryPolicy):
        raise TypeError(f"retry_policy must be a RetryPolicy or None, not {type(policy).__name__}")
    return policy


def _built_in(error: BaseException) -> str | None:
    """The built-in terminal rule, without importing the integrations.

    An exception of a class from a module never imported cannot exist, so
    looking the classes up in ``sys.modules`` is exact and keeps the core
    free of ``token_refresh.oauth`` and ``token_refresh.shared``.
    """
    oauth = sys.modules.get("token_refresh.oauth")
    if oauth is not None and isinstance(error, oauth.OAuthError):
        code = error.error
        return f"terminal: {code}" if code in TERMINAL_ERRORS else None
    shared = sys.modules.get("token_refresh.shared")
    if shared is not None and isinstance(error, shared.InvalidGrant):
        return "terminal: invalid_grant"
    return None


def _retry_after(error: BaseException) -> float:
    shared = sys.modules.get("token_refresh.shared")
    if shared is not None and isinstance(error, shared.RateLimited):
        return float(error.retry_after)
    return 0.0
