"""Deterministic time for tests: a clock you advance by hand."""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import weakref
from collections import deque
from collections.abc import Callable, Collection
from fractions import Fraction
from typing import Any

__all__ = ["ManualClock"]

_NS = 1_000_000_000
#: Callbacks that may run at one instant (timers, or work they queue) before
#: advance() calls it a loop and raises, instead of never returning.
_LOOP_LIMIT = 1_000_000


class _ManualTimer:
    """A timer armed on a :class:`ManualClock`; ``cancel()`` disarms it."""

    __slots__ = ("callback", "cancelled", "deadline", "due")

    def __init__(self, deadline: int, due: int, callback: Callable[[], None]) -> None:
        self.deadline = deadline  # monotonic nanoseconds since the clock's start
        self.due = due  # wall nanoseconds since the clock's start
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.callback = _nothing  # free what the callback holds; the heap drops us lazily


class ManualClock:
    """A wall clock and a monotonic clock that only move when a test moves them.

    Pass it as ``Scheduler(..., clock=clock)``: the scheduler then reads the
    time from it, arms its timers on it and runs its refresh work on the
    calling thread. ``advance()`` runs every timer that falls due, in
    deadline order (ties in the order they were armed), together with the
    refresh work they start. Nothing sleeps and no other thread is used, so a
    ManualClock belongs to one thread at a time.

    Time is kept in integer nanoseconds, so any run of ``advance()`` calls
    that sums to a timer's delay fires it. A timer fires at the earlier of
    its monotonic deadline and its wall-clock due time; :meth:`suspend` and
    :meth:`step` move the wall clock alone, as a machine's sleep or an NTP
    step does.
    """

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._start = _finite(start, "start")
        # Exact sums of what advance(), suspend() and step() were given, so that
        # three advance(1/3) make exactly one second; read as whole nanoseconds.
        self._elapsed = Fraction(0)  # monotonic
        self._jumped = Fraction(0)  # wall minus monotonic
        self._monotonic = 0  # nanoseconds since start
        self._wall = 0  # nanoseconds since start; differs once suspended or stepped
        # (when it fires on the monotonic clock, sequence, timer); the key is
        # the earlier of its deadline and its due time, and changes only when
        # the wall clock moves alone, when the heap is rebuilt.
        self._timers: list[tuple[int, int, _ManualTimer]] = []
        self._sequence = itertools.count()
        self._ready: deque[Callable[[], None]] = deque()
        self._running = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ManualClock(time={self.time()!r}, pending={self.pending})"

    def time(self) -> float:
        """The manual wall time, in Unix seconds."""
        return self._start + self._wall / _NS

    def monotonic(self) -> float:
        """The manual monotonic time: it starts at ``start`` and never jumps."""
        return self._start + self._monotonic / _NS

    @property
    def pending(self) -> int:
        """How many armed timers have not fired or been cancelled."""
        with self._lock:
            return sum(not timer.cancelled for _, _, timer in self._timers)

    def call_later(
        self, delay: float, callback: Callable[[], None], *, due: float | None = None
    ) -> _ManualTimer:
        """Arm ``callback`` to run ``delay`` seconds from now; return a cancellable handle.

        ``due`` (wall time, Unix seconds) makes it run earlier if the wall
        clock reaches it first; by default it is now plus ``delay``.
        """
        return self._push(self._timer(delay, callback, due))

    def _timer(self, delay: float, callback: Callable[[], None], due: float | None) -> _ManualTimer:
        """A timer for ``call_later``, not armed yet."""
        after = max(0, _nanoseconds(delay))
        due_at = self._wall + after
        deadline = self._monotonic + after
        if due is not None:
            wanted = _nanoseconds(_finite(due, "due") - self._start)
            if abs(wanted - due_at) > _rounding(due):
                due_at = wanted
            else:
                # The same moment within float rounding (a delay computed as
                # due - time() at a realistic epoch is off by up to ~100 ns):
                # the wall time given is the exact one, so both clocks keep it.
                deadline += wanted - due_at
                due_at = wanted
        return _ManualTimer(deadline, due_at, callback)

    def _push(self, timer: _ManualTimer) -> _ManualTimer:
        """Arm ``timer``."""
        with self._lock:
            heapq.heappush(self._timers, (self._fires_at(timer), next(self._sequence), timer))
        return timer

    def run_soon(self, work: Callable[[], None]) -> None:
        """Run ``work`` now, or right after the callback that is running returns.

        This is how a ManualClock stands in for JavaScript's microtasks: work
        armed from inside a callback never nests inside it.
        """
        self._ready.append(work)
        if not self._running:
            self._run(None)

    def run_now(self, work: Callable[[], None]) -> None:
        """Run ``work`` at once; what it passes to :meth:`run_soon` waits until it returns."""
        if self._running:
            work()
        else:
            self._run(work)

    def advance(self, seconds: float) -> None:
        """Move both clocks forward by ``seconds``, running whatever falls due on the way.

        Timers that fell due during a :meth:`suspend` or a :meth:`step` run
        first, in due order, at the current time.
        """
        span = _non_negative(seconds, "seconds")
        if self._running:
            raise RuntimeError("advance() cannot be called from inside a timer callback")
        self._elapsed += Fraction(span)
        target = _nanoseconds(self._elapsed)
        same_instant = 0
        while (timer := self._pop_due(target)) is not None:
            moment = self._fires_at(timer)
            same_instant = 0 if moment > self._monotonic else same_instant + 1
            if same_instant > _LOOP_LIMIT:
                raise RuntimeError(_loop("timers ran at one instant"))
            self._move_to(max(self._monotonic, moment))
            self._run(timer.callback)
        self._move_to(target)

    def suspend(self, seconds: float) -> None:
        """Sleep the machine for ``seconds``: the wall clock moves, the monotonic one does not.

        Nothing runs meanwhile; what fell due by wall time runs at the next
        :meth:`advance` (``advance(0)`` included).
        """
        self._jump(_non_negative(seconds, "seconds"), "suspend")

    def step(self, seconds: float) -> None:
        """Step the wall clock by ``seconds`` (either sign), as NTP does; monotonic time stays.

        Nothing runs meanwhile; what fell due by wall time runs at the next
        :meth:`advance`. A step back delays nothing: monotonic deadlines hold.
        """
        self._jump(_finite(seconds, "seconds"), "step")

    def _jump(self, span: float, name: str) -> None:
        if self._running:
            raise RuntimeError(f"{name}() cannot be called from inside a timer callback")
        self._jumped += Fraction(span)
        self._wall = self._monotonic + _nanoseconds(self._jumped)
        with self._lock:
            self._timers = [
                (self._fires_at(timer), sequence, timer)
                for _, sequence, timer in self._timers
                if not timer.cancelled
            ]
            heapq.heapify(self._timers)

    def _move_to(self, monotonic: int) -> None:
        self._wall += monotonic - self._monotonic
        self._monotonic = monotonic

    def _fires_at(self, timer: _ManualTimer) -> int:
        """The monotonic moment a timer fires: its deadline, or its due time if earlier."""
        return min(timer.deadline, timer.due - (self._wall - self._monotonic))

    def _pop_due(self, target: int) -> _ManualTimer | None:
        with self._lock:
            while self._timers and self._timers[0][0] <= target:
                _, _, timer = heapq.heappop(self._timers)
                if not timer.cancelled:
                    return timer
            return None

    def _run(self, callback: Callable[[], None] | None) -> None:
        self._running = True
        try:
            if callback is not None:
                callback()
            for _ in range(_LOOP_LIMIT):
                if not self._ready:
                    return
                self._ready.popleft()()
            self._ready.clear()
            raise RuntimeError(_loop("pieces of work queued one another"))
        finally:
            self._running = False


