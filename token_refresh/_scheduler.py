"""The scheduler: a thin driver of the state machine in ``_machine.py``.

Under its lock it asks the machine what an input does, sets the alarm the
step arms and commits it; after releasing the lock it carries the step out:
starts a fetch on a worker, delivers a token, reports an outcome.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Any, Literal

from . import events
from ._context import ServedBySlot, call_as_refresh, current_session_id, served_so_far
from ._expiry import SKEW_THRESHOLD, SkewTracker, claims, local_exp, received_skew
from ._format import fingerprint, session_label
from ._machine import (
    MAX_REFRESH_FAILURES,
    Attempt,
    Deliver,
    Fetch,
    Machine,
    Report,
    Session,
    Step,
)
from ._report import Reporter
from ._retry import RetryPolicy, Verdict, checked
from ._runtime import JUMP, Alarm, Runtime, ThreadRuntime, reaper
from ._validate import at_least, count, require_str, seconds, wait_limit
from .testing import ManualClock, ManualRuntime

__all__ = ["MAX_REFRESH_FAILURES", "Scheduler", "SchedulerClosedError", "Stats"]

#: Seconds before expiry at which a token is refreshed.
REFRESH_BUFFER = 300.0
#: Seconds until the follow-up refresh after a successful one.
FALLBACK_REFRESH_INTERVAL = 1800.0
#: Seconds until a failed refresh is retried.
REFRESH_RETRY_DELAY = 60.0
#: Floor, in seconds, for delays computed from ``expires_in`` (``expires_in_floor``).
EXPIRES_IN_FLOOR = 30.0
#: The least ``retry_delay``, ``follow_up_interval`` and ``expires_in_floor``:
#: anything shorter would be a refresh loop against the token server.
MIN_DELAY = 1.0
#: Seconds a get_access_token call may run before it counts as a failure: longer
#: than a SharedToken waits by default (its lease_ttl, 30, plus 5).
FETCH_TIMEOUT = 60.0

# A timer that fires this many seconds or more before its monotonic deadline,
# and as late by wall time, fell due while the machine slept (or the clock
# stepped past it): its trigger is "resume".
_RESUMED = 1.0
_LOOP = "a shorter one is a refresh loop"

# Live schedulers, for the at-fork hook and the reaper.
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


class _State:
    """Everything a fork replaces: the lock, the machine, the counters.

    A thread that forked inside a callback carries on with the state it
    started with, so its bookkeeping never lands on the child's fresh one.
    """

    def __init__(self, machine: Machine) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        # Notified whenever an on_refresh call ends or hands over to a newer one.
        self.delivered = threading.Condition(self.lock)
        self.machine = machine
        self.local = threading.local()  # .depth: scheduler work on this thread
        self._working = _Working(self.local)
        self.counter_lock = threading.Lock()
        self.running = self.stuck = 0
        self.hung: dict[str, int] = {}  # session id -> its calls hung past fetch_timeout

    def inside(self) -> bool:
        """Whether this thread is doing the scheduler's work (a callback, a log handler)."""
        return getattr(self.local, "depth", 0) > 0

    def working(self) -> contextlib.AbstractContextManager[None]:
        """Mark this thread as doing the scheduler's work, so nothing here waits for it."""
        return self._working

    def count(self, *, running: int = 0, stuck: int = 0, hung: str | None = None) -> None:
        # Not the scheduler's lock: under contention every acquisition of it
        # costs a worker a GIL switch interval (5 ms).
        with self.counter_lock:
            self.running += running
            self.stuck += stuck
            if hung is not None:  # a session with a call hung past fetch_timeout
                left = self.hung.get(hung, 0) + stuck
                if left:
                    self.hung[hung] = left
                else:
                    del self.hung[hung]

    def apply(self, step: Step, *, refuse: bool = False) -> Step:
        """Set the alarm ``step`` arms, then commit it (lock held).

        A refused alarm (the OS out of threads) raises if ``refuse``, leaving
        everything as it was; otherwise the chain ends there. Whatever raises,
        the alarm keeps what the machine holds.
        """
        machine = self.machine
        before = machine.sessions.get(step.session_id)
        try:
            step = self._arm(step, refuse)
            if step.release is not None:
                step.release.disarm()  # undone below if the step is not stored
            machine.commit(step)
        except BaseException:
            stored = machine.sessions.get(step.session_id) is not before
            if not stored and before is not None and before.armed is not None:
                _set_for(before.alarm, before.armed)  # what it was set for before
            raise
        # Stored: an alarm no session needs ends (cancel_all() sweeps any an
        # exception right here leaves behind).
        if step.release is not None:
            step.release.cancel()
        if step.notify:
            self.delivered.notify_all()
        return step

    def free_by(self, deadline: float | None, threaded: bool) -> bool:
        """Whether the lock is free by ``deadline``; False if an interrupted frame holds it.

        A signal handler runs on the main thread between any two bytecodes,
        perhaps while that thread holds this lock: a bounded try returns
        instead of deadlocking, and the caller leaves its work to the reaper's
        thread. Taken and given back at once: the caller then holds it in a
        ``with`` block, whose release nothing can skip. (A ManualClock's
        scheduler has no other thread: it just waits.)
        """
        if deadline is None or not threaded:
            return True
        if not self.lock.acquire(timeout=_left(deadline) or 0.0):
            return False
        self.lock.release()
        return True

    def _arm(self, step: Step, refuse: bool) -> Step:
        """Set the alarm ``step`` arms; if it is refused, the chain ends there (or raise)."""
        if step.arm is None:
            return step
        try:
            _set(step)
        except RuntimeError:
            if refuse:
                raise
            return self.machine.alarm_refused(step)
        return step

    def await_deliveries(self, session_ids: list[str], limit: float | None) -> bool:
        """Wait (lock held) until the on_refresh calls now running for these sessions end.

        Never from inside a callback or anywhere else on the scheduler's own
        threads (a log handler there, say), which includes the thread that
        delivers: waiting on ourselves, or on a callback waiting on us,
        deadlocks. Returns False if one still runs.
        """
        deliveries = self.machine.deliveries
        if not deliveries:
            return True  # none runs (most calls): nothing to build
        running = {
            session_id: delivery
            for session_id in session_ids
            if (delivery := deliveries.get(session_id)) is not None
        }
        if not running:
            return True

        def done() -> bool:
            return all(
                (now := deliveries.get(session_id)) is None or now.generation != was.generation
                for session_id, was in running.items()
            )

        if self.inside():
            return done()
        return self.delivered.wait_for(done, limit)


