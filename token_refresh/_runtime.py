"""Where a scheduler's work runs: timers, worker threads and clocks, behind one seam.

``Runtime`` is the seam. :class:`ThreadRuntime` is the real one (a timer
backend, a small pool of daemon workers and a watchdog for hung calls);
:class:`ManualRuntime` runs everything inline on a ``ManualClock``.
"""

from __future__ import annotations

import collections
import functools
import heapq
import itertools
import math
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Collection
from typing import Any, Final, Protocol

from ._workers import (
    PARK_WAIT,
    OurThread,
    Parking,
    Timer,
    Watchdog,
    Workers,
    _call_each,
    _internal_error,
    on_our_thread,
)

__all__ = [
    "JUMP",
    "Alarm",
    "HeapTimers",
    "Runtime",
    "ThreadRuntime",
    "ThreadTimers",
    "Timer",
    "Watchdog",
    "Workers",
]

# A parked alarm thread looks at its state this often (seconds) when nothing wakes it.
_PARKED = 300.0

# The heap's thread takes at most this many due timers at a time (their work
# joins the workers' backlog in one go).
_BATCH = 256

# The clock watcher wakes this often (seconds), and calls a change of the wall
# clock against the monotonic one larger than JUMP a jump (a suspend, a step).
_WATCH_INTERVAL = 2.0
JUMP = 1.0


def _wall() -> float:
    """The wall clock every real timer and scheduler reads (tests step it by patching this)."""
    return time.time()


class Alarm(Protocol):
    """A session's timer, kept for the session's life and set again along its chain."""

    def set(self, delay: float, due: float, payload: object) -> None:
        """Fire ``callback(payload)`` after ``delay``, or at wall time ``due`` if that is first.

        Replaces what it was set for. Called under the scheduler's lock:
        never starts a thread, takes only the alarm's own lock.
        """

    def disarm(self) -> None:
        """Fire nothing until set again (undone by the next set())."""

    def cancel(self) -> None:
        """Never fire again; a thread of its own ends."""


class Runtime(Protocol):
    """What a scheduler needs from the world: two clocks, alarms and workers."""

    def time(self) -> float:
        """Wall time, Unix seconds: decides when tokens expire."""

    def monotonic(self) -> float:
        """Monotonic time, seconds: decides when delays have run."""

    def alarm(self, callback: Callable[[Any], None]) -> Alarm:
        """A new alarm that calls ``callback``; may start a thread (lock not held)."""

    def sweep(self, keep: Collection[Alarm]) -> None:
        """Cancel every alarm still set that is not in ``keep`` (the caller's lock held)."""

    def submit(self, job: Callable[[], None]) -> bool:
        """Run ``job`` on a worker; False once closed (the job is dropped)."""

    def then(self, work: Callable[[], None]) -> None:
        """Run ``work`` once the current callback returns (at once on real threads)."""

    def watch(self, timeout: float, callback: Callable[[Callable[[], bool]], None]) -> Timer | None:
        """Call ``callback(replace)`` on another thread after ``timeout``, unless cancelled.

        The calling worker's call hung: ``replace()`` puts a new worker in its
        place, or returns False if too many are hung already. None if calls
        cannot hang.
        """

    def close(self) -> list[threading.Thread]:
        """Stop everything: queued work is dropped; return the threads to join."""

    def after_fork(self) -> None:
        """Forget every thread and lock: a child of fork() has none of them (no I/O)."""


# -- The clock watcher ----------------------------------------------------------


class _Watched(Protocol):
    def clock_jumped(self) -> None:
        """The wall clock moved ahead of the monotonic one: fire what is due by wall time."""


def _offsets() -> tuple[float, float]:
    """Wall minus monotonic time and, where Linux has it, boot minus monotonic time."""
    monotonic = time.monotonic()
    boot = time.clock_gettime(_BOOTTIME) - monotonic if _BOOTTIME is not None else 0.0
    return _wall() - monotonic, boot


