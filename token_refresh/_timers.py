"""Timer backends: a ``threading.Timer`` per session, or one thread and a heap."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Protocol

_log = logging.getLogger("token_refresh")


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class Timers(Protocol):
    """Where a scheduler arms its timers: real threads, or a ManualClock in tests."""

    def monotonic(self) -> float: ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> Cancellable: ...


class ThreadTimers:
    """One daemon ``threading.Timer`` per pending session: simple, one thread each."""

    def __init__(self, name: str) -> None:
        self._name = name
        # Every timer thread not yet garbage: cancelled ones linger for a moment,
        # and close() must wait for them too.
        self._threads: weakref.WeakSet[threading.Timer] = weakref.WeakSet()

    def monotonic(self) -> float:
        return time.monotonic()

    def call_later(
        self, delay: float, callback: Callable[[], None], *, start: bool = True
    ) -> threading.Timer:
        """A timer for ``callback``; with ``start=False`` the caller starts it with start()."""
        timer = threading.Timer(delay, callback)
        timer.name = self._name
        timer.daemon = True
        if start:
            self.start(timer)
        return timer

    def start(self, timer: threading.Timer) -> None:
        timer.start()  # RuntimeError if the OS refuses a thread
        self._threads.add(timer)

    def stop(self) -> list[threading.Thread]:
        """The threads to join once every timer has been cancelled."""
        return list(self._threads)


class _HeapEntry:
    """A timer in a HeapTimers heap; cancelling it leaves it there to be skipped."""

    __slots__ = ("callback", "owner")

    def __init__(self, owner: HeapTimers, callback: Callable[[], None]) -> None:
        self.owner = owner
        self.callback: Callable[[], None] | None = callback

    def cancel(self) -> None:
        self.owner._cancel(self)


class HeapTimers:
    """All of a scheduler's timers on one daemon thread: a deadline heap and a Condition.

    Cancelled entries stay in the heap (cancelling is O(1)) and are skipped
    when they surface; the heap is rebuilt when more than half of it is dead.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._heap: list[tuple[float, int, _HeapEntry]] = []
        self._sequence = itertools.count()
        self._cancelled = 0
        self._wakeup = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._stopped = False

    def monotonic(self) -> float:
        return time.monotonic()

    def call_later(self, delay: float, callback: Callable[[], None]) -> _HeapEntry:
        entry = _HeapEntry(self, callback)
        deadline = time.monotonic() + delay
        with self._wakeup:
            thread = None
            if self._thread is None:
                thread = self._thread = threading.Thread(
                    target=self._run, name=self._name, daemon=True
                )
            heapq.heappush(self._heap, (deadline, next(self._sequence), entry))
            if self._heap[0][2] is entry:
                self._wakeup.notify()  # the new timer is due before the one being waited for
        if thread is not None:
            # Started outside the lock, so it is parked in wait() at once: a thread
            # still starting when uWSGI forks (without Python's fork hooks) was
            # seen to leave the child waiting for the GIL for ever.
            try:
                thread.start()
            except RuntimeError:
                with self._wakeup:
                    self._thread = None
                entry.cancel()
                raise
        return entry

    def _cancel(self, entry: _HeapEntry) -> None:
        with self._wakeup:
            if entry.callback is None:
                return  # fired or cancelled already
            entry.callback = None
            self._cancelled += 1
            if self._cancelled > 64 and self._cancelled * 2 > len(self._heap):
                self._heap = [item for item in self._heap if item[2].callback is not None]
                heapq.heapify(self._heap)
                self._cancelled = 0

    def stop(self) -> list[threading.Thread]:
        """Stop the timer thread (pending timers never fire); return it to join."""
        with self._wakeup:
            self._stopped = True
            self._heap.clear()
            self._cancelled = 0
            self._wakeup.notify()
            return [] if self._thread is None else [self._thread]

    def _run(self) -> None:
        with self._wakeup:
            while not self._stopped:
                if not self._heap:
                    self._wakeup.wait()
                    continue
                deadline, _, entry = self._heap[0]
                if entry.callback is None:
                    heapq.heappop(self._heap)
                    self._cancelled -= 1
                    continue
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._wakeup.wait(min(wait, threading.TIMEOUT_MAX))
                    continue
                heapq.heappop(self._heap)
                callback, entry.callback = entry.callback, None
                self._wakeup.release()  # never run a callback holding the heap's lock
                try:
                    callback()
                except Exception:
                    _log.exception("[token_refresh] timer callback failed")
                finally:
                    self._wakeup.acquire()