class _Working:
    """``with``: this thread does a scheduler's work (a class, not a generator: a storm
    of refreshes enters it several times each)."""

    __slots__ = ("_local",)

    def __init__(self, local: threading.local) -> None:
        self._local = local

    def __enter__(self) -> None:
        self._local.depth = getattr(self._local, "depth", 0) + 1

    def __exit__(self, *exc_info: object) -> None:
        self._local.depth -= 1


def _set(step: Step) -> None:
    assert step.arm is not None
    assert isinstance(step.session, Session)
    _set_for(step.session.alarm, step.arm)


def _set_for(alarm: Alarm, attempt: Attempt) -> None:
    alarm.set(attempt.delay, attempt.due, attempt)


@dataclass(frozen=True, slots=True)
class _Options:
    refresh_buffer: float
    retry_delay: float
    follow_up_interval: float
    expires_in_floor: float
    fetch_timeout: float | None
    jitter: float
    retry_policy: RetryPolicy | None = None


def _options(
    refresh_buffer: object,
    retry_delay: object,
    follow_up_interval: object,
    expires_in_floor: object,
    fetch_timeout: object,
    jitter: object,
    retry_policy: object = None,
) -> _Options:
    fetch_limit = wait_limit(fetch_timeout, "fetch_timeout")
    if fetch_limit == 0:
        raise ValueError("fetch_timeout must be positive, or None for no limit")
    return _Options(
        refresh_buffer=at_least(refresh_buffer, "refresh_buffer", 0.0),
        retry_delay=at_least(retry_delay, "retry_delay", MIN_DELAY, _LOOP),
        follow_up_interval=at_least(follow_up_interval, "follow_up_interval", MIN_DELAY, _LOOP),
        expires_in_floor=at_least(expires_in_floor, "expires_in_floor", MIN_DELAY, _LOOP),
        fetch_timeout=fetch_limit,
        jitter=at_least(jitter, "jitter", 0.0),
        retry_policy=checked(retry_policy),
    )


def _check_choices(clock: object, timers: object, rng: object) -> None:
    if clock is not None and not isinstance(clock, ManualClock):
        raise TypeError(f"clock must be a ManualClock or None, not {type(clock).__name__}")
    if timers not in ("thread", "heap"):
        raise ValueError(f"timers must be 'thread' or 'heap', not {timers!r}")
    if rng is not None and not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random or None, not {type(rng).__name__}")


def _check_callables(**callbacks: object) -> None:
    for name, callback in callbacks.items():
        if name == "on_event" and callback is None:
            continue
        if not callable(callback):
            raise TypeError(f"{name} must be callable" + (" or None" if name == "on_event" else ""))