_BOOTTIME: int | None = getattr(time, "CLOCK_BOOTTIME", None)


class _ClockWatcher:
    """One daemon thread per process that notices suspends and wall-clock steps.

    Timers wait on the monotonic clock, which stands still while the machine
    sleeps and ignores steps of the wall clock. Every ``_WATCH_INTERVAL``
    seconds, while any timer backend has a timer, this thread compares the
    wall clock (and ``CLOCK_BOOTTIME``, which counts a suspend) with the
    monotonic clock; when either moved ahead by more than ``JUMP``, it tells
    every backend, which re-arms the timers whose wall due time now comes
    first. It runs no user code and holds its lock only to read its set: a
    backend may call add() and discard() under its own lock.
    """

    _lock: threading.Condition
    _parking: Parking
    _watched: weakref.WeakSet[_Watched]
    _thread: threading.Thread | None
    _last: tuple[float, float]
    _lowest: float
    _pid: int

    def __init__(self) -> None:
        self.after_fork()

    def add(self, watched: _Watched, *, wait: bool = True) -> bool:
        """Watch for ``watched``; False if ``wait`` is False and the lock was busy.

        A caller's thread passes ``wait=False``: a signal handler may have
        interrupted the very thread that holds this process-wide lock, so it
        never waits for it (the timer's own thread registers it then).
        """
        if not self._lock.acquire(blocking=wait):
            return False
        try:
            self._watched.add(watched)
            if self._thread is not None:
                return True
            # A step right after is seen, and so is one since a timer read the
            # clock (it registers from its own thread, perhaps after the step).
            wall, boot = _offsets()
            self._last, self._lowest = (min(wall, self._lowest), boot), math.inf
            self._thread = thread = OurThread(self._run, "token-refresh-clock-watch")
            seen = self._parking.count
        finally:
            self._lock.release()
        try:
            thread.start()
        except RuntimeError:  # the OS refuses a thread: timers still keep monotonic time
            with self._lock:
                self._thread = None
            return True
        # Returns once the thread is parked (see Parking); bounded, as above.
        if self._lock.acquire(timeout=PARK_WAIT):  # pragma: no branch - held a whole second
            try:
                self._parking.wait(seen)
            finally:
                self._lock.release()
        return True

    def discard(self, watched: _Watched) -> None:
        with self._lock:
            self._watched.discard(watched)
            if not self._watched:
                self._lock.notify()  # nothing left to watch: the thread ends now

    def _run(self) -> None:
        while True:
            with self._lock:
                self._parking.parks()
                self._lock.wait(_WATCH_INTERVAL)  # cut short by discard() of the last one
                if not self._watched:
                    self._thread = None
                    return
                watched = list(self._watched)
                last, self._last = self._last, _offsets()
                # A timer armed while the wall clock was behind (set back, then
                # forward again within one interval) counts from what it read.
                since, self._lowest = min(last[0], self._lowest), math.inf
            wall, boot = self._last[0] - since, self._last[1] - last[1]
            if wall > JUMP or boot > JUMP:  # a step back changes nothing: deadlines hold
                for backend in watched:
                    backend.clock_jumped()
            del watched

    def after_fork(self) -> None:
        """Start empty: a child of fork() has no watcher thread and no timers (no I/O)."""
        self._pid = os.getpid()
        lock = threading.Lock()
        self._lock = threading.Condition(lock)
        self._parking = Parking(lock)
        self._watched = weakref.WeakSet()
        self._thread = None
        self._last = (0.0, 0.0)
        self._lowest = math.inf  # the least wall offset a timer was armed with since then

    def forked(self) -> None:
        """Start empty in a child whose fork hooks did not run (uWSGI forks in C)."""
        if self._pid != os.getpid():  # pragma: no cover - a child forked without the hooks
            self.after_fork()

    def saw(self, offset: float) -> None:
        """A timer was armed reading this wall-minus-monotonic offset (no lock: a hint)."""
        if offset < self._lowest:
            self._lowest = offset