def _loop(what: str) -> str:
    return f"more than {_LOOP_LIMIT:,} {what}: a callback that re-arms itself for now loops"


def _nothing() -> None:
    """Stands in for a cancelled timer's callback."""


def _finite(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, not {value!r}")
    return float(value)


def _non_negative(value: float, name: str) -> float:
    seconds = _finite(value, name)
    if seconds < 0:
        raise ValueError(f"{name} must not be negative, not {seconds!r}")
    return seconds


def _nanoseconds(seconds: float | Fraction) -> int:
    """Seconds as whole nanoseconds, rounded: 0.1 is 100,000,000."""
    numerator, denominator = seconds.as_integer_ratio()  # exact: no float product rounds
    return (2 * numerator * _NS + denominator) // (2 * denominator)


def _rounding(wall: float) -> int:
    """Nanoseconds within which two float wall times near ``wall`` are the same moment."""
    return math.ceil(math.ulp(abs(wall) + 1.0) * 4 * _NS)


class _ManualAlarm:
    """A session's alarm on a ManualClock: setting it arms a new timer and cancels the old ones.

    Every timer it makes is listed before it is armed and cancelled only after
    the new one is, so an exception (``KeyboardInterrupt`` included) at any
    point leaves at most the timers it knows of, all of which the next
    ``set()`` or ``cancel()`` cancels.
    """

    __slots__ = ("__weakref__", "_callback", "_clock", "_timers", "used")

    def __init__(self, clock: ManualClock, callback: Callable[[Any], None]) -> None:
        self.used = False  # set at least once (see ManualRuntime.sweep)
        self._clock = clock
        self._callback: Callable[[Any], None] | None = callback
        self._timers: list[_ManualTimer] = []

    def set(self, delay: float, due: float, payload: object) -> None:
        self.used = True
        callback = self._callback
        if callback is None:
            return
        # A due time from a JWT's exp is exact; one computed as time() + delay
        # is not, and the delay is: give the clock only the exact one.
        exact_due = due if getattr(payload, "reason", None) == "exp" else None
        timer = self._clock._timer(delay, lambda: callback(payload), exact_due)
        self._timers.append(timer)
        self._clock._push(timer)
        for old in self._timers[:-1]:
            old.cancel()
        del self._timers[:-1]

    def disarm(self) -> None:
        for timer in self._timers:
            timer.cancel()

    def cancel(self) -> None:
        self._callback = None
        self.disarm()
        self._timers.clear()


class ManualRuntime:
    """A scheduler's runtime on a ManualClock: its timers, and work on the calling thread."""

    def __init__(self, clock: ManualClock) -> None:
        self._clock = clock
        self._alarms: weakref.WeakSet[_ManualAlarm] = weakref.WeakSet()

    def time(self) -> float:
        return self._clock.time()

    def monotonic(self) -> float:
        return self._clock.monotonic()

    def alarm(self, callback: Callable[[Any], None]) -> _ManualAlarm:
        alarm = _ManualAlarm(self._clock, callback)
        self._alarms.add(alarm)
        return alarm

    def sweep(self, keep: Collection[object]) -> None:
        for alarm in list(self._alarms):
            if alarm.used and alarm not in keep:
                alarm.cancel()

    def submit(self, job: Callable[[], None]) -> bool:
        # get_access_token runs at once, as the seed calls it before its
        # first await; what the refresh passes to then() runs after it returns.
        self._clock.run_now(job)
        return True

    def then(self, work: Callable[[], None]) -> None:
        self._clock.run_soon(work)

    def watch(self, timeout: float, callback: Callable[[Callable[[], bool]], None]) -> None:
        return None  # calls run inline: nothing else runs while one hangs

    def close(self) -> list[threading.Thread]:
        return []

    def after_fork(self) -> None:
        pass  # nothing of a ManualClock's runs on another thread
