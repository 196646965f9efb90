"""The scheduler: one timer per session, refresh work on a small thread pool."""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Any, Literal

from . import events
from ._context import session_context
from ._format import fingerprint, format_duration, format_instant, format_seconds
from ._jwt import decode_jwt_expiry
from ._timers import Cancellable, HeapTimers, ThreadTimers, Timers
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
#: Floor, in seconds, for delays computed from ``expires_in``.
EXPIRES_IN_FLOOR = 30.0

# threading.Timer raises OverflowError past TIMEOUT_MAX; longer delays are
# armed in steps of at most this much, so a far-future token never fires early.
_MAX_TIMER_DELAY = float(threading.TIMEOUT_MAX)

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


class _Pending:
    """A session's armed timer, bound to the generation that armed it."""

    __slots__ = ("deadline", "delay", "due", "generation", "handle", "reason")
    handle: Cancellable  # set by Scheduler._arm, before the entry is stored

    def __init__(
        self, generation: int, delay: float, deadline: float, due: float, reason: _Reason
    ) -> None:
        self.generation = generation
        self.delay = delay
        self.deadline = deadline  # on the timers' monotonic clock
        self.due = due  # wall time, for people
        self.reason = reason


_Reason = Literal["exp", "expires_in", "retry", "follow_up"]
_TIMER_BACKENDS: dict[str, type[ThreadTimers] | type[HeapTimers]] = {
    "thread": ThreadTimers,
    "heap": HeapTimers,
}


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
    ``cancel``, ``cancel_all`` or ``close`` returns (called from outside a
    callback), no ``on_refresh`` for the sessions it cancelled runs or starts.

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
        retry = _seconds(retry_delay, "retry_delay")
        follow_up = _seconds(follow_up_interval, "follow_up_interval")
        if retry <= 0 or follow_up <= 0:
            raise ValueError("retry_delay and follow_up_interval must be positive")
        if isinstance(max_workers, bool) or not isinstance(max_workers, int):
            raise TypeError(f"max_workers must be an int, not {type(max_workers).__name__}")
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, not {max_workers}")
        if clock is not None and not isinstance(clock, ManualClock):
            raise TypeError(f"clock must be a ManualClock or None, not {type(clock).__name__}")
        if timers not in _TIMER_BACKENDS:
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
        self._max_workers = max_workers
        self._timer_kind = _TIMER_BACKENDS[timers]
        self._jitter = spread
        self._rng = rng if rng is not None else random.Random()
        self._thread_name = f"token-refresh-{label}"
        self._manual = clock
        self._wall_time: Callable[[], float] = time.time if clock is None else clock.time
        self._generation_counter = itertools.count(1)
        self._closed = False
        self._reset_state()
        _live_schedulers.add(self)

    def _reset_state(self) -> None:
        """Fresh lock, maps and threads: at construction, and in a forked child."""
        self._pid = os.getpid()
        self._thread_timers: ThreadTimers | HeapTimers | None = None
        self._timer_backend: Timers
        if self._manual is None:
            self._thread_timers = self._timer_backend = self._timer_kind(self._thread_name)
        else:
            self._timer_backend = self._manual
        self._lock = threading.Lock()
        # Notified whenever an on_refresh call finishes.
        self._delivered = threading.Condition(self._lock)
        # Generations come from one counter, so a freed session id that comes
        # back can never match a refresh still in flight from its past.
        self._generations: dict[str, int] = {}
        self._timers: dict[str, _Pending] = {}
        self._failures: dict[str, int] = {}
        self._delivering: dict[str, int] = {}  # session id -> generation
        self._executor: ThreadPoolExecutor | None = None
        self._stopping: list[threading.Thread] = []  # what close() waits for
        self._in_callback = threading.local()
        self._refreshes = self._failed_attempts = self._give_ups = 0

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
        """Wall time (Unix seconds) the session's next refresh is due; None if no timer."""
        _require_str(session_id, "session_id")
        self.after_fork()
        with self._lock:
            pending = self._timers.get(session_id)
            return None if pending is None else pending.due

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
            )

    def after_fork(self) -> None:
        """Make the scheduler usable in a forked child; a no-op in the process that made it.

        Runs by itself after ``os.fork()`` and at every call in a new process,
        so calling it from gunicorn's ``post_fork`` or uWSGI's ``@postfork``
        is optional but harmless. The child drops the sessions it inherited
        (the parent keeps refreshing them) and logs one WARNING saying how many.
        """
        if self._pid == os.getpid():
            return
        with _fork_lock:
            if self._pid == os.getpid():
                return  # another thread of this child got here first
            dropped = len(self._generations.keys() | self._timers.keys())
            # The parent's lock may be held by a thread that does not exist
            # here, its timers never fire and its executor never runs work.
            self._reset_state()
        if dropped:
            _log.warning(
                "[%s:token] Forked: %d session(s) scheduled in the parent process are not "
                "refreshed in this one (pid %d); schedule this process's own sessions",
                self._label,
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
            _log.debug(
                "[%s:token] Could not decode JWT expiry for sessionId=%s, token %s, "
                "keeping existing timer",
                self._label,
                session_id,
                fingerprint(token),
            )
            self._emit(events.TimerKept, session_id, token_fingerprint=fingerprint(token))
            return
        delay = expiry - self._wall_time() - self._refresh_buffer
        if delay > 0:
            pending = self._replace(session_id, delay, "exp")
            if _log.isEnabledFor(logging.DEBUG):  # formatting costs as much as scheduling
                _log.debug(
                    "[%s:token] Scheduled token refresh for sessionId=%s in %s "
                    "(expires=%s, buffer=%ss)",
                    self._label,
                    session_id,
                    format_duration(pending.delay),
                    format_instant(expiry),
                    format_seconds(self._refresh_buffer),
                )
            self._emit_scheduled(session_id, pending)
            return
        generation, executor = self._replace_for_immediate_refresh(session_id)
        _log.debug(
            "[%s:token] Token for sessionId=%s expires=%s (past or within buffer), "
            "refreshing immediately",
            self._label,
            session_id,
            format_instant(expiry),
        )
        self._emit(events.Scheduled, session_id, due=self._wall_time(), delay=0.0, reason="exp")
        self._start_refresh(session_id, generation, executor)

    def schedule_from_expires_in(self, session_id: str, expires_in: float | timedelta) -> None:
        """Refresh ``session_id`` before a token that expires in ``expires_in`` seconds.

        The delay is ``expires_in - refresh_buffer``, but never under 30 seconds.
        """
        _require_str(session_id, "session_id")
        seconds = _seconds(expires_in, "expires_in")
        self.after_fork()
        delay = max(seconds - self._refresh_buffer, EXPIRES_IN_FLOOR)
        pending = self._replace(session_id, delay, "expires_in")
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug(
                "[%s:token] Scheduled token refresh for sessionId=%s in %s "
                "(expires_in=%ss, buffer=%ss)",
                self._label,
                session_id,
                format_duration(pending.delay),
                format_seconds(seconds),
                format_seconds(self._refresh_buffer),
            )
        self._emit_scheduled(session_id, pending)

    def cancel(self, session_id: str) -> None:
        """Stop refreshing ``session_id`` and forget its state.

        A refresh in flight is dropped. Called from outside a callback, this
        waits for an ``on_refresh`` call already running for the session.
        """
        _require_str(session_id, "session_id")
        self.after_fork()
        with self._lock:
            live = self._generations.pop(session_id, None) is not None
            self._failures.pop(session_id, None)
            pending = self._timers.pop(session_id, None)
            if pending is not None:
                pending.handle.cancel()
            self._await_deliveries({session_id: self._delivering.get(session_id)})
        if live:
            self._emit(events.Cancelled, session_id)

    def cancel_all(self) -> None:
        """Cancel every session, as :meth:`cancel` does for one."""
        self.after_fork()
        with self._lock:
            cancelled = self._cancel_everything()
            self._await_deliveries(dict(self._delivering))
        for session_id in cancelled:
            self._emit(events.Cancelled, session_id)

    def close(self, timeout: float | None = None) -> bool:
        """Cancel every session and stop the scheduler's threads. Idempotent.

        Waits up to ``timeout`` seconds (None: as long as it takes) for refresh
        work already running, and for the scheduler's threads to end. Returns
        True if nothing of the scheduler is left running. Called from inside a
        callback, it does not wait (the caller is part of that work) and
        returns False.
        """
        limit = None if timeout is None else _seconds(timeout, "timeout")
        self.after_fork()
        with self._lock:
            cancelled = [] if self._closed else self._cancel_everything()
            self._closed = True
            executor, self._executor = self._executor, None
        for session_id in cancelled:
            self._emit(events.Cancelled, session_id)
        if self._thread_timers is not None:
            self._thread_timers.stop()
        if executor is not None:
            # Queued refreshes are cancelled now; a thread waits out the running
            # ones, so that close() can wait with a timeout (or not at all).
            executor.shutdown(wait=False, cancel_futures=True)
            stopper = threading.Thread(
                target=executor.shutdown, name=f"{self._thread_name}-close", daemon=True
            )
            stopper.start()
            with self._lock:
                self._stopping.append(stopper)
        if self._inside_callback():
            return False
        deadline = None if limit is None else time.monotonic() + max(0.0, limit)

        def join(threads: list[threading.Thread]) -> list[threading.Thread]:
            for thread in threads:
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            return [thread for thread in threads if thread.is_alive()]

        with self._lock:
            stopping = list(self._stopping)
        # Workers first: a refresh finishing now may still start a timer thread.
        left = join(stopping)
        with self._lock:
            self._stopping = left
        if self._thread_timers is not None:
            left += join(self._thread_timers.stop())
        return not left

    # -- scheduling (all under the lock) ------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SchedulerClosedError(f"scheduler {self._label!r} is closed")

    def _replace(self, session_id: str, delay: float, reason: _Reason) -> _Pending:
        """Give the session a new generation and timer; return the timer."""
        with self._lock:
            self._check_open()
            pending = self._pending(next(self._generation_counter), delay, reason)
            try:
                # Arm the new timer before touching anything: if the OS
                # refuses a thread, the session keeps the timer it had.
                self._arm(session_id, pending)
            except RuntimeError as error:
                raise RuntimeError(
                    f"cannot arm a refresh timer for session {session_id!r} ({error}); "
                    "its existing timer is kept"
                ) from error
            self._drop_timer(session_id)
            self._generations[session_id] = pending.generation
            self._timers[session_id] = pending
            return pending

    def _replace_for_immediate_refresh(
        self, session_id: str
    ) -> tuple[int, ThreadPoolExecutor | None]:
        """Give the session a new generation and no timer; return a worker to refresh on."""
        with self._lock:
            self._check_open()
            generation = next(self._generation_counter)
            self._drop_timer(session_id)
            self._generations[session_id] = generation
            return generation, self._worker_pool()

    def _pending(self, generation: int, delay: float, reason: _Reason) -> _Pending:
        if self._jitter:
            # Earlier, never later, and by at most half the delay, so a short
            # delay cannot collapse into a tight loop.
            delay -= self._rng.uniform(0.0, min(self._jitter, delay / 2))
        deadline = self._timer_backend.monotonic() + delay
        return _Pending(generation, delay, deadline, self._wall_time() + delay, reason)

    def _arm(self, session_id: str, pending: _Pending, *, start: bool = True) -> None:
        """Arm the pending timer (lock held); ``start=False`` leaves a thread to _launch()."""
        delay = min(pending.deadline - self._timer_backend.monotonic(), _MAX_TIMER_DELAY)

        def fire() -> None:
            self._timer_fired(session_id, pending)

        if isinstance(self._thread_timers, ThreadTimers):
            pending.handle = self._thread_timers.call_later(delay, fire, start=start)
        else:
            pending.handle = self._timer_backend.call_later(delay, fire)

    def _arm_next(
        self, session_id: str, generation: int, delay: float, reason: _Reason
    ) -> _Pending | None:
        """Arm a retry or follow-up timer in the current generation; None if refused.

        The caller starts it with _launch() once the lock is released: a thread
        started under the lock stalls every timer thread queued behind it, and
        thousands fall due together at scale. There is no caller to raise to
        here, so a refused timer (the OS out of threads) ends the session's
        chain, and the caller reports it.
        """
        pending = self._pending(generation, delay, reason)
        try:
            self._arm(session_id, pending, start=False)
        except RuntimeError:
            self._end_chain(session_id)
            return None
        self._timers[session_id] = pending
        return pending

    def _end_chain(self, session_id: str) -> None:
        """Give up on the session's refresh chain (lock held); its failure count stays."""
        self._timers.pop(session_id, None)
        del self._generations[session_id]
        self._give_ups += 1

    def _launch(self, session_id: str, pending: _Pending) -> bool:
        """Start a timer thread that _arm_next() left unstarted; False if the chain ended."""
        if not isinstance(self._thread_timers, ThreadTimers):
            return True  # armed already
        assert isinstance(pending.handle, threading.Timer)
        try:
            self._thread_timers.start(pending.handle)
        except RuntimeError:
            with self._lock:
                ended = self._timers.get(session_id) is pending
                if ended:
                    self._end_chain(session_id)
            return not ended
        return True

    def _drop_timer(self, session_id: str) -> None:
        pending = self._timers.pop(session_id, None)
        if pending is not None:
            pending.handle.cancel()

    def _cancel_everything(self) -> list[str]:
        """Cancel every session; return the ones that had a live chain."""
        cancelled = list(self._generations)
        for pending in self._timers.values():
            pending.handle.cancel()
        self._timers.clear()
        self._generations.clear()
        self._failures.clear()
        return cancelled

    def _await_deliveries(self, deliveries: dict[str, int | None]) -> None:
        """Wait (lock held) until the given on_refresh calls have returned."""
        if self._inside_callback():
            return  # waiting on ourselves, or on a callback waiting on us, deadlocks
        while any(
            generation is not None and self._delivering.get(session_id) == generation
            for session_id, generation in deliveries.items()
        ):
            self._delivered.wait()

    def _inside_callback(self) -> bool:
        return getattr(self._in_callback, "depth", 0) > 0

    def _call_user(self, callback: Callable[[], object]) -> object:
        """Run a user callback, marking this thread as inside one (they can nest)."""
        self._in_callback.depth = getattr(self._in_callback, "depth", 0) + 1
        try:
            return callback()
        finally:
            self._in_callback.depth -= 1

    def _emit(self, kind: type[events.Event], session_id: str, **fields: Any) -> None:
        """Build and send one event to on_event, if there is one (lock not held)."""
        if self._on_event is None:
            return
        event = kind(session_id=session_id, label=self._label, time=self._wall_time(), **fields)
        on_event = self._on_event
        try:
            self._call_user(lambda: on_event(event))
        except Exception as error:
            _log.error("[%s:token] on_event raised %s", self._label, type(error).__name__)

    def _report_chain_broken(self, session_id: str) -> None:
        _log.error(
            "[%s:token] Could not start a timer thread; refresh chain for sessionId=%s stopped",
            self._label,
            session_id,
        )
        self._emit(events.GaveUp, session_id, failures=0)

    def _emit_scheduled(self, session_id: str, pending: _Pending) -> None:
        self._emit(
            events.Scheduled,
            session_id,
            due=pending.due,
            delay=pending.delay,
            reason=pending.reason,
        )

    def _report_scheduled(self, session_id: str, pending: _Pending) -> None:
        """Report the retry or follow-up timer a refresh just armed."""
        if pending.reason == "follow_up":
            _log.debug(
                "[%s:token] Scheduled follow-up refresh for sessionId=%s in %s",
                self._label,
                session_id,
                format_duration(pending.delay),
            )
        self._emit_scheduled(session_id, pending)

    # -- refreshing ---------------------------------------------------------

    def _timer_fired(self, session_id: str, pending: _Pending) -> None:
        with self._lock:
            if self._timers.get(session_id) is not pending:
                return  # cancelled or replaced after Timer.cancel() could stop it
            if pending.deadline > self._timer_backend.monotonic():
                self._arm(session_id, pending)  # a delay longer than one timer holds
                return
            del self._timers[session_id]
            executor = self._worker_pool()
        self._start_refresh(session_id, pending.generation, executor)

    def _worker_pool(self) -> ThreadPoolExecutor | None:
        """The executor (created on first use, lock held); None on a ManualClock."""
        if self._manual is None and self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=self._max_workers, thread_name_prefix=self._thread_name
            )
        return self._executor

    def _start_refresh(
        self, session_id: str, generation: int, executor: ThreadPoolExecutor | None
    ) -> None:
        """Run the refresh on a worker (or inline on a ManualClock)."""
        if self._manual is not None:
            # get_access_token runs at once, as the seed calls it before its
            # first await; what the refresh queues runs after it returns.
            self._manual.run_now(lambda: self._refresh(session_id, generation))
            return
        assert executor is not None
        try:
            executor.submit(self._refresh, session_id, generation)
        except RuntimeError:
            # close() (or interpreter shutdown) got there first; the session is gone.
            _log.debug(
                "[%s:token] Refresh for sessionId=%s dropped: shut down", self._label, session_id
            )

    def _refresh(self, session_id: str, generation: int) -> None:
        self._emit(events.RefreshStarted, session_id)
        token, error_type = self._fetch(session_id)
        if self._manual is not None:
            # The seed awaits get_access_token: the rest runs as a microtask.
            self._manual.run_soon(lambda: self._complete(session_id, generation, token, error_type))
        else:
            self._complete(session_id, generation, token, error_type)

    def _fetch(self, session_id: str) -> tuple[str | None, str | None]:
        """Call get_access_token; return the token (None if none) and any error's type."""
        try:
            with session_context(session_id):  # current_session_id() inside get_access_token
                token = self._call_user(self._get_access_token)
        except Exception as error:
            # By type only: an exception's message may quote a token.
            _log.error(
                "[%s:token] get_access_token raised %s for sessionId=%s",
                self._label,
                type(error).__name__,
                session_id,
            )
            return None, type(error).__name__
        if token is None or isinstance(token, str):
            return token or None, None
        _log.error(
            "[%s:token] get_access_token returned %s, not a str or None, for sessionId=%s",
            self._label,
            type(token).__name__,
            session_id,
        )
        return None, type(token).__name__

    def _complete(
        self, session_id: str, generation: int, token: str | None, error_type: str | None
    ) -> None:
        retry: _Pending | None = None
        with self._lock:
            # Wait out an earlier generation's on_refresh, so deliveries for one
            # session never overlap; then drop this one if it went stale meanwhile.
            while (current := self._generations.get(session_id)) == generation and (
                session_id in self._delivering
            ):
                self._delivered.wait()
            if current != generation:
                outcome = "stale"
            elif token is None:
                failures = self._failures.get(session_id, 0) + 1
                self._failures[session_id] = failures
                self._failed_attempts += 1
                if failures >= MAX_REFRESH_FAILURES:
                    self._end_chain(session_id)
                    outcome = "gave up"
                else:
                    retry = self._arm_next(session_id, generation, self._retry_delay, "retry")
                    outcome = "failed"
            else:
                self._failures.pop(session_id, None)
                self._delivering[session_id] = generation
                self._refreshes += 1
                outcome = "deliver"
        if outcome == "stale":
            _log.debug(
                "[%s:token] Refresh for sessionId=%s stale (gen %s vs %s), skipping",
                self._label,
                session_id,
                generation,
                current,
            )
            self._emit(events.StaleDropped, session_id)
            return
        if token is not None:
            self._deliver(session_id, generation, token)
            return
        _log.error(
            "[%s:token] No access token available for refresh, sessionId=%s (failure %s/%s)",
            self._label,
            session_id,
            failures,
            MAX_REFRESH_FAILURES,
        )
        self._emit(
            events.RefreshFailed,
            session_id,
            attempt=failures,
            max_attempts=MAX_REFRESH_FAILURES,
            error_type=error_type,
        )
        if outcome == "gave up":
            _log.error(
                "[%s:token] Giving up on sessionId=%s after %s consecutive failures",
                self._label,
                session_id,
                failures,
            )
            self._emit(events.GaveUp, session_id, failures=failures)
        elif retry is not None and self._launch(session_id, retry):
            self._report_scheduled(session_id, retry)
        else:
            self._report_chain_broken(session_id)

    def _deliver(self, session_id: str, generation: int, token: str) -> None:
        _log.debug(
            "[%s:token] Refreshing token for sessionId=%s: new token %s",
            self._label,
            session_id,
            fingerprint(token),
        )
        self._emit(events.Refreshed, session_id, token_fingerprint=fingerprint(token))
        try:
            self._call_user(lambda: self._on_refresh(session_id, token))
        except Exception as error:
            _log.error(
                "[%s:token] on_refresh raised %s for sessionId=%s",
                self._label,
                type(error).__name__,
                session_id,
            )
            self._emit(events.CallbackError, session_id, error_type=type(error).__name__)
        finally:
            with self._lock:
                del self._delivering[session_id]
                self._delivered.notify_all()
                # A schedule() from inside on_refresh bumped the generation: its
                # timer supersedes the follow-up, so none is armed (no orphan).
                current = self._generations.get(session_id) == generation
                follow_up = (
                    self._arm_next(session_id, generation, self._follow_up_interval, "follow_up")
                    if current
                    else None
                )
        if follow_up is not None and self._launch(session_id, follow_up):
            self._report_scheduled(session_id, follow_up)
        elif current:
            self._report_chain_broken(session_id)


def _after_fork_in_child() -> None:  # pragma: no cover - runs in children (TestFork)
    global _fork_lock
    _fork_lock = threading.Lock()
    for scheduler in list(_live_schedulers):
        scheduler.after_fork()


_fork_lock = threading.Lock()
os.register_at_fork(after_in_child=_after_fork_in_child)