class _Refresher:
    """The worker side of the driver: fetches, deliveries and reports, run as steps say."""

    def __init__(
        self,
        get_access_token: Callable[[], str | None],
        on_refresh: Callable[[str, str], None],
        runtime: Runtime,
        reporter: Reporter,
        options: _Options,
    ) -> None:
        self._get_access_token = get_access_token
        self._on_refresh = on_refresh
        self._runtime = runtime
        self._reporter = reporter
        self._options = options

    def carry_out(self, state: _State, step: Step) -> None:
        """What a committed step says to do, in order (lock not held)."""
        for command in step.then:
            if isinstance(command, Report):
                self._reporter.report(
                    command.outcome, command.session_id, command.fields, state.working
                )
            elif isinstance(command, Fetch):
                self.start(state, command.attempt, fired=False)
            else:
                self._deliver(state, command)

    def start(self, state: _State, attempt: Attempt, *, fired: bool) -> None:
        """Run the refresh on a worker (inline on a ManualClock); ``fired``: by its alarm."""
        # A partial, not a lambda: a storm's backlog holds thousands of these, and a
        # closure is six objects for the garbage collector to count, a partial three.
        if not self._runtime.submit(functools.partial(self._refresh, state, attempt, fired)):
            self._reporter.say("dropped_at_shutdown", attempt.session_id)

    def _refresh(self, state: _State, attempt: Attempt, fired: bool) -> None:
        """A worker's job: start the attempt if it is still wanted, then fetch."""
        with state.working():
            running = self._start(state, attempt, fired)
            if running is None:
                return  # cancelled or replaced before it started: never called
            if running.session_id in state.hung:
                self._reporter.say("still_hung", running.session_id)
                self._complete(state, running, None, "hung")
                return
            self._fetch_bounded(state, running)

    def _start(self, state: _State, attempt: Attempt, fired: bool) -> Attempt | None:
        """Take the attempt off its alarm (if it fired) and report its start; None if stale."""
        listening = self._reporter.listening()
        due, lateness, trigger = self._lateness(attempt, fired) if listening else (0, 0, None)
        if fired:
            with state.lock:
                step = state.apply(state.machine.fire(attempt, trigger or attempt.reason))
            if not step.then:
                return None
            fetch = step.then[0]
            assert isinstance(fetch, Fetch)
            attempt = fetch.attempt
        elif not state.machine.current(attempt):
            # A read without the lock (one contended acquisition less per
            # refresh); fetched() checks again under it.
            return None
        else:
            attempt = attempt.started(attempt.reason)
        if listening:
            fields = {"due": due, "lateness": lateness, "trigger": trigger}
            fields["attempt"] = attempt.number
            self._reporter.report("started", attempt.session_id, fields, state.working)
        return attempt

    def _lateness(self, attempt: Attempt, fired: bool) -> tuple[float, float, events.Trigger]:
        """When the attempt was due, how late it starts, and what started it."""
        runtime = self._runtime
        now, early = runtime.time(), attempt.deadline - runtime.monotonic()
        due = _wall_fires_at(runtime, attempt.due, attempt.deadline) if fired else attempt.due
        lateness = max(0.0, now - due)
        # Fired by wall time long before its monotonic deadline, and late: it fell
        # due while the machine slept (or the clock stepped past it).
        resumed = fired and early >= _RESUMED and lateness >= _RESUMED
        return due, lateness, "resume" if resumed else attempt.reason

    def _fetch_bounded(self, state: _State, attempt: Attempt) -> None:
        """Call get_access_token, bounded by fetch_timeout, then complete the attempt."""
        session_id = attempt.session_id
        # Whoever acquires it first settles the attempt: this worker with a
        # result, or the watchdog with a timeout. The other does nothing.
        settled = threading.Lock()
        timeout = self._options.fetch_timeout

        def timed_out(replace: Callable[[], bool]) -> None:
            if not settled.acquire(blocking=False):  # pragma: no cover - a narrow race
                return  # the call returned just before its watch was cancelled
            state.count(stuck=1, hung=session_id)
            replaced = replace()  # a new worker serves the others
            # Settled here, on the watchdog's thread, so the retry is armed on
            # time even if every worker hangs; reported (user code: on_event,
            # log handlers) on a worker, so nothing can block the watchdog.
            late = attempt.ran(timeout or 0.0)
            step = self._settle(state, late, None, "timeout")
            self._runtime.submit(lambda: self._announce(state, step, replaced))

        watch = None if timeout is None else self._runtime.watch(timeout, timed_out)
        began = self._runtime.monotonic()
        served_by = ServedBySlot()
        try:
            token, error, raised, verdict = self._fetch(state, session_id, served_by)
        finally:
            if watch is not None:
                watch.cancel()
        if not settled.acquire(blocking=False):
            state.count(stuck=-1, hung=session_id)
            self._reporter.say("returned_late", session_id)
            return
        duration = max(0.0, self._runtime.monotonic() - began)
        done = attempt.ran(duration, served_by.value, verdict.terminal, verdict.wait)
        if raised:
            # A synchronous throw in the seed: handled before anything queued.
            self._complete(state, done, token, error)
        else:
            self._runtime.then(lambda: self._complete(state, done, token, error))

    def _announce(self, state: _State, step: Step, replaced: bool) -> None:
        with state.working():
            if not replaced:
                self._reporter.say("pool_full", stuck=state.stuck)
            self.carry_out(state, step)

    def _fetch(
        self, state: _State, session_id: str, served_by: ServedBySlot
    ) -> tuple[str | None, str | None, bool, Verdict]:
        """Call get_access_token: the token (None if none), any error's type, if it raised,
        and what the retry policy makes of the error."""
        state.count(running=1)
        try:
            token: object = call_as_refresh(session_id, served_by, self._get_access_token)
        except BaseException as error:
            # By type only: an exception's message may quote a token.
            self._reporter.say("raised", session_id, error_type=type(error).__name__)
            return None, type(error).__name__, True, self._verdict(session_id, error)
        finally:
            state.count(running=-1)
        if token is None or isinstance(token, str):
            return token or None, None, False, _RETRY
        self._reporter.say("not_a_token", session_id, error_type=type(token).__name__)
        return None, type(token).__name__, False, _RETRY

    def _verdict(self, session_id: str, error: BaseException) -> Verdict:
        """Whether the retry policy (if any) ends the chain on ``error`` (lock not held)."""
        policy = self._options.retry_policy
        if policy is None:
            return _RETRY
        verdict, raised = policy.verdict(error)
        if raised is not None:
            error_type = type(raised).__name__
            self._reporter.say("terminal_raised", session_id, error_type=error_type)
        return verdict

    def _complete(
        self, state: _State, attempt: Attempt, token: str | None, error: str | None
    ) -> None:
        """Count a failure and arm its retry, or deliver the token (or hand it over)."""
        with state.working():
            self.carry_out(state, self._settle(state, attempt, token, error))

    def _settle(
        self, state: _State, attempt: Attempt, token: str | None, error: str | None
    ) -> Step:
        """Apply a refresh's result to the machine; no user code runs here."""
        runtime = self._runtime
        timeout = self._options.fetch_timeout
        detail = {"timeout": timeout} if error in ("timeout", "hung") else {}
        with state.lock:
            step = state.machine.fetched(
                attempt,
                token,
                error=error,
                wall=runtime.time(),
                monotonic=runtime.monotonic(),
                detail=detail,
            )
            return state.apply(step)

    def _deliver(self, state: _State, deliver: Deliver) -> None:
        """Call on_refresh, then any newer result handed over meanwhile; arm the follow-up.

        The delivery was marked by the step that said to deliver; the
        ``finally`` unmarks it whatever on_refresh, on_event or a log handler
        raised.
        """
        attempt, token = deliver.attempt, deliver.token
        finished = False
        try:
            while True:
                self._report_refreshed(state, attempt, token)
                self._call_on_refresh(state, attempt.session_id, token)
                runtime = self._runtime
                with state.lock:
                    step = state.machine.delivered(
                        attempt, wall=runtime.time(), monotonic=runtime.monotonic()
                    )
                    step = state.apply(step)
                    handed = [command for command in step.then if isinstance(command, Deliver)]
                    finished = not handed
                step.then = [command for command in step.then if isinstance(command, Report)]
                self.carry_out(state, step)
                if finished:
                    return
                attempt, token = handed[0].attempt, handed[0].token
        finally:
            if not finished:  # left by an exception: unmark all the same
                with state.lock:
                    machine = state.machine
                    mine = machine.deliveries.get(attempt.session_id)
                    # Else it ended just before the exception (between two lines).
                    if (
                        mine is not None and mine.generation == attempt.generation
                    ):  # pragma: no branch
                        state.apply(machine.abandon_delivery(attempt.session_id))

    def _report_refreshed(self, state: _State, attempt: Attempt, token: str) -> None:
        if not self._reporter.wanted("refreshed"):
            return  # a storm of refreshes fingerprints no token for nobody
        listening = self._reporter.listening()
        fields = {
            "token_fingerprint": fingerprint(token),
            "trigger": attempt.origin or attempt.reason,
            "attempts": attempt.number,
            "fetch_duration": attempt.duration,
            "expires_at": _expiry(token) if listening else None,
            "served_by": attempt.served_by,
        }
        self._reporter.report("refreshed", attempt.session_id, fields, state.working)

    def _call_on_refresh(self, state: _State, session_id: str, token: str) -> None:
        state.count(running=1)
        try:
            with state.working():
                self._on_refresh(session_id, token)
        except BaseException as error:
            fields = {"error_type": type(error).__name__}
            self._reporter.report("callback_error", session_id, fields, state.working)
        finally:
            state.count(running=-1)


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
      Refreshes due together run one after another on one of them (no hand-off
      between them); another joins whenever one has run 50 ms, and takes over.
    - ``timers`` (``"thread"``): one timer thread per pending session; ``"heap"``:
      one thread for all of them, for thousands of sessions.
    - ``jitter`` (0) and ``rng``: refresh up to ``jitter`` earlier, at random.
    - ``retry_policy`` (None: the seed's rule, three failures in a row end the
      chain, ``retry_delay`` apart): a :class:`~token_refresh.RetryPolicy`
      backs off and retries until the error is terminal; for daemons.
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
        retry_policy: RetryPolicy | None = None,
    ) -> None:
        _check_callables(
            get_access_token=get_access_token, on_refresh=on_refresh, on_event=on_event
        )
        require_str(label, "label")
        self._options = _options(
            refresh_buffer,
            retry_delay,
            follow_up_interval,
            expires_in_floor,
            fetch_timeout,
            jitter,
            retry_policy,
        )
        count(max_workers, "max_workers", 1)
        _check_choices(clock, timers, rng)
        self._label = label
        self._rng = rng if rng is not None else random.Random()
        self._runtime: Runtime = (
            ManualRuntime(clock)
            if clock is not None
            else ThreadRuntime(f"token-refresh-{label}", timers=timers, max_workers=max_workers)
        )
        self._reporter = Reporter(label, self._runtime.time, on_event)
        self._skew = SkewTracker()  # one per scheduler: see "Time and clocks" in the daemon guide
        fetch = _learning(get_access_token, weakref.WeakMethod(self._received), self._runtime.time)
        self._refresher = _Refresher(
            fetch, on_refresh, self._runtime, self._reporter, self._options
        )
        self._closed = False
        self._threaded = clock is None  # real threads: the reaper runs while it is open
        self._fork_dropped = 0
        self._state = _State(self._new_machine())
        _live_schedulers.add(self)
        self._finalizer: weakref.finalize[Any, Any] | None = None
        if clock is None:
            # Collected with no session left: a thread of ours stops the threads
            # (a live session's alarm keeps the scheduler alive, as a
            # threading.Timer would). The finalizer itself takes no lock.
            self._finalizer = weakref.finalize(self, reaper.later, self._runtime.close)
            self._finalizer.atexit = False

    def _new_machine(self) -> Machine:
        return Machine(
            retry_delay=self._options.retry_delay,
            follow_up_interval=self._options.follow_up_interval,
            jitter=(
                functools.partial(_jittered, self._rng, self._options.jitter)
                if self._options.jitter
                else _same
            ),
            policy=self._options.retry_policy,
            draw=self._rng.random,
        )

    @property
    def _observers(self) -> tuple[Callable[[events.Event], None], ...]:
        """Called with every event before on_event: token_refresh.otel's hook."""
        return self._reporter.observers

    @_observers.setter
    def _observers(self, observers: tuple[Callable[[events.Event], None], ...]) -> None:
        self._reporter.observers = observers

    @property
    def _lock(self) -> threading.Lock:
        """The lock of this process's state (tests hold it to fork while it is busy)."""
        return self._state.lock

    # -- public API ---------------------------------------------------------

    def __repr__(self) -> str:
        pending = self._state.machine.pending()
        return f"Scheduler(label={self._label!r}, pending={pending}, closed={self._closed})"

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
        return self._options.refresh_buffer

    def next_refresh_at(self, session_id: str) -> float | None:
        """Wall time (Unix seconds) the session's next refresh comes; None if no timer.

        The earlier of its wall-clock due time and the end of its delay on the
        monotonic clock: after a step back of the wall clock by more than a
        second (less is the drift between any two real clocks), the latter. A
        time in the past (after a suspend or a step forward) means it comes now.
        """
        require_str(session_id, "session_id")
        state = self._current()
        with state.lock:
            session = state.machine.sessions.get(session_id)
            armed = None if session is None else session.armed
        return None if armed is None else _wall_fires_at(self._runtime, armed.due, armed.deadline)

    def sessions(self) -> frozenset[str]:
        """The sessions with a live refresh chain: a timer armed or a refresh running."""
        state = self._current()
        with state.lock:
            return frozenset(state.machine.sessions)

    def stats(self) -> Stats:
        """Current sizes and lifetime counters, for a metrics exporter."""
        state = self._current()
        with state.lock:
            machine = state.machine
            return Stats(
                sessions=len(machine.sessions),
                pending=machine.pending(),
                refreshes=machine.refreshes,
                failures=machine.failed_attempts,
                give_ups=machine.give_ups,
                running=state.running,  # counted under counter_lock: a snapshot
                stuck=state.stuck,
            )

    def after_fork(self) -> None:
        """Make the scheduler usable in a forked child; a no-op in the process that made it.

        Runs by itself after ``os.fork()`` and at every call in a new process,
        so calling it from gunicorn's ``post_fork`` or uWSGI's ``@postfork``
        is optional but harmless. The child drops the sessions it inherited
        (the parent keeps refreshing them) and, at its first call, logs one
        WARNING saying how many.
        """
        if self._state.pid != os.getpid():
            with _fork_lock:
                if self._state.pid != os.getpid():  # else another thread got here first
                    self._reset_after_fork()
        if self._fork_dropped:
            dropped, self._fork_dropped = self._fork_dropped, 0
            if dropped:  # pragma: no branch - else another thread reported it first
                self._reporter.say("forked", dropped=dropped, pid=os.getpid())

    def _current(self) -> _State:
        """The state to work on: this process's own (see after_fork)."""
        self.after_fork()
        return self._state

    def _reset_after_fork(self) -> None:
        """Forget the parent's sessions, threads and locks; no logging, no I/O (fork hook)."""
        machine = self._state.machine
        self._fork_dropped = len(machine.sessions.keys() | machine.failures.keys())
        self._runtime.after_fork()
        self._reset_state()

    def _reset_state(self) -> None:
        """A fresh lock, machine and counters: in a forked child."""
        self._state = _State(self._new_machine())

    def schedule(self, session_id: str, token: str) -> None:
        """Refresh ``session_id`` ``refresh_buffer`` seconds before ``token``'s ``exp``.

        If that moment has passed, the refresh starts at once. A token with no
        usable ``exp`` (not a JWT, say) leaves the session's existing timer as
        it is. A token with an ``iat``, once a clock skew past the threshold
        is known, is refreshed ``refresh_buffer`` before its lifetime
        (``exp - iat``) counted from its receipt instead (see
        :class:`~token_refresh.events.ClockSkew`).
        """
        require_str(session_id, "session_id")
        require_str(token, "token")
        self.after_fork()
        expiry, iat = claims(token)
        if not expiry:  # as in the seed, an exp of 0 counts as missing too
            self._check_open()
            fields = {"token_fingerprint": fingerprint(token)}
            self._reporter.report("kept", session_id, fields, self._state.working)
            return
        now = self._runtime.time()
        if iat is not None and iat - now > max(SKEW_THRESHOLD, self._skew.learned or 0.0):
            self._learn(iat - now, session_id)  # an iat in the future: skew, whatever its age
        learned = None if iat is None else self._skew.learned  # no iat: the seed's rule
        due = local_exp(expiry, iat, learned, now) - self._options.refresh_buffer
        detail = {"expires": expiry, "buffer": self._options.refresh_buffer}
        self._replace(session_id, due, due - now, "exp", detail)

    def _received(self, token: str, received: float) -> None:
        """A token get_access_token just returned at ``received``: learn the skew it shows.

        A SharedToken tells the skew its grant was received with; a plain
        function's token is measured by its ``iat`` (see ``received_skew``).
        """
        served, noted = served_so_far()
        skew = noted if noted is not None or served is not None else received_skew(token, received)
        if skew is not None:
            self._learn(skew, current_session_id() or "")

    def _learn(self, skew: float, session_id: str) -> None:
        """Take a measured skew; report it (ClockSkew and a WARNING) if it changed."""
        effective = self._skew.learn(skew)
        if effective is not None:
            outcome = "clock_skew" if effective else "clock_skew_ended"
            fields = {"skew": effective, "threshold": SKEW_THRESHOLD}
            self._reporter.report(outcome, session_id, fields, self._state.working)

    def schedule_from_expires_in(self, session_id: str, expires_in: float | timedelta) -> None:
        """Refresh ``session_id`` before a token that expires in ``expires_in`` seconds.

        The delay is ``expires_in - refresh_buffer``, but never under
        ``expires_in_floor`` (30 seconds); if that floor puts the refresh
        after the token's expiry, a WARNING says so (and the ``Scheduled``
        event's ``after_expiry``).
        """
        require_str(session_id, "session_id")
        lifetime = seconds(expires_in, "expires_in")
        self.after_fork()
        options = self._options
        delay = max(lifetime - options.refresh_buffer, options.expires_in_floor)
        late = delay - lifetime
        detail = {
            "expires_in": lifetime,
            "buffer": options.refresh_buffer,
            "after_expiry": late > 0,
        }
        self._replace(session_id, self._runtime.time() + delay, delay, "expires_in", detail)
        if late > 0:
            floor = options.expires_in_floor
            self._reporter.say("after_expiry", session_id, late=late, floor=floor)

    def cancel(self, session_id: str, timeout: float | timedelta | None = None) -> bool:
        """Stop refreshing ``session_id`` and forget its state.

        A refresh in flight is dropped. Called from outside a callback, this
        waits up to ``timeout`` seconds (None: as long as it takes) for an
        ``on_refresh`` call already running for the session. Returns False if
        that call is still running (from inside a callback, it never waits).
        """
        require_str(session_id, "session_id")
        limit = wait_limit(timeout)
        state = self._current()
        deadline = _deadline(limit)
        if not state.free_by(deadline, self._threaded):
            reaper.later(functools.partial(self.cancel, session_id))
            return False
        with state.lock:
            step = state.apply(state.machine.cancel(session_id))
            done = state.await_deliveries([session_id], _left(deadline))
        self._refresher.carry_out(state, step)
        return done

    def cancel_all(self, timeout: float | timedelta | None = None) -> bool:
        """Cancel every session, as :meth:`cancel` does for one; False if an on_refresh runs on."""
        limit = wait_limit(timeout)
        state = self._current()
        deadline = _deadline(limit)
        if not state.free_by(deadline, self._threaded):
            reaper.later(self.cancel_all)
            return False
        with state.lock:
            steps = self._cancel_everything(state)
            done = state.await_deliveries(list(state.machine.deliveries), _left(deadline))
        for step in steps:
            self._refresher.carry_out(state, step)
        return done

    def close(self, timeout: float | timedelta | None = None) -> bool:
        """Cancel every session and stop the scheduler's threads. Idempotent.

        Waits up to ``timeout`` seconds (None: as long as it takes) for refresh
        work already running, and for the scheduler's threads to end. Returns
        True if nothing of the scheduler is left running. Called from inside a
        callback, it does not wait (the caller is part of that work) and
        returns False. From a signal handler it returns within ``timeout``
        whatever the interrupted code was doing; if that code held this
        scheduler's own lock, the closing is left to a thread of the library
        and ``close()`` returns False.
        """
        limit = wait_limit(timeout)
        state = self._current()
        deadline = _deadline(limit)
        if not state.free_by(deadline, self._threaded):
            # Interrupted inside our own lock: not here. Handed over while this
            # scheduler is still open, so the reaper's thread is still running.
            reaper.later(self._shut)
            self._closed = True
            return False
        with state.lock:
            steps = self._close_steps(state)
        threads = self._stop(state, steps)
        if state.inside():
            return False
        for thread in threads:
            thread.join(_left(deadline))
        return not any(thread.is_alive() for thread in threads)

    def _close_steps(self, state: _State) -> list[Step]:
        """Cancel every session and mark the scheduler closed (lock held)."""
        # The machine's flag, not ours: a close() left to the reaper set ours already.
        steps = [] if state.machine.closed else self._cancel_everything(state)
        self._closed = state.machine.closed = True
        return steps

    def _cancel_everything(self, state: _State) -> list[Step]:
        """Cancel every session (lock held); then no alarm of ours is left set."""
        steps = [state.apply(step) for step in state.machine.cancel_all()]
        # An alarm an interrupted call left behind is reached here too.
        self._runtime.sweep([session.alarm for session in state.machine.sessions.values()])
        return steps

    def _stop(self, state: _State, steps: list[Step]) -> list[threading.Thread]:
        """Report the cancels and stop the threads (lock released); return them to join."""
        for step in steps:
            self._refresher.carry_out(state, step)
        if self._finalizer is not None:
            self._finalizer.detach()
        reaper.wake()  # its thread ends once no scheduler is open
        return self._runtime.close()

    def _shut(self) -> None:
        """close() left to the reaper's thread: the same, without waiting for anything."""
        state = self._state
        with state.lock:
            steps = self._close_steps(state)
        self._stop(state, steps)

    # -- scheduling ------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SchedulerClosedError(f"scheduler {self._label!r} is closed")

    def _replace(
        self,
        session_id: str,
        due: float,
        delay: float,
        reason: Literal["exp", "expires_in"],
        detail: dict[str, Any],
    ) -> None:
        """Give the session a new generation and arm its alarm, or refresh at once."""
        state = self._state
        made: Alarm | None = None
        planned: list[Step] = []
        try:
            while not planned:
                if made is None and session_id not in state.machine.sessions:
                    # A new session's alarm may start a thread: not under the lock.
                    made = self._runtime.alarm(self._fired)
                    if self._threaded:
                        reaper.ensure(_any_open)
                with state.lock:
                    self._check_open()
                    session = state.machine.sessions.get(session_id)
                    alarm = made if session is None else session.alarm
                    if alarm is not None:  # else the session ended meanwhile: make it one
                        planned.append(
                            _plan(
                                state, self._runtime, session_id, alarm, due, delay, reason, detail
                            )
                        )
                        state.apply(planned[0], refuse=True)
            self._refresher.carry_out(state, planned[0])
        except SchedulerClosedError:
            raise
        except RuntimeError as error:
            raise RuntimeError(
                f"cannot arm a refresh timer for session {session_label(session_id)!r} "
                f"({error}); its existing timer is kept"
            ) from error
        except BaseException:
            # A refresh due at once that an exception kept from starting comes later.
            _rescue(state, self._runtime, planned)
            raise
        finally:
            _discard_unpublished(state, session_id, made)

    # -- refreshing ---------------------------------------------------------

    def _fired(self, attempt: Attempt) -> None:
        # An alarm's thread: no lock here, thousands firing together would
        # queue on it. The worker checks that the refresh is still wanted.
        self._refresher.start(self._state, attempt, fired=True)