_watcher = _ClockWatcher()
if hasattr(os, "register_at_fork"):  # pragma: no branch - not on Windows, which cannot fork
    os.register_at_fork(after_in_child=_watcher.after_fork)


def _fires_at(deadline: float, due: float) -> float:
    """The monotonic moment a timer fires: its deadline, or its wall due time if earlier."""
    offset = _wall() - time.monotonic()
    _watcher.saw(offset)
    return min(deadline, due - offset)


# -- Timers -------------------------------------------------------------------


class _SessionAlarm:
    """One daemon thread that waits for a deadline, runs a callback, and is set again.

    It lives as long as its session: after its callback ran it parks until the
    refresh it started sets it for the retry or follow-up, so a refresh chain
    never waits for a new thread to start (``Thread.start()`` waits a GIL
    switch for it, and a storm of refreshes would serialise on that).
    """

    __slots__ = (
        "__weakref__",
        "_callback",
        "_deadline",
        "_due",
        "_owner",
        "_parking",
        "_payload",
        "_state",
        "_thread",
        "_wake",
        "_wakes_at",
        "used",
    )

    def __init__(self, owner: ThreadTimers, callback: Callable[[Any], None]) -> None:
        self.used = False  # set at least once (see sweep)
        self._owner = owner
        lock = threading.Lock()
        self._wake = threading.Condition(lock)
        self._parking = Parking(lock)
        # Monotonic: its delay's end, or its wall due time if that comes first.
        self._deadline = math.inf
        self._due = math.inf
        self._callback: Callable[[Any], None] | None = callback
        self._payload: object = None
        self._state = "parked"  # or "armed", "done"
        self._wakes_at = 0.0  # when the thread wakes by itself (monotonic)
        self._thread = OurThread(self._run, owner.name)

    def start(self) -> None:
        """Start its thread; RuntimeError if the OS refuses one. The set() that follows
        returns once the thread is parked (see Parking)."""
        self._thread.start()

    def thread(self) -> threading.Thread | None:
        return self._thread if self._thread.ident is not None else None

    def set(self, delay: float, due: float, payload: object) -> None:
        """Arm it; on a caller's thread, return once its thread is parked (see Parking)."""
        self.used = True
        deadline = time.monotonic() + delay
        with self._wake:
            if self._state == "done":
                return
            self._state, self._payload = "armed", payload
            self._deadline, self._due = _fires_at(deadline, due), due
            # Else it wakes before the deadline anyway and sees it: a follow-up
            # set in a storm costs no extra thread wake-up.
            self._wake_if_earlier()

    def disarm(self) -> None:
        with self._wake:
            if self._state == "armed":
                self._state, self._payload = "parked", None

    def cancel(self) -> None:
        with self._wake:
            self._state = "done"
            # Dropped once the lock is released: it may hold the last reference
            # to its scheduler.
            callback, self._callback, self._payload = self._callback, None, None
            self._wake.notify()
        del callback

    def clock_jumped(self) -> None:
        """The wall clock moved ahead (the clock watcher's call): wake if due sooner now."""
        with self._wake:
            if self._state == "armed":
                self._deadline = _fires_at(self._deadline, self._due)
                self._wake_if_earlier()

    def _wake_if_earlier(self) -> None:
        """Wake the thread if it fires before it would wake by itself (lock held).

        A caller's thread then waits until it parked again, or first parked
        if it was still starting (see Parking).
        """
        seen = self._parking.count
        if self._deadline < self._wakes_at:
            self._wake.notify()
        elif seen:
            return  # parked: it wakes before the deadline by itself (or it fires now)
        if not on_our_thread():
            self._parking.wait(seen)

    def _run(self) -> None:
        self._owner.watch()
        with self._wake:
            while self._state != "done":
                now = time.monotonic()
                # Parked, it still wakes every _PARKED seconds: a follow-up set
                # for later than that wakes nobody (one context switch less a
                # refresh, which a storm of them feels).
                remaining = self._deadline - now if self._state == "armed" else _PARKED
                if remaining > 0:
                    wait = min(remaining, threading.TIMEOUT_MAX)
                    self._wakes_at = now + wait
                    self._parking.parks()
                    self._wake.wait(wait)
                    continue
                callback, payload = self._callback, self._payload
                self._state, self._payload = "parked", None
                assert callback is not None
                self._parking.parks()  # it fires: work a caller may wait for
                self._wake.release()
                try:
                    self._owner.fire(callback, payload)
                finally:
                    del callback, payload
                    self._wake.acquire()
            self._parking.parks()  # it ends
        self._owner.finished()  # its lock released: the owner's lock comes first


