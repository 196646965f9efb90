"""The scheduler: one timer per session, refresh work on a small pool of workers."""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Any, Literal

from . import events
from ._context import served_by_context, session_context
from ._format import (
    fingerprint,
    format_duration,
    format_instant,
    format_seconds,
    looks_like_credential,
)
from ._jwt import decode_jwt_expiry
from ._runtime import ManualRuntime, Runtime, ThreadRuntime, Timer
from .testing import ManualClock

__all__ = ["Scheduler", "SchedulerClosedError", "Stats"]

_log = logging.getLogger("token_refresh")

#: Seconds before expiry at which a token is refreshed.
REFRESH_BUFFER = 300.0
#: Seconds until the follow-up refresh after a successful one.
FALLBACK_REFRESH_INTERVAL = 1800.0
#: Seconds until a failed refresh is retried.
REFRESH_RETRY_DELAY = 60.0
#: Consecutive failures after which a session's refresh chain gives up.
MAX_REFRESH_FAILURES = 3
#: Floor, in seconds, for delays computed from ``expires_in`` (``expires_in_floor``).
EXPIRES_IN_FLOOR = 30.0
#: The least ``retry_delay``, ``follow_up_interval`` and ``expires_in_floor``:
#: anything shorter would be a refresh loop against the token server.
MIN_DELAY = 1.0
#: Seconds a get_access_token call may run before it counts as a failure: longer
#: than a SharedToken waits by default (its lease_ttl, 30, plus 5).
FETCH_TIMEOUT = 60.0

# A wait longer than this is a wait for ever (threading refuses longer timeouts).
_LONGEST_WAIT = float(threading.TIMEOUT_MAX)
# A timer that fires this many seconds or more before its monotonic deadline,
# and as late by wall time, fell due while the machine slept (or the clock
# stepped past it): its trigger is "resume".
_RESUMED = 1.0

# Live schedulers, for the at-fork hook below.
_live_schedulers: weakref.WeakSet[Scheduler] = weakref.WeakSet()


class SchedulerClosedError(RuntimeError):
    """Raised by ``schedule*`` on a scheduler that has been closed."""


@dataclass(frozen=True, slots=True)
class Stats:
    """A snapshot of a scheduler's state and lifetime counters, for metrics."""

    sessions: int  #: sessions with a live refresh chain
    pending: int  #: sessions with a timer armed
    refreshes: int  #: tokens delivered to on_refresh
    failures: int  #: refresh attempts that got no token
    give_ups: int  #: refresh chains that ended after failing
    running: int = 0  #: get_access_token and on_refresh calls in progress
    stuck: int = 0  #: get_access_token calls past fetch_timeout, still running


_Reason = Literal["exp", "expires_in", "retry", "follow_up"]


class _Pending:
    """A session's refresh attempt, armed or running, bound to the generation that armed it."""

    __slots__ = (
        "attempt",
        "deadline",
        "delay",
        "due",
        "duration",
        "generation",
        "origin",
        "reason",
        "served_by",
        "timer",
    )
    # The timer that fires it; once it has fired, the timer a retry or
    # follow-up may re-arm (None: the backend needs none, or none was made).
    timer: Timer | None
    # What started the refresh this attempt belongs to (a retry's is its first
    # attempt's); None until the attempt starts. The rest is for the events.
    origin: events.Trigger | None
    served_by: events.ServedBy | None

    def __init__(
        self, generation: int, delay: float, due: float, deadline: float, reason: _Reason
    ) -> None:
        self.generation = generation
        self.delay = delay
        self.due = due  # wall time; the timer fires then, or at deadline if that comes first
        self.deadline = deadline  # monotonic
        self.reason = reason
        self.timer = None
        self.origin = None
        self.attempt = 1
        self.duration = 0.0  # seconds get_access_token ran
        self.served_by = None

    def release(self) -> None:
        """The chain ends here: free the timer it would have re-armed."""
        if self.timer is not None:
            self.timer.cancel()


class _Delivery:
    """An on_refresh call in progress for a session, and the result due after it."""

    __slots__ = ("generation", "next")

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.next: tuple[_Pending, str] | None = None


class _Outcome:
    """What a finished refresh did to its session, for _announce() to report."""

    __slots__ = (
        "current",
        "delivery",
        "error_type",
        "failures",
        "kind",
        "no_timer",
        "pending",
        "retry",
        "session_id",
        "stale_next",
        "token",
    )

    def __init__(
        self, session_id: str, pending: _Pending, token: str | None, error_type: str | None
    ) -> None:
        self.session_id, self.pending, self.token, self.error_type = (
            session_id,
            pending,
            token,
            error_type,
        )
        self.kind: Literal["stale", "gave up", "failed", "deliver", "handed"] = "stale"
        self.current: int | None = None
        self.failures = 0
        self.retry: _Pending | None = None
        self.delivery: _Delivery | None = None
        self.stale_next: tuple[_Pending, str] | None = None
        self.no_timer = False  # the retry's timer could not be started: the chain ended