def _plan(
    state: _State,
    runtime: Runtime,
    session_id: str,
    alarm: Alarm,
    due: float,
    delay: float,
    reason: Literal["exp", "expires_in"],
    detail: dict[str, Any],
) -> Step:
    """The step schedule() takes: a refresh due at once is due now (lock held)."""
    if delay <= 0:
        due = runtime.time()
    return state.machine.schedule(
        session_id,
        alarm,
        delay=delay,
        due=due,
        monotonic=runtime.monotonic(),
        reason=reason,
        detail=detail,
    )


def _rescue(state: _State, runtime: Runtime, planned: list[Step]) -> None:
    """Arm for now a refresh due at once that an exception kept from starting."""
    for command in [command for step in planned for command in step.then]:
        if isinstance(command, Fetch):
            with state.lock:
                rescue = state.machine.rescue(
                    command.attempt, wall=runtime.time(), monotonic=runtime.monotonic()
                )
                state.apply(rescue)


def _discard_unpublished(state: _State, session_id: str, made: Alarm | None) -> None:
    """Cancel an alarm made for a session that did not get it: nobody else would."""
    session = state.machine.sessions.get(session_id)
    if made is not None and (session is None or session.alarm is not made):
        made.cancel()


def _deadline(limit: float | None) -> float | None:
    """The monotonic moment a wait of ``limit`` seconds ends (None: never)."""
    return None if limit is None else time.monotonic() + limit