class ThreadTimers:
    """One daemon thread per live session, set again along its refresh chain."""

    def __init__(self, name: str, *, workers: Workers | None = None) -> None:
        self.name = name
        self._workers = workers
        # Every started alarm not yet garbage: stop() cancels and joins them all.
        self._started: weakref.WeakSet[_SessionAlarm] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._live = 0  # alarm threads started and not ended: watched while there are any
        self._watched = False

    def add(self, alarm: _SessionAlarm) -> None:
        """A new alarm, on the caller's thread: watched at once if the watcher's lock is free.

        Registered before schedule() returns, so that no thread of ours is
        still busy with it when a pre-fork server forks without Python's
        fork hooks (uWSGI), which can leave a child waiting for the GIL.
        """
        with self._lock:
            self._started.add(alarm)
            self._live += 1
            unwatched = not self._watched
        if unwatched:
            self._watched = _watcher.add(self, wait=False)

    def watch(self) -> None:
        """An alarm's thread started: register now if the caller could not.

        No lock of ours is held while this thread waits for the watcher's.
        """
        if self._live and not self._watched:
            self._watched = _watcher.add(self)

    def fire(self, callback: Callable[[Any], None], payload: object) -> None:
        """Run an alarm's callback on its thread; what it submits joins the workers' backlog
        (a worker is woken only if none runs it)."""
        workers = self._workers
        if workers is not None:
            workers.gather()
        try:
            callback(payload)
        except BaseException as error:
            _internal_error(error)
        finally:
            if workers is not None:
                workers.hand_over()

    def finished(self) -> None:
        """An alarm's thread ended (or never started)."""
        with self._lock:
            self._live -= 1
            if self._live:
                return
            self._watched = False
        _watcher.discard(self)
        came_meanwhile = self._live > 0  # an alarm added while the lock was released
        if came_meanwhile:
            self._watched = _watcher.add(self)

    def clock_jumped(self) -> None:
        with self._lock:
            alarms = list(self._started)
        for alarm in alarms:  # each under its own lock only, never under ours
            alarm.clock_jumped()

    def alarm(self, callback: Callable[[Any], None]) -> Alarm:
        alarm = _SessionAlarm(self, callback)
        self.add(alarm)
        try:
            alarm.start()
        except RuntimeError:
            self.finished()
            raise
        return alarm

    def sweep(self, keep: Collection[Alarm]) -> None:
        with self._lock:
            alarms = list(self._started)
        for alarm in alarms:
            if alarm.used and alarm not in keep:
                alarm.cancel()

    def stop(self) -> list[threading.Thread]:
        """Cancel every alarm; return their threads to join."""
        with self._lock:
            alarms = list(self._started)
        for alarm in alarms:
            alarm.cancel()
        return [thread for alarm in alarms if (thread := alarm.thread()) is not None]


#: An entry armed with no payload calls its callback with no argument.
_NO_PAYLOAD: Final[Any] = object()