class _SessionId:
    """A session id as logged: a fingerprint if it looks like a credential (formatted lazily)."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __str__(self) -> str:
        return fingerprint(self.value) if looks_like_credential(self.value) else self.value


def _seconds(value: object, name: str) -> float:
    """Validate a duration in seconds (a real number or a timedelta)."""
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    try:
        seconds = float(value)
    except OverflowError:
        raise ValueError(f"{name} is out of range") from None
    if not math.isfinite(seconds):
        raise ValueError(f"{name} must be finite, not {value!r}")
    return seconds


def _at_least_a_second(value: object, name: str) -> float:
    seconds = _seconds(value, name)
    if seconds < MIN_DELAY:
        raise ValueError(
            f"{name} must be at least {MIN_DELAY:g} second (a shorter one is a refresh loop), "
            f"not {seconds!r}"
        )
    return seconds


def _wait_limit(timeout: object, name: str = "timeout") -> float | None:
    """A wait's bound in seconds: None for ever (None, or too long for threading to wait)."""
    if timeout is None:
        return None
    if (
        isinstance(timeout, (int, float))
        and not isinstance(timeout, bool)
        and timeout > _LONGEST_WAIT
    ):
        return None  # infinity, or an int too large for a float, included
    seconds = _seconds(timeout, name)
    if seconds < 0:
        raise ValueError(f"{name} must not be negative, not {seconds!r}")
    return None if seconds > _LONGEST_WAIT else seconds