def _left(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (None: for ever), never negative."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


_RETRY = Verdict()  # not terminal, no wait: every failure without a retry policy


def _same(delay: float) -> float:
    return delay


def _jittered(rng: random.Random, jitter: float, delay: float) -> float:
    # Earlier, never later, and by at most half the delay, so a short
    # delay cannot collapse into a tight loop.
    return delay - rng.uniform(0.0, min(jitter, delay / 2))


def _any_open() -> bool:
    """Whether a scheduler with real threads is open (the reaper's thread runs while one is)."""
    while True:
        try:
            return any(
                scheduler._threaded and not scheduler._closed
                for scheduler in list(_live_schedulers)
            )
        except RuntimeError:  # pragma: no cover - the set changed while it was copied
            continue


def _expiry(token: str) -> float | None:
    """A JWT's ``exp`` as a float, for Refreshed.expires_at; None if it has none."""
    expiry = claims(token)[0]
    return float(expiry) if expiry else None


def _learning(
    get_access_token: Callable[[], str | None],
    received: weakref.WeakMethod[Callable[[str, float], None]],
    now: Callable[[], float],
) -> Callable[[], str | None]:
    """``get_access_token`` telling the scheduler (if it still exists) each token it returns."""

    def fetch() -> str | None:
        token = get_access_token()
        learn = received()
        if isinstance(token, str) and token and learn is not None:
            learn(token, now())
        return token

    return fetch


def _after_fork_in_child() -> None:  # pragma: no cover - runs in children (TestFork)
    """Only re-initialise: no logging, no I/O, no lock this module did not create."""
    global _fork_lock
    _fork_lock = threading.Lock()
    for scheduler in list(_live_schedulers):
        scheduler._reset_after_fork()


_fork_lock = threading.Lock()
if hasattr(os, "register_at_fork"):  # pragma: no branch - not on Windows, which cannot fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _wall_fires_at(runtime: Runtime, due: float, deadline: float) -> float:
    """Wall time an alarm fires that is due at ``due`` (wall) or ``deadline`` (monotonic).

    The two clocks drift apart by a little all the time (NTP slews them,
    time-machine freezes one): only a step back that the clock watcher would
    call a jump makes the monotonic deadline come first.
    """
    by_deadline = runtime.time() + (deadline - runtime.monotonic())
    return by_deadline if by_deadline < due - JUMP else due