class _HeapEntry:
    """A timer in a HeapTimers heap; cancelling it leaves it there to be skipped.

    It calls ``callback(payload)`` when it fires, or ``callback()`` without
    one: a pending session holds no ``functools.partial`` of its own. An
    alarm's entry names it, for sweep().
    """

    __slots__ = ("alarm", "callback", "deadline", "due", "owner", "payload")

    def __init__(
        self,
        owner: HeapTimers,
        callback: Callable[..., None] | None,
        deadline: float,
        due: float,
        payload: object = _NO_PAYLOAD,
        alarm: _HeapAlarm | None = None,
    ) -> None:
        self.owner = owner
        self.alarm = alarm
        self.callback: Callable[..., None] | None = callback
        self.payload = payload
        self.deadline = deadline  # monotonic
        self.due = due  # wall time

    def cancel(self) -> None:
        if self.callback is not None:  # fired or cancelled already: no lock to take
            self.owner._cancel(self)


class _HeapAlarm:
    """A session's alarm on a HeapTimers: setting it replaces its entry in the heap.

    No lock of its own, and no reference from the heap but its entry's (a
    lock and a weak reference per pending session add up): the scheduler
    calls ``set``, ``disarm`` and ``cancel`` under its own lock, but for
    ``cancel`` on an alarm no session got, which nobody else sets
    (``cancel`` is idempotent, and an entry's own cancel takes the heap's lock).
    """

    __slots__ = ("_callback", "_entry", "_heap")

    def __init__(self, heap: HeapTimers, callback: Callable[[Any], None]) -> None:
        self._heap = heap
        self._callback: Callable[[Any], None] | None = callback
        self._entry: Timer | None = None

    def set(self, delay: float, due: float, payload: object) -> None:
        if self._callback is None:
            return
        old, self._entry = self._entry, None
        if old is not None:
            old.cancel()
        self._entry = self._heap.arm(delay, self._callback, due, payload, self)
        # The heap's thread starts with its first entry in place, so it waits for
        # it at once: a thread woken again just after schedule() returns can be
        # holding the GIL when a pre-fork server forks without Python's hooks
        # (uWSGI), and that child then waits for the GIL for ever. Once only;
        # RuntimeError if the OS refuses the thread (schedule() then raises).
        self._heap.start()

    def disarm(self) -> None:
        entry, self._entry = self._entry, None
        if entry is not None:
            entry.cancel()

    def cancel(self) -> None:
        entry, self._entry, self._callback = self._entry, None, None
        if entry is not None:
            entry.cancel()