def _require_str(value: object, name: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")


class Scheduler:
    """Keeps session tokens fresh by refreshing each one before it expires.

    ``get_access_token()`` is called on a worker thread when a session's
    refresh falls due; a non-empty ``str`` it returns is delivered with
    ``on_refresh(session_id, token)``. Every method is thread-safe and may be
    called from inside either callback. No callback runs while the
    scheduler's lock is held; ``on_refresh`` calls for one session never
    overlap and never deliver an older generation after a newer one; once
    ``cancel``, ``cancel_all`` or ``close`` returns True (called from outside
    a callback), no ``on_refresh`` for the sessions it cancelled runs or starts.

    Keyword options (durations in seconds, or a ``timedelta``):

    - ``label``: starts every log line, ``[label:token]``, and names the threads.
    - ``refresh_buffer`` (300): how long before a token's expiry it is refreshed.
    - ``retry_delay`` (60): how long after a failed refresh it is retried.
    - ``follow_up_interval`` (1800): how long after a refresh the next one comes.
      It and ``retry_delay`` are at least 1 second: shorter would be a refresh loop.
    - ``expires_in_floor`` (30, at least 1): the least delay ``schedule_from_expires_in``
      waits.
    - ``fetch_timeout`` (60, None: never): how long a ``get_access_token`` call
      may run before it counts as a failure; its worker is replaced meanwhile.
    - ``max_workers`` (4): threads that run ``get_access_token`` and ``on_refresh``.
    - ``timers`` (``"thread"``): one timer thread per pending session; ``"heap"``:
      one thread for all of them, for thousands of sessions.
    - ``jitter`` (0) and ``rng``: refresh up to ``jitter`` earlier, at random.
    - ``on_event``: receives an :mod:`~token_refresh.events` record for every step.
    - ``clock``: a :class:`~token_refresh.testing.ManualClock`, in tests.

    In a child process after ``fork()``, the scheduler starts empty: the
    parent keeps refreshing the sessions it had.
    """

    def __init__(
        self,
        get_access_token: Callable[[], str | None],
        on_refresh: Callable[[str, str], None],
        *,
        label: str = "token_refresh",
        refresh_buffer: float | timedelta = REFRESH_BUFFER,
        clock: ManualClock | None = None,
        on_event: Callable[[events.Event], None] | None = None,
        retry_delay: float | timedelta = REFRESH_RETRY_DELAY,
        follow_up_interval: float | timedelta = FALLBACK_REFRESH_INTERVAL,
        expires_in_floor: float | timedelta = EXPIRES_IN_FLOOR,
        fetch_timeout: float | timedelta | None = FETCH_TIMEOUT,
        max_workers: int = 4,
        timers: Literal["thread", "heap"] = "thread",
        jitter: float | timedelta = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        if not callable(get_access_token):
            raise TypeError("get_access_token must be callable")
        if not callable(on_refresh):
            raise TypeError("on_refresh must be callable")
        if on_event is not None and not callable(on_event):
            raise TypeError("on_event must be callable or None")
        _require_str(label, "label")
        buffer = _seconds(refresh_buffer, "refresh_buffer")
        if buffer < 0:
            raise ValueError(f"refresh_buffer must not be negative, not {buffer!r}")
        retry = _at_least_a_second(retry_delay, "retry_delay")
        follow_up = _at_least_a_second(follow_up_interval, "follow_up_interval")
        floor = _at_least_a_second(expires_in_floor, "expires_in_floor")
        fetch_limit = _wait_limit(fetch_timeout, "fetch_timeout")
        if fetch_limit == 0:
            raise ValueError("fetch_timeout must be positive, or None for no limit")
        if isinstance(max_workers, bool) or not isinstance(max_workers, int):
            raise TypeError(f"max_workers must be an int, not {type(max_workers).__name__}")
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, not {max_workers}")
        if clock is not None and not isinstance(clock, ManualClock):
            raise TypeError(f"clock must be a ManualClock or None, not {type(clock).__name__}")
        if timers not in ("thread", "heap"):
            raise ValueError(f"timers must be 'thread' or 'heap', not {timers!r}")
        spread = _seconds(jitter, "jitter")
        if spread < 0:
            raise ValueError(f"jitter must not be negative, not {spread!r}")
        if rng is not None and not isinstance(rng, random.Random):
            raise TypeError(f"rng must be a random.Random or None, not {type(rng).__name__}")

        self._get_access_token = get_access_token
        self._on_refresh = on_refresh
        self._on_event = on_event
        self._label = label
        self._refresh_buffer = buffer
        self._retry_delay = retry
        self._follow_up_interval = follow_up
        self._expires_in_floor = floor
        self._fetch_timeout = fetch_limit
        self._jitter = spread
        self._rng = rng if rng is not None else random.Random()
        self._runtime: Runtime = (
            ManualRuntime(clock)
            if clock is not None
            else ThreadRuntime(f"token-refresh-{label}", timers=timers, max_workers=max_workers)
        )
        # Called with every event before on_event: token_refresh.otel's hook.
        self._observers: tuple[Callable[[events.Event], None], ...] = ()
        self._generation_counter = itertools.count(1)
        self._closed = False
        self._fork_dropped = 0
        self._reset_state()
        _live_schedulers.add(self)
        # Collected with no session left: stop the threads (a live session's
        # timer keeps the scheduler alive, as a threading.Timer would).
        weakref.finalize(self, self._runtime.close).atexit = False

    def _reset_state(self) -> None:
        """A fresh lock and empty maps: at construction, and in a forked child."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        # Notified whenever an on_refresh call ends or hands over to a newer one.
        self._delivered = threading.Condition(self._lock)
        # Generations come from one counter, so a freed session id that comes
        # back can never match a refresh still in flight from its past.
        self._generations: dict[str, int] = {}
        self._timers: dict[str, _Pending] = {}
        self._failures: dict[str, int] = {}
        self._delivering: dict[str, _Delivery] = {}
        self._in_callback = threading.local()
        self._counter_lock = threading.Lock()
        self._hung: dict[str, int] = {}  # session id -> its calls hung past fetch_timeout
        self._refreshes = self._failed_attempts = self._give_ups = 0
        self._running = self._stuck = 0

    def _reset_after_fork(self) -> None:
        """Forget the parent's sessions, threads and locks; no logging, no I/O (fork hook)."""
        self._fork_dropped = len(self._generations.keys() | self._timers.keys())
        self._runtime.after_fork()
        self._reset_state()

    # -- public API ---------------------------------------------------------

    def __repr__(self) -> str:
        return (
            f"Scheduler(label={self._label!r}, pending={len(self._timers)}, closed={self._closed})"
        )

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def label(self) -> str:
        """The label that starts every log line, ``[label:token]``."""
        return self._label

    @property
    def refresh_buffer(self) -> float:
        """Seconds before a token's expiry at which it is refreshed."""
        return self._refresh_buffer

    def next_refresh_at(self, session_id: str) -> float | None:
        """Wall time (Unix seconds) the session's next refresh comes; None if no timer.

        The earlier of its wall-clock due time and the end of its delay on the
        monotonic clock: after a step back of the wall clock, the latter. A
        time in the past (after a suspend or a step forward) means it comes now.
        """
        _require_str(session_id, "session_id")
        self.after_fork()
        with self._lock:
            pending = self._timers.get(session_id)
            return (
                None if pending is None else self._runtime.fires_at(pending.due, pending.deadline)
            )

    def sessions(self) -> frozenset[str]:
        """The sessions with a live refresh chain: a timer armed or a refresh running."""
        self.after_fork()
        with self._lock:
            return frozenset(self._generations)

    def stats(self) -> Stats:
        """Current sizes and lifetime counters, for a metrics exporter."""
        self.after_fork()
        with self._lock:
            return Stats(
                sessions=len(self._generations),
                pending=len(self._timers),
                refreshes=self._refreshes,
                failures=self._failed_attempts,
                give_ups=self._give_ups,
                running=self._running,  # counted under _counter_lock: a snapshot
                stuck=self._stuck,
            )

    def after_fork(self) -> None:
        """Make the scheduler usable in a forked child; a no-op in the process that made it.

        Runs by itself after ``os.fork()`` and at every call in a new process,
        so calling it from gunicorn's ``post_fork`` or uWSGI's ``@postfork``
        is optional but harmless. The child drops the sessions it inherited
        (the parent keeps refreshing them) and, at its first call, logs one
        WARNING saying how many.
        """
        if self._pid != os.getpid():
            with _fork_lock:
                if self._pid != os.getpid():  # else another thread of this child got here first
                    self._reset_after_fork()
        if self._fork_dropped:
            with self._lock:
                dropped, self._fork_dropped = self._fork_dropped, 0
            if dropped:  # pragma: no branch - else another thread reported it first
                self._say(
                    logging.WARNING,
                    "Forked: %d session(s) scheduled in the parent process are not refreshed "
                    "in this one (pid %d); schedule this process's own sessions",
                    dropped,
                    self._pid,
                )

    def schedule(self, session_id: str, token: str) -> None:
        """Refresh ``session_id`` ``refresh_buffer`` seconds before ``token``'s ``exp``.

        If that moment has passed, the refresh starts at once. A token with no
        usable ``exp`` (not a JWT, say) leaves the session's existing timer as
        it is.
        """
        _require_str(session_id, "session_id")
        _require_str(token, "token")
        self.after_fork()
        expiry = decode_jwt_expiry(token)
        if not expiry:  # as in the seed, an exp of 0 counts as missing too
            self._check_open()
            self._report(
                events.TimerKept,
                session_id,
                logging.DEBUG,
                "Could not decode JWT expiry for sessionId=%s, token %s, keeping existing timer",
                _SessionId(session_id),
                fingerprint(token),
                token_fingerprint=fingerprint(token),
            )
            return
        delay = expiry - self._runtime.time() - self._refresh_buffer
        if delay > 0:
            pending = self._replace(session_id, delay, "exp")
            self._report_scheduled(
                session_id,
                pending,
                "Scheduled token refresh for sessionId=%s in %s (expires=%s, buffer=%ss)",
                lambda: format_instant(expiry),
            )
            return
        pending = self._replace_for_immediate_refresh(session_id)
        self._report(
            events.Scheduled,
            session_id,
            logging.DEBUG,
            "Token for sessionId=%s expires=%s (past or within buffer), refreshing immediately",
            _SessionId(session_id),
            _Lazy(lambda: format_instant(expiry)),
            due=pending.due,
            delay=0.0,
            reason="exp",
        )
        self._start_refresh(session_id, pending)

    def schedule_from_expires_in(self, session_id: str, expires_in: float | timedelta) -> None:
        """Refresh ``session_id`` before a token that expires in ``expires_in`` seconds.

        The delay is ``expires_in - refresh_buffer``, but never under
        ``expires_in_floor`` (30 seconds); if that floor puts the refresh
        after the token's expiry, a WARNING says so (and the ``Scheduled``
        event's ``after_expiry``).
        """
        _require_str(session_id, "session_id")
        seconds = _seconds(expires_in, "expires_in")
        self.after_fork()
        delay = max(seconds - self._refresh_buffer, self._expires_in_floor)
        pending = self._replace(session_id, delay, "expires_in")
        self._report_scheduled(
            session_id,
            pending,
            "Scheduled token refresh for sessionId=%s in %s (expires_in=%ss, buffer=%ss)",
            lambda: format_seconds(seconds),
            late=delay - seconds,
        )

    def cancel(self, session_id: str, timeout: float | timedelta | None = None) -> bool:
        """Stop refreshing ``session_id`` and forget its state.

        A refresh in flight is dropped. Called from outside a callback, this
        waits up to ``timeout`` seconds (None: as long as it takes) for an
        ``on_refresh`` call already running for the session. Returns False if
        that call is still running (from inside a callback, it never waits).
        """
        _require_str(session_id, "session_id")
        limit = _wait_limit(timeout)
        self.after_fork()
        with self._lock:
            live = self._generations.pop(session_id, None) is not None
            self._failures.pop(session_id, None)
            pending = self._timers.pop(session_id, None)
            if pending is not None:
                pending.release()
            done = self._await_deliveries([session_id], limit)
        self._report_retry_dropped(session_id, pending)
        if live:
            self._report(events.Cancelled, session_id, logging.DEBUG, None)
        return done

    def cancel_all(self, timeout: float | timedelta | None = None) -> bool:
        """Cancel every session, as :meth:`cancel` does for one; False if an on_refresh runs on."""
        limit = _wait_limit(timeout)
        self.after_fork()
        with self._lock:
            cancelled, dropped = self._cancel_everything()
            done = self._await_deliveries(list(self._delivering), limit)
        self._report_cancelled(cancelled, dropped)
        return done

    def close(self, timeout: float | timedelta | None = None) -> bool:
        """Cancel every session and stop the scheduler's threads. Idempotent.

        Waits up to ``timeout`` seconds (None: as long as it takes) for refresh
        work already running, and for the scheduler's threads to end. Returns
        True if nothing of the scheduler is left running. Called from inside a
        callback, it does not wait (the caller is part of that work) and
        returns False.
        """
        limit = _wait_limit(timeout)
        self.after_fork()
        with self._lock:
            cancelled, dropped = ([], {}) if self._closed else self._cancel_everything()
            self._closed = True
        self._report_cancelled(cancelled, dropped)
        threads = self._runtime.close()
        if self._inside_callback():
            return False
        deadline = None if limit is None else time.monotonic() + limit

        def join(threads: list[threading.Thread]) -> list[threading.Thread]:
            for thread in threads:
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            return [thread for thread in threads if thread.is_alive()]

        # Workers first: a refresh finishing now may still have armed a timer.
        left = join(threads)
        return not (left + join(self._runtime.timer_threads()))

    # -- scheduling (under the lock) ----------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SchedulerClosedError(f"scheduler {self._label!r} is closed")

    def _pending(self, generation: int, delay: float, reason: _Reason) -> _Pending:
        if self._jitter:
            # Earlier, never later, and by at most half the delay, so a short
            # delay cannot collapse into a tight loop.
            delay -= self._rng.uniform(0.0, min(self._jitter, delay / 2))
        runtime = self._runtime
        return _Pending(
            generation, delay, runtime.time() + delay, runtime.monotonic() + delay, reason
        )

    def _firing(self, session_id: str, pending: _Pending) -> Callable[[], None]:
        """What the pending refresh's timer runs when it fires."""

        def fire() -> None:
            self._timer_fired(session_id, pending)

        return fire

    def _arm(self, session_id: str, pending: _Pending, reuse: Timer | None) -> None:
        """Arm the pending refresh's timer (lock held); runtime.start() must follow."""
        fire = self._firing(session_id, pending)
        pending.timer = self._runtime.arm(pending.delay, fire, reuse, pending.due)

    def _replace(self, session_id: str, delay: float, reason: _Reason) -> _Pending:
        """Give the session a new generation and timer; return the timer."""
        pending = self._pending(0, delay, reason)  # its generation is given under the lock

        # The thread backend's timer thread starts before the lock is taken (a
        # start waits for the new thread to get the GIL) and fires only once
        # published. If the OS refuses a thread, the session keeps what it had.
        try:
            prepared = self._runtime.prepare(
                pending.delay, self._firing(session_id, pending), pending.due
            )
            with self._lock:
                try:
                    self._check_open()
                    if prepared is None:
                        self._arm(session_id, pending, None)
                        assert pending.timer is not None
                        self._runtime.start(pending.timer)
                except BaseException:
                    if prepared is not None:
                        prepared.cancel()
                    raise
                if prepared is not None:
                    pending.timer = prepared
                    self._runtime.unhold(prepared)
                pending.generation = next(self._generation_counter)
                dropped = self._drop_timer(session_id)
                self._generations[session_id] = pending.generation
                self._timers[session_id] = pending
        except RuntimeError as error:
            if isinstance(error, SchedulerClosedError):
                raise
            raise RuntimeError(
                f"cannot arm a refresh timer for session {str(_SessionId(session_id))!r} "
                f"({error}); its existing timer is kept"
            ) from error
        self._report_retry_dropped(session_id, dropped)
        return pending

    def _replace_for_immediate_refresh(self, session_id: str) -> _Pending:
        """Give the session a new generation and no timer; return the refresh to start."""
        with self._lock:
            self._check_open()
            now, monotonic = self._runtime.time(), self._runtime.monotonic()
            pending = _Pending(next(self._generation_counter), 0.0, now, monotonic, "exp")
            pending.timer = self._runtime.reserve()
            dropped = self._drop_timer(session_id)
            self._generations[session_id] = pending.generation
        # A parked timer for the follow-up, started here rather than on a
        # worker, which must never wait for a thread to start.
        if pending.timer is not None:
            try:
                self._runtime.start(pending.timer)
            except RuntimeError:
                pending.timer = None  # the follow-up makes its own
        self._report_retry_dropped(session_id, dropped)
        return pending

    def _arm_next(
        self, session_id: str, fired: _Pending, delay: float, reason: _Reason
    ) -> _Pending | None:
        """Arm a retry or follow-up in the fired refresh's generation (lock held).

        It re-arms the fired refresh's timer where the backend can; the caller
        passes the result to _launch() as soon as the lock is released. There
        is no caller to raise to, so a refused timer (the OS out of threads)
        ends the chain: None, and the caller reports it.
        """
        pending = self._pending(fired.generation, delay, reason)
        if reason == "retry":
            pending.origin = fired.origin  # the same refresh, another attempt
            pending.attempt = fired.attempt + 1
        try:
            self._arm(session_id, pending, fired.timer)
        except RuntimeError:
            self._end_chain(session_id)
            return None
        self._timers[session_id] = pending
        return pending

    def _launch(
        self, session_id: str, fired: _Pending, pending: _Pending | None
    ) -> Literal["started", "ended", "gone"]:
        """Start what _arm_next() armed (lock released).

        "ended": no timer could be started and the chain ended here, for the
        caller to report with _report_no_timer() (no user code runs here: a
        watchdog calls it too); "gone": cancelled or replaced meanwhile.
        """
        if pending is None or pending.timer is not fired.timer:
            fired.release()  # not re-armed: its parked thread is not needed
        if pending is None:
            return "ended"
        assert pending.timer is not None
        try:
            self._runtime.start(pending.timer)
            return "started"
        except RuntimeError:
            with self._lock:
                ended = self._timers.get(session_id) is pending
                if ended:
                    self._end_chain(session_id)
            return "ended" if ended else "gone"  # gone: nothing was lost

    def _report_no_timer(self, session_id: str) -> None:
        self._report(
            events.GaveUp,
            session_id,
            logging.ERROR,
            "Could not start a timer thread; refresh chain for sessionId=%s stopped",
            _SessionId(session_id),
            failures=0,
        )

    def _end_chain(self, session_id: str) -> None:
        """Give up on the session's refresh chain (lock held); its failure count stays."""
        self._timers.pop(session_id, None)
        del self._generations[session_id]
        self._give_ups += 1

    def _drop_timer(self, session_id: str) -> _Pending | None:
        pending = self._timers.pop(session_id, None)
        if pending is not None:
            pending.release()
        return pending

    def _cancel_everything(self) -> tuple[list[str], dict[str, _Pending]]:
        """Cancel every session; return the ones that had a live chain, and the timers dropped."""
        cancelled, dropped = list(self._generations), self._timers
        for pending in dropped.values():
            pending.release()
        self._timers = {}
        self._generations.clear()
        self._failures.clear()
        return cancelled, dropped

    def _report_cancelled(self, cancelled: list[str], dropped: dict[str, _Pending]) -> None:
        for session_id in cancelled:
            self._report_retry_dropped(session_id, dropped.get(session_id))
            self._report(events.Cancelled, session_id, logging.DEBUG, None)

    def _await_deliveries(self, session_ids: list[str], limit: float | None) -> bool:
        """Wait (lock held) until the on_refresh calls now running for these sessions end.

        Never from inside a callback or anywhere else on the scheduler's own
        threads (a log handler there, say), which includes the thread that
        delivers: waiting on ourselves, or on a callback waiting on us,
        deadlocks. Returns False if one still runs.
        """
        running = {
            session_id: (delivery, delivery.generation)
            for session_id in session_ids
            if (delivery := self._delivering.get(session_id)) is not None
        }

        def done() -> bool:
            return all(
                self._delivering.get(session_id) is not delivery
                or delivery.generation != generation
                for session_id, (delivery, generation) in running.items()
            )

        if not running or self._inside_callback():
            return done()
        deadline = None if limit is None else time.monotonic() + limit
        while not done():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            self._delivered.wait(left)
        return True

    # -- callbacks, logs and events -----------------------------------------

    def _inside_callback(self) -> bool:
        return getattr(self._in_callback, "depth", 0) > 0

    @contextlib.contextmanager
    def _working(self) -> Iterator[None]:
        """Mark this thread as doing the scheduler's work, so nothing here waits for it."""
        self._in_callback.depth = getattr(self._in_callback, "depth", 0) + 1
        try:
            yield
        finally:
            self._in_callback.depth -= 1

    def _say(self, level: int, message: str, *args: object) -> None:
        """Log one line; a log handler that raises (BaseException too) cannot break a chain."""
        try:
            if _log.isEnabledFor(level):
                _log.log(level, "[%s:token] " + message, self._label, *args)
        except BaseException:  # nowhere left to report it
            pass

    def _report(
        self,
        kind: type[events.Event],
        session_id: str,
        level: int,
        message: str | None,
        *args: object,
        **fields: Any,
    ) -> None:
        """Turn one outcome into its log line and its event (lock not held); never raises."""
        if message is not None:
            self._say(level, message, *args)
        if not self._listening():
            return
        try:
            event = kind(
                session_id=session_id, label=self._label, time=self._runtime.time(), **fields
            )
            for observe in self._observers:
                try:
                    observe(event)
                except BaseException as error:  # a metrics backend's fault breaks nothing
                    self._say(logging.ERROR, "metrics observer raised %s", type(error).__name__)
            if self._on_event is not None:
                with self._working():
                    self._on_event(event)
        except BaseException as error:
            self._say(logging.ERROR, "on_event raised %s", type(error).__name__)

    def _listening(self) -> bool:
        """Whether anything receives events (else none is built)."""
        return self._on_event is not None or bool(self._observers)

    def _report_scheduled(
        self,
        session_id: str,
        pending: _Pending,
        message: str,
        detail: Callable[[], str],
        *,
        late: float = 0.0,
    ) -> None:
        """Report a refresh armed by schedule() or schedule_from_expires_in()."""
        self._report(
            events.Scheduled,
            session_id,
            logging.DEBUG,
            message,
            _SessionId(session_id),
            _Lazy(lambda: format_duration(pending.delay)),
            _Lazy(detail),
            _Lazy(lambda: format_seconds(self._refresh_buffer)),
            due=pending.due,
            delay=pending.delay,
            reason=pending.reason,
            after_expiry=late > 0,
        )
        if late > 0:
            self._say(
                logging.WARNING,
                "Refresh for sessionId=%s comes %s after its token expires "
                "(expires_in is under the %ss floor)",
                _SessionId(session_id),
                format_duration(late),
                format_seconds(self._expires_in_floor),
            )

    def _report_next(self, session_id: str, pending: _Pending) -> None:
        """Report the retry or follow-up that a refresh armed."""
        self._report(
            events.Scheduled,
            session_id,
            logging.DEBUG,
            "Scheduled follow-up refresh for sessionId=%s in %s"
            if pending.reason == "follow_up"
            else None,
            _SessionId(session_id),
            _Lazy(lambda: format_duration(pending.delay)),
            due=pending.due,
            delay=pending.delay,
            reason=pending.reason,
        )

    def _report_stale(self, session_id: str, pending: _Pending, current: int | None) -> None:
        self._report(
            events.StaleDropped,
            session_id,
            logging.DEBUG,
            "Refresh for sessionId=%s stale (gen %s vs %s), skipping",
            _SessionId(session_id),
            pending.generation,
            current,
            trigger=pending.origin or pending.reason,
            fetch_duration=pending.duration,
        )

    def _report_retry_dropped(self, session_id: str, dropped: _Pending | None) -> None:
        """Report a failed refresh whose retry a cancel or reschedule dropped: it ends here."""
        if dropped is not None and dropped.reason == "retry":
            self._report(
                events.RetryDropped,
                session_id,
                logging.DEBUG,
                None,
                trigger=dropped.origin or dropped.reason,
            )

    def _report_started(self, session_id: str, pending: _Pending, fired: bool) -> None:
        """Work out what started the attempt and how late (for the events), and report it."""
        if not self._listening():
            return  # no event to fill (a refresh's trigger then reads as its reason)
        runtime = self._runtime
        now, early = runtime.time(), pending.deadline - runtime.monotonic()
        due = runtime.fires_at(pending.due, pending.deadline) if fired else pending.due
        lateness = max(0.0, now - due)
        # Fired by wall time long before its monotonic deadline, and late: it fell
        # due while the machine slept (or the clock stepped past it).
        resumed = fired and early >= _RESUMED and lateness >= _RESUMED
        trigger: events.Trigger = "resume" if resumed else pending.reason
        if pending.origin is None:
            pending.origin = trigger
        self._report(
            events.RefreshStarted,
            session_id,
            logging.DEBUG,
            None,
            due=due,
            lateness=lateness,
            trigger=trigger,
            attempt=pending.attempt,
        )

    # -- refreshing ---------------------------------------------------------

    def _timer_fired(self, session_id: str, pending: _Pending) -> None:
        # No lock here: thousands of timer threads firing together would queue
        # on it. The worker checks that the refresh is still wanted.
        self._start_refresh(session_id, pending, fired=True)

    def _start_refresh(self, session_id: str, pending: _Pending, *, fired: bool = False) -> None:
        """Run the refresh on a worker (inline on a ManualClock); ``fired``: by its timer."""
        if not self._runtime.submit(lambda: self._refresh(session_id, pending, fired)):
            pending.release()
            self._say(
                logging.DEBUG,
                "Refresh for sessionId=%s dropped: shut down",
                _SessionId(session_id),
            )

    def _refresh(self, session_id: str, pending: _Pending, fired: bool) -> None:
        """A worker's job: call get_access_token, bounded by fetch_timeout, then complete."""
        with self._working():
            if fired:
                with self._lock:
                    fresh = self._timers.get(session_id) is pending
                    if fresh:
                        del self._timers[session_id]  # no longer pending: running
            else:
                # A read without the lock (one contended acquisition less per
                # refresh); _settle() checks again under it.
                fresh = self._generations.get(session_id) == pending.generation
            if not fresh:
                pending.release()  # cancelled or replaced before it started: never called
                return
            self._report_started(session_id, pending, fired)
            if session_id in self._hung:
                self._say(
                    logging.ERROR,
                    "get_access_token for sessionId=%s still runs from an earlier attempt; "
                    "not called again",
                    _SessionId(session_id),
                )
                self._complete(session_id, pending, None, "hung")
                return
            # Whoever acquires it first settles the attempt: this worker with a
            # result, or the watchdog with a timeout. The other does nothing.
            settled = threading.Lock()
            worker = threading.current_thread()

            def timed_out() -> None:
                if not settled.acquire(blocking=False):  # pragma: no cover - a narrow race
                    return  # the call returned just before its watch was cancelled
                self._count(stuck=1, hung=session_id)
                pending.duration = self._fetch_timeout or 0.0
                replaced = self._runtime.abandon(worker)  # a new worker serves the others
                # Settled here, on the watchdog's thread, so the retry is armed on
                # time even if every worker hangs; reported (user code: on_event,
                # log handlers) on a worker, so nothing can block the watchdog.
                outcome = self._settle(session_id, pending, None, "timeout")
                self._runtime.submit(lambda: self._announce_on_worker(outcome, replaced))

            watch = (
                None
                if self._fetch_timeout is None
                else self._runtime.watch(self._fetch_timeout, timed_out)
            )
            began = self._runtime.monotonic()
            try:
                with served_by_context() as served_by:
                    token, error_type, raised = self._fetch(session_id)
            finally:
                if watch is not None:
                    watch.cancel()
            if not settled.acquire(blocking=False):
                self._count(stuck=-1, hung=session_id)
                self._say(
                    logging.WARNING,
                    "get_access_token for sessionId=%s returned after fetch_timeout; "
                    "result dropped",
                    _SessionId(session_id),
                )
                return
            pending.duration = max(0.0, self._runtime.monotonic() - began)
            pending.served_by = served_by.value
            if raised:
                # A synchronous throw in the seed: handled before anything queued.
                self._complete(session_id, pending, token, error_type)
            else:
                self._runtime.then(lambda: self._complete(session_id, pending, token, error_type))

    def _announce_on_worker(self, outcome: _Outcome, replaced: bool) -> None:
        with self._working():
            if not replaced:
                self._say(
                    logging.WARNING,
                    "%d get_access_token calls are hung past fetch_timeout; no more "
                    "workers are added, so refreshes wait for one to return",
                    self._stuck,
                )
            self._announce(outcome)

    def _fetch(self, session_id: str) -> tuple[str | None, str | None, bool]:
        """Call get_access_token: the token (None if none), any error's type, and if it raised."""
        self._count(running=1)
        try:
            with session_context(session_id):
                token: object = self._get_access_token()
        except BaseException as error:
            # By type only: an exception's message may quote a token.
            self._say(
                logging.ERROR,
                "get_access_token raised %s for sessionId=%s",
                type(error).__name__,
                _SessionId(session_id),
            )
            return None, type(error).__name__, True
        finally:
            self._count(running=-1)
        if token is None or isinstance(token, str):
            return token or None, None, False
        self._say(
            logging.ERROR,
            "get_access_token returned %s, not a str or None, for sessionId=%s",
            type(token).__name__,
            _SessionId(session_id),
        )
        return None, type(token).__name__, False

    def _complete(
        self, session_id: str, pending: _Pending, token: str | None, error_type: str | None
    ) -> None:
        """Count a failure and arm its retry, or deliver the token (or hand it over)."""
        with self._working():
            self._announce(self._settle(session_id, pending, token, error_type))

    def _settle(
        self, session_id: str, pending: _Pending, token: str | None, error_type: str | None
    ) -> _Outcome:
        """Apply a refresh's result to the session's state; no user code runs here."""
        outcome = _Outcome(session_id, pending, token, error_type)
        armed = False
        with self._lock:
            outcome.current = self._generations.get(session_id)
            if outcome.current != pending.generation:
                outcome.kind = "stale"
            elif token is None:
                outcome.failures = self._failures.get(session_id, 0) + 1
                self._failures[session_id] = outcome.failures
                self._failed_attempts += 1
                if outcome.failures >= MAX_REFRESH_FAILURES:
                    self._end_chain(session_id)
                    outcome.kind = "gave up"
                else:
                    outcome.retry = self._arm_next(session_id, pending, self._retry_delay, "retry")
                    outcome.kind = "failed"
                    armed = True
            else:
                self._failures.pop(session_id, None)
                delivery = self._delivering.get(session_id)
                if delivery is None:
                    # Marked here, unmarked by _deliver()'s finally.
                    self._delivering[session_id] = outcome.delivery = _Delivery(pending.generation)
                    self._refreshes += 1
                    outcome.kind = "deliver"
                else:
                    # An older generation's on_refresh is running: its thread
                    # delivers this one next. No worker waits for it.
                    outcome.stale_next, delivery.next = delivery.next, (pending, token)
                    outcome.kind = "handed"
        launched = self._launch(session_id, pending, outcome.retry) if armed else "started"
        if launched != "started":
            outcome.retry, outcome.no_timer = None, launched == "ended"
        if outcome.kind in ("stale", "gave up"):
            pending.release()
        _release_handed(outcome.stale_next)
        return outcome

    def _announce(self, outcome: _Outcome) -> None:
        """Report what _settle() did, and deliver the token if it has one to deliver."""
        session_id, pending = outcome.session_id, outcome.pending
        if outcome.stale_next is not None:
            self._report_stale(session_id, outcome.stale_next[0], pending.generation)
        if outcome.kind == "stale":
            self._report_stale(session_id, pending, outcome.current)
            return
        if outcome.delivery is not None:
            assert outcome.token is not None
            self._deliver(session_id, outcome.delivery, pending, outcome.token)
            return
        if outcome.kind == "handed":
            return
        timed_out = outcome.error_type in ("timeout", "hung")
        if timed_out:
            self._say(
                logging.ERROR,
                "get_access_token timed out after %ss for sessionId=%s",
                _Lazy(lambda: format_seconds(self._fetch_timeout or 0)),
                _SessionId(session_id),
            )
        # A timeout is reported as RefreshTimedOut, a kind of RefreshFailed, instead of it.
        extra = {"timeout": self._fetch_timeout} if timed_out else {}
        self._report(
            events.RefreshTimedOut if timed_out else events.RefreshFailed,
            session_id,
            logging.ERROR,
            "No access token available for refresh, sessionId=%s (failure %s/%s)",
            _SessionId(session_id),
            outcome.failures,
            MAX_REFRESH_FAILURES,
            attempt=outcome.failures,
            max_attempts=MAX_REFRESH_FAILURES,
            error_type="TimeoutError" if timed_out else outcome.error_type,
            final=outcome.retry is None,
            called=outcome.error_type != "hung",
            trigger=pending.origin or pending.reason,
            fetch_duration=pending.duration,
            **extra,
        )
        if outcome.kind == "gave up":
            self._report(
                events.GaveUp,
                session_id,
                logging.ERROR,
                "Giving up on sessionId=%s after %s consecutive failures",
                _SessionId(session_id),
                outcome.failures,
                failures=outcome.failures,
            )
        elif outcome.no_timer:
            self._report_no_timer(session_id)
        elif outcome.retry is not None:
            self._report_next(session_id, outcome.retry)

    def _deliver(self, session_id: str, delivery: _Delivery, pending: _Pending, token: str) -> None:
        """Call on_refresh, then any newer result handed over meanwhile; arm the follow-up.

        ``delivery`` was marked by the caller; the ``finally`` unmarks it
        whatever on_refresh, on_event or a log handler raised.
        """
        finished = False
        try:
            while True:
                self._report(
                    events.Refreshed,
                    session_id,
                    logging.DEBUG,
                    "Refreshing token for sessionId=%s: new token %s",
                    _SessionId(session_id),
                    fingerprint(token),
                    token_fingerprint=fingerprint(token),
                    trigger=pending.origin or pending.reason,
                    attempts=pending.attempt,
                    fetch_duration=pending.duration,
                    expires_at=_expiry(token) if self._listening() else None,
                    served_by=pending.served_by,
                )
                self._call_on_refresh(session_id, token)
                follow_up = None
                armed = False
                dropped: list[tuple[_Pending, int | None]] = []
                with self._lock:
                    current = self._generations.get(session_id)
                    # A schedule() from inside on_refresh bumped the generation: its
                    # timer supersedes the follow-up, so none is armed (no orphan).
                    if current == pending.generation:
                        follow_up = self._arm_next(
                            session_id, pending, self._follow_up_interval, "follow_up"
                        )
                        armed = True
                    else:
                        dropped.append((pending, current))
                    handed, delivery.next = delivery.next, None
                    if handed is not None and handed[0].generation != current:
                        dropped.append((handed[0], current))
                        handed = None
                    if handed is None:
                        del self._delivering[session_id]
                        finished = True
                    else:
                        delivery.generation = handed[0].generation
                        self._refreshes += 1
                    self._delivered.notify_all()
                launched = self._launch(session_id, pending, follow_up) if armed else "gone"
                if launched == "started":
                    assert follow_up is not None
                    self._report_next(session_id, follow_up)
                elif launched == "ended":
                    self._report_no_timer(session_id)
                for stale, now in dropped:
                    stale.release()
                    if stale is not pending:
                        self._report_stale(session_id, stale, now)
                if handed is None:
                    return
                pending, token = handed
        finally:
            if not finished:  # left by an exception: unmark all the same
                with self._lock:
                    del self._delivering[session_id]
                    self._delivered.notify_all()
                _release_handed(delivery.next)

    def _count(self, *, running: int = 0, stuck: int = 0, hung: str | None = None) -> None:
        # Not the scheduler's lock: under contention every acquisition of it
        # costs a worker a GIL switch interval (5 ms).
        with self._counter_lock:
            self._running += running
            self._stuck += stuck
            if hung is not None:  # a session with a call hung past fetch_timeout
                left = self._hung.get(hung, 0) + stuck
                if left:
                    self._hung[hung] = left
                else:
                    del self._hung[hung]

    def _call_on_refresh(self, session_id: str, token: str) -> None:
        self._count(running=1)
        try:
            with self._working():
                self._on_refresh(session_id, token)
        except BaseException as error:
            self._report(
                events.CallbackError,
                session_id,
                logging.ERROR,
                "on_refresh raised %s for sessionId=%s",
                type(error).__name__,
                _SessionId(session_id),
                error_type=type(error).__name__,
            )
        finally:
            self._count(running=-1)


def _expiry(token: str) -> float | None:
    """A JWT's ``exp`` as a float, for Refreshed.expires_at; None if it has none."""
    expiry = decode_jwt_expiry(token)
    return float(expiry) if expiry else None


def _release_handed(handed: tuple[_Pending, str] | None) -> None:
    """Free the timer of a result handed to a delivery that will not deliver it."""
    if handed is not None:
        handed[0].release()


class _Lazy:
    """A log argument computed only if the line is written."""

    __slots__ = ("compute",)

    def __init__(self, compute: Callable[[], object]) -> None:
        self.compute = compute

    def __str__(self) -> str:
        return str(self.compute())


def _after_fork_in_child() -> None:  # pragma: no cover - runs in children (TestFork)
    """Only re-initialise: no logging, no I/O, no lock this module did not create."""
    global _fork_lock
    _fork_lock = threading.Lock()
    for scheduler in list(_live_schedulers):
        scheduler._reset_after_fork()


_fork_lock = threading.Lock()
if hasattr(os, "register_at_fork"):  # pragma: no branch - not on Windows, which cannot fork
    os.register_at_fork(after_in_child=_after_fork_in_child)
