"""Deterministic time for tests: a clock you advance by hand."""

from __future__ import annotations

import heapq
import itertools
import math
import threading
from collections import deque
from collections.abc import Callable

__all__ = ["ManualClock"]


class _ManualTimer:
    """A timer armed on a :class:`ManualClock`; ``cancel()`` disarms it."""

    __slots__ = ("callback", "cancelled", "deadline")

    def __init__(self, deadline: float, callback: Callable[[], None]) -> None:
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.callback = _nothing  # free what the callback holds; the heap drops us lazily


class ManualClock:
    """A wall clock that only moves when :meth:`advance` is called.

    Pass it as ``Scheduler(..., clock=clock)``: the scheduler then reads the
    time from it, arms its timers on it and runs its refresh work on the
    calling thread. ``advance()`` runs every timer that falls due, in
    deadline order (ties in the order they were armed), together with the
    refresh work they start. Nothing sleeps and no other thread is used, so a
    ManualClock belongs to one thread at a time.
    """

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = _finite(start, "start")
        self._timers: list[tuple[float, int, _ManualTimer]] = []
        self._sequence = itertools.count()
        self._ready: deque[Callable[[], None]] = deque()
        self._running = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ManualClock(time={self._now!r}, pending={self.pending})"

    def time(self) -> float:
        """The manual wall time, in Unix seconds."""
        return self._now

    def monotonic(self) -> float:
        """The same reading as :meth:`time`: a manual clock never jumps back."""
        return self._now

    @property
    def pending(self) -> int:
        """How many armed timers have not fired or been cancelled."""
        with self._lock:
            return sum(not timer.cancelled for _, _, timer in self._timers)

    def call_later(self, delay: float, callback: Callable[[], None]) -> _ManualTimer:
        """Arm ``callback`` to run ``delay`` seconds from now; return a cancellable handle."""
        timer = _ManualTimer(self._now + max(0.0, delay), callback)
        with self._lock:
            heapq.heappush(self._timers, (timer.deadline, next(self._sequence), timer))
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
        """Move time forward by ``seconds``, running whatever falls due on the way."""
        seconds = _finite(seconds, "seconds")
        if seconds < 0:
            raise ValueError(f"seconds must not be negative, not {seconds!r}")
        if self._running:
            raise RuntimeError("advance() cannot be called from inside a timer callback")
        target = self._now + seconds
        while (timer := self._pop_due(target)) is not None:
            self._now = max(self._now, timer.deadline)
            self._run(timer.callback)
        self._now = target

    def _pop_due(self, target: float) -> _ManualTimer | None:
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
            while self._ready:
                self._ready.popleft()()
        finally:
            self._running = False


def _nothing() -> None:
    """Stands in for a cancelled timer's callback."""


def _finite(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, not {value!r}")
    return float(value)