class HeapTimers:
    """All of a scheduler's timers on one daemon thread: a deadline heap and a Condition.

    Cancelled entries stay in the heap (cancelling is O(1)) and are skipped
    when they surface; the heap is rebuilt when more than half of it is dead.
    Given ``workers``, the thread runs every timer due at once in a row and
    adds what they submit to the workers' backlog in one go: one hand-off for
    a storm's worth of refreshes, not one each.
    """

    def __init__(
        self, name: str, *, watch_clock: bool = True, workers: Workers | None = None
    ) -> None:
        self.name = name
        self._watch_clock = watch_clock  # a timer's due time counts: watch for clock jumps
        self._watched = False
        self._workers = workers
        # (when it fires on the monotonic clock, sequence, entry): the earlier
        # of the entry's deadline and its due time, recomputed on a clock jump.
        self._heap: list[tuple[float, int, _HeapEntry]] = []
        # Entries armed and not yet in the heap: any thread appends, the heap's
        # thread (or whoever holds the lock) moves them into the heap.
        self._inbox: collections.deque[tuple[float, int, _HeapEntry]] = collections.deque()
        self._sequence = itertools.count()
        self._cancelled = 0
        # The condition's own lock, for a cancel (a Condition's ``with`` runs Python code).
        self._lock = lock = threading.Lock()
        self._wakeup = threading.Condition(lock)
        self._parking = Parking(lock)
        # When the thread wakes by itself (monotonic; 0 while it is awake): a
        # timer that fires later wakes nobody.
        self._wakes_at = 0.0
        self._thread: threading.Thread | None = None
        self._thread_started = False
        self._stopped = False

    def arm(
        self,
        delay: float,
        callback: Callable[..., None],
        due: float = math.inf,
        payload: object = _NO_PAYLOAD,
        alarm: _HeapAlarm | None = None,
    ) -> Timer:
        """Run ``callback`` (with ``payload``, if given) after ``delay``, or at wall time
        ``due`` if that comes first; ``alarm``: the alarm it is set for."""
        if self._stopped:
            return _HeapEntry(self, None, math.inf, due)  # never fires
        entry = _HeapEntry(self, callback, time.monotonic() + delay, due, payload, alarm)
        fires_at = _fires_at(entry.deadline, due)
        if self._watch_clock and not self._watched:
            with self._wakeup:
                if not self._watched and not self._stopped:  # pragma: no branch - a race
                    # Never waiting on the caller's thread (see _ClockWatcher.add);
                    # if the watcher is busy, the heap's thread registers instead.
                    self._watched = _watcher.add(self, wait=False)
        # No lock: the heap's thread takes new entries from the inbox before it
        # sleeps (a worker arming a follow-up never waits for that thread, nor
        # it for the worker), and one due after it wakes by itself wakes nobody.
        self._inbox.append((fires_at, next(self._sequence), entry))
        if fires_at < self._wakes_at:  # read after the append: see _sleep
            with self._wakeup:
                self._wakeup.notify()  # due before the thread would wake by itself
                if not on_our_thread():  # a caller's: wait until it parked again
                    self._parking.wait(self._parking.count)
        return entry

    def alarm(self, callback: Callable[[Any], None]) -> Alarm:
        return _HeapAlarm(self, callback)

    def sweep(self, keep: Collection[Alarm]) -> None:
        """Cancel every alarm set to fire that is not in ``keep``: an alarm that fires
        nothing is one nobody holds (or will set again) but a session."""
        with self._lock:  # the heap's thread pushes and pops meanwhile
            entries = [item[2] for item in itertools.chain(self._heap, self._inbox)]
        for entry in entries:
            alarm = entry.alarm
            if entry.callback is not None and alarm is not None and alarm not in keep:
                alarm.cancel()

    def _take_inbox(self) -> None:
        """Move the entries armed meanwhile into the heap (lock held)."""
        inbox, heap = self._inbox, self._heap
        while inbox:
            heapq.heappush(heap, inbox.popleft())

    def clock_jumped(self) -> None:
        with self._wakeup:
            self._take_inbox()
            self._heap = [
                (_fires_at(entry.deadline, entry.due), sequence, entry)
                for _, sequence, entry in self._heap
                if entry.callback is not None
            ]
            heapq.heapify(self._heap)
            self._cancelled = 0
            self._wakeup.notify()

    def _watch(self, watch: bool) -> bool:
        """Register with the clock watcher, or leave it (the heap's thread, its lock held).

        True if it did, with the heap's lock released meanwhile: this thread
        never waits for the watcher's process-wide lock while holding a lock
        a caller may need.
        """
        if not self._watch_clock or watch == self._watched:
            return False
        self._watched = watch
        self._wakeup.release()
        try:
            if watch:
                _watcher.add(self)
            else:
                _watcher.discard(self)
        finally:
            self._wakeup.acquire()
        return True

    def start(self) -> None:
        """Start the heap's thread if nobody has (lock not held); RuntimeError if refused."""
        if self._thread_started:
            return  # the common case, read without the lock (checked again under it below)
        with self._wakeup:
            if self._thread_started or self._stopped:
                return
            self._thread_started = True
            thread = self._thread = OurThread(self._run, self.name)
        try:
            thread.start()
        except RuntimeError:
            with self._wakeup:
                self._thread = None
                self._thread_started = False
            raise
        with self._wakeup:
            self._parking.wait(0)  # returns once it is parked (see Parking)

    def _cancel(self, entry: _HeapEntry) -> None:
        with self._lock:
            if (
                entry.callback is None
            ):  # pragma: no cover - fired or cancelled since cancel() looked
                return
            # Dropped after the lock, see stop().
            callback, payload = entry.callback, entry.payload
            entry.callback = entry.payload = entry.alarm = None
            self._cancelled += 1
            if self._cancelled > 64 and self._cancelled * 2 > len(self._heap):
                self._take_inbox()  # the dead entries it holds are counted too
                self._heap = [item for item in self._heap if item[2].callback is not None]
                heapq.heapify(self._heap)
                self._cancelled = 0
        del callback, payload

    def stop(self) -> list[threading.Thread]:
        """Stop the timer thread (pending timers never fire); return it to join."""
        with self._wakeup:
            self._stopped = True
            dropped, self._heap = self._heap, []  # cleared after the lock, as in cancel()
            self._inbox.clear()
            self._cancelled = 0
            self._wakeup.notify()
            thread = self._thread if self._thread_started else None
        dropped.clear()
        return [] if thread is None else [thread]

    def _run(self) -> None:
        with self._wakeup:
            while not self._stopped:
                self._take_inbox()
                # Watched while it has timers (registering releases the lock).
                if self._watch(bool(self._heap)):
                    continue
                now = time.monotonic()
                due = self._take_due(now)
                if due:
                    self._fire(due)
                    continue
                self._sleep(now, self._heap[0][0] - now if self._heap else math.inf)
            self._watch(False)
            self._parking.parks()  # it ends

    def _sleep(self, now: float, wait: float) -> None:
        """Wait until the next timer fires (``wait`` seconds), or a sooner one is armed."""
        wait = min(wait, threading.TIMEOUT_MAX)
        self._wakes_at = now + wait
        try:
            # An entry armed before _wakes_at was set did not notify: look first.
            if not self._inbox:  # pragma: no branch - armed in the last few bytecodes
                self._parking.parks()
                self._wakeup.wait(None if wait == math.inf else wait)
        finally:
            self._wakes_at = 0.0

    def _take_due(self, now: float) -> list[Callable[[], None]]:
        """Take up to _BATCH timers due by ``now`` off the heap, and drop cancelled ones."""
        heap = self._heap
        due: list[Callable[[], None]] = []
        while heap and len(due) < _BATCH:
            fires_at, _, entry = heap[0]
            if entry.callback is None:
                heapq.heappop(heap)
                self._cancelled -= 1
            elif fires_at <= now:
                heapq.heappop(heap)
                callback, payload = entry.callback, entry.payload
                entry.callback = entry.payload = entry.alarm = None
                due.append(
                    callback if payload is _NO_PAYLOAD else functools.partial(callback, payload)
                )
            else:
                break
        return due

    def _fire(self, due: list[Callable[[], None]]) -> None:
        """Run the callbacks of due timers (lock released); what they submit goes in one go."""
        self._parking.parks()  # it fires: work a caller may wait for
        self._wakeup.release()  # never run a callback holding the heap's lock
        workers = self._workers
        try:
            if workers is not None:
                workers.gather()
            _call_each(due)
        finally:
            due.clear()  # an idle thread must not keep its scheduler alive
            if workers is not None:
                workers.hand_over()
            self._wakeup.acquire()


# -- Runtimes -----------------------------------------------------------------


class ThreadRuntime:
    """Real threads: a timer backend, a worker pool and, for hung calls, a watchdog."""

    def __init__(self, name: str, *, timers: str, max_workers: int) -> None:
        self._name = name
        self._timer_kind = timers
        self._max_workers = max_workers
        self.after_fork()

    def after_fork(self) -> None:
        _watcher.forked()  # the inherited watcher's lock may be held by a thread not here
        self._watchdog = Watchdog(f"{self._name}-watchdog")
        self._workers = Workers(
            f"{self._name}-worker", self._max_workers, self._max_workers, self._watchdog
        )
        self._timers: ThreadTimers | HeapTimers = (
            ThreadTimers(self._name, workers=self._workers)
            if self._timer_kind == "thread"
            else HeapTimers(self._name, workers=self._workers)
        )

    def time(self) -> float:
        return _wall()

    def monotonic(self) -> float:
        return time.monotonic()

    def alarm(self, callback: Callable[[Any], None]) -> Alarm:
        return self._timers.alarm(callback)

    def sweep(self, keep: Collection[Alarm]) -> None:
        self._timers.sweep(keep)

    def submit(self, job: Callable[[], None]) -> bool:
        return self._workers.submit(job)

    def then(self, work: Callable[[], None]) -> None:
        work()

    def watch(self, timeout: float, callback: Callable[[Callable[[], bool]], None]) -> Timer | None:
        replace = functools.partial(self._workers.abandon, threading.current_thread())
        timeout = min(timeout, threading.TIMEOUT_MAX)
        return self._watchdog.watch(timeout, functools.partial(callback, replace))

    def close(self) -> list[threading.Thread]:
        return self._workers.close() + self._watchdog.stop() + self._timers.stop()


# -- The reaper -----------------------------------------------------------------


class _Reaper:
    """Closes the runtimes of schedulers collected without close(), on a thread of its own.

    A ``weakref.finalize`` callback runs on whatever thread the garbage
    collector interrupted, between any two bytecodes, perhaps while that thread
    holds a lock the close would take: so the finalizer only puts the runtime
    on a ``SimpleQueue`` (documented as safe there), and this thread closes it.
    It runs while any scheduler with real threads is open, and ends after.
    """

    def __init__(self) -> None:
        self.after_fork()

    def after_fork(self) -> None:
        """Start empty in a child of fork() (no I/O)."""
        self._pid = os.getpid()
        self._queue: queue.SimpleQueue[Callable[[], object] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # Only the thread and ensure() take it, never a finalizer (see Parking).
        self._lock = threading.Lock()
        self._parking = Parking(self._lock)

    def later(self, work: Callable[[], object]) -> None:
        """For a finalizer or a signal handler: takes no lock and never blocks."""
        self._queue.put(work)

    def wake(self) -> None:
        """A scheduler was closed: the thread ends if that was the last open one."""
        self._queue.put(None)

    def ensure(self, live: Callable[[], bool]) -> None:
        """Have the thread running (a scheduler made its first timer, on the caller's thread)."""
        if self._pid != os.getpid():  # pragma: no cover - a child forked without the hooks
            self.after_fork()
        thread = self._thread
        # Asked, not assumed: a thread the OS refused, or that an error ended, or
        # whose start() a signal handler interrupted (it may run all the same).
        if thread is not None and thread.is_alive():
            return
        self._thread = thread = OurThread(self._run, "token-refresh-reaper", args=(live,))
        seen = self._parking.count
        thread.start()
        # Returns once it is parked (see Parking), bounded: a signal handler may
        # have interrupted this very thread in here.
        if self._lock.acquire(timeout=PARK_WAIT):  # pragma: no branch - held a whole second
            try:
                self._parking.wait(seen)
            finally:
                self._lock.release()

    def _run(self, live: Callable[[], bool]) -> None:
        try:
            self._serve(live)
        except BaseException as error:  # a bug of ours: logged by type (ensure() starts another)
            _internal_error(error)

    def _serve(self, live: Callable[[], bool]) -> None:
        me = threading.current_thread()
        while True:
            with self._lock:
                self._parking.parks()
            work = self._queue.get()
            if work is not None:
                try:
                    work()
                except BaseException as error:
                    _internal_error(error)
            del work  # a closed runtime must not linger here
            if live():
                continue
            # Cleared before the last look, so that a scheduler made meanwhile
            # either is seen here or starts a thread of its own.
            if self._thread is me:
                self._thread = None
            if not live() and self._queue.empty():
                return
            if self._thread is not None:
                return  # a scheduler made meanwhile started another: it serves the queue
            self._thread = me


reaper = _Reaper()
if hasattr(os, "register_at_fork"):  # pragma: no branch - not on Windows, which cannot fork
    os.register_at_fork(after_in_child=reaper.after_fork)
