"""The worker side of a runtime: a small pool of daemon workers and a watchdog for hung calls.

:class:`Workers` runs refreshes, one backlog at a time for work that timers
hand over together; :class:`Watchdog` calls back for calls still running at
their deadline. Both take no lock per refresh that another of our threads
holds for long (see ``_runtime.py`` for the timers that feed them).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import heapq
import itertools
import logging
import math
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import Final, Protocol

_log = logging.getLogger("token_refresh")

#: Seconds that interpreter exit waits, in all, for refresh work already running.
EXIT_GRACE = 1.0

# When a job of the workers' backlog has run this long (seconds), one more
# worker joins (the watchdog looks).
_STALLED = 0.05


#: The longest a caller's thread waits for a thread of ours to park (seconds).
PARK_WAIT = 1.0


class Timer(Protocol):
    def cancel(self) -> None: ...


class OurThread(threading.Thread):
    """A daemon thread of the library's; any other thread is a caller's."""

    def __init__(
        self, target: Callable[..., object], name: str, args: tuple[object, ...] = ()
    ) -> None:
        super().__init__(target=target, name=name, args=args, daemon=True)


def on_our_thread() -> bool:
    """Whether the current thread is one of the library's (a worker, a timer, ...)."""
    return isinstance(threading.current_thread(), OurThread)


class Parking:
    """A thread of ours says when it parks; the caller's thread that started or woke it waits.

    uWSGI's default mode forks its workers in C without taking the GIL: its C
    code holds the GIL from the end of the app's import and lets go of it just
    to fork. A thread of ours that a ``schedule()`` at import started or woke,
    and that has not parked yet, takes the GIL right then, and the child waits
    for it for ever. So a call on a caller's thread that starts or wakes one of
    ours returns only once that thread parked again (or began to fire what is
    due, which is work the call asked for). Threads of ours never wait here:
    a storm's follow-ups would each pay a context switch.

    The thread calls :meth:`parks` under the lock it is about to wait on; the
    caller calls :meth:`wait` under the same lock. A thread between the two
    runs no bytecode that lets another thread take the GIL, short of the OS
    holding it off for a whole switch interval there.
    """

    __slots__ = ("_awaited", "_lock", "_parked", "count")

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        # Made by the first caller to wait: a session's alarm makes one each,
        # and few are ever waited for.
        self._parked: threading.Condition | None = None
        self.count = 0  # how often the thread parked (or began to fire)
        self._awaited = 0  # callers waiting

    def parks(self) -> None:
        """The thread is about to wait, fire, or end (the lock held, on that thread)."""
        self.count += 1
        if self._awaited:
            assert self._parked is not None
            self._parked.notify_all()

    def wait(self, seen: int) -> None:
        """Until the thread parked since it counted ``seen`` (the lock held), at most PARK_WAIT."""
        parked = self._parked
        if parked is None:
            parked = self._parked = threading.Condition(self._lock)
        self._awaited += 1
        try:
            parked.wait_for(lambda: self.count != seen, PARK_WAIT)
        finally:
            self._awaited -= 1


def _call_each(callbacks: list[Callable[[], None]]) -> None:
    """Call each callback in turn: a bug in one is logged by type and the rest still run."""
    for callback in callbacks:
        try:
            callback()
        except BaseException as error:
            _internal_error(error)


def _internal_error(error: BaseException) -> None:
    """Log a bug in the library's own callbacks (they report user errors themselves).

    By type only, with no traceback: a message or a frame may quote a session id or a token.
    """
    with contextlib.suppress(BaseException):  # a log handler that raises cannot stop a thread
        _log.error(
            "[token_refresh] internal error in a timer or worker thread: %s",
            type(error).__name__,
        )


class _Drain:
    """Put on a pool's queue: the worker that gets it runs the backlog."""


_DRAIN: Final = _Drain()


class Workers:
    """A small pool of daemon worker threads, started as work arrives.

    Unlike ``concurrent.futures.ThreadPoolExecutor``, whose workers the
    interpreter joins at exit without a bound, these are daemons: at exit,
    work not yet started is dropped and running work gets :data:`EXIT_GRACE`
    seconds. A worker whose call hung can be abandoned: it no longer counts,
    and a new one takes its place, up to ``max_stuck`` abandoned at once.
    """

    def __init__(
        self, name: str, max_workers: int, max_stuck: int, watchdog: Watchdog | None = None
    ) -> None:
        self.pid = os.getpid()
        # Looks at the backlog _STALLED after work joined a worker already running it.
        self._watchdog = watchdog
        self._looking = False  # a look is due
        self._name = name
        self._max_workers = max_workers
        self._max_stuck = max_stuck
        # Timer threads only put() on this queue, which takes no lock of ours:
        # thousands of them firing together do not queue on one.
        self._jobs: queue.SimpleQueue[Callable[[], None] | _Drain | None] = queue.SimpleQueue()
        # What submit() collects on a thread that gathers, by thread ident. Not
        # a threading.local: each of a storm's thousands of timer threads would
        # make its own dict, weakref and dummy the first time it fires (three
        # objects for the garbage collector per refresh, which ran its young
        # generations 5 times as often, and held them for as long as the thread).
        self._gathering: dict[int, list[Callable[[], None]]] = {}
        # Work a timer thread handed over in one go, run in order by one worker
        # with no hand-off between jobs; a second worker joins only when the
        # latest job has run _STALLED (hung, or slow: it holds up the rest).
        self._backlog: collections.deque[Callable[[], None]] = collections.deque()
        self._draining = 0  # workers running the backlog (changed under _cond, read without)
        # A worker was woken to run the backlog and has not begun yet: until it
        # does, more work handed over wakes no other (it may wait for the GIL
        # for a while beside a busy thread; idle workers would drain beside it).
        self._summoned = False
        self._job_began = 0.0  # when the backlog's latest job began (monotonic)
        self._cond = threading.Condition(threading.Lock())  # for what follows
        self._threads: set[threading.Thread] = set()  # counted workers
        self._abandoned: set[threading.Thread] = set()  # hung, not counted
        self._running = 0
        self._closed = False
        _live_pools.add(self)

    def submit(self, job: Callable[[], None]) -> bool:
        if self._closed:
            return False
        gathered = self._gathering.get(threading.get_ident()) if self._gathering else None
        if gathered is not None:
            gathered.append(job)  # handed over with the rest by hand_over()
            return True
        self._jobs.put(job)
        if len(self._threads) < self._max_workers:  # a full pool never takes the lock
            self._grow()
        return not self._closed  # closed meanwhile: close() may have missed it

    def gather(self) -> None:
        """Collect what this thread submits from now on, for hand_over()."""
        self._gathering[threading.get_ident()] = []

    def hand_over(self) -> None:
        """Add what this thread gathered to the backlog; wake a worker if none runs it."""
        jobs = self._gathering.pop(threading.get_ident(), None)
        if not jobs or self._closed:
            return
        self._backlog.extend(jobs)
        # Read after the extend: a worker that stops draining looks at the
        # backlog again after it stops counting (see _drain).
        if not self._draining and not self._summoned:
            self._job_began = time.monotonic()
            self._summoned = True
            self._wake_drainer()
        if not self._looking:
            self._look_later()  # in case a job of it hangs

    def _look_later(self) -> None:
        """Have the watchdog look at the backlog in _STALLED (one look pending at a time)."""
        self._looking = True
        if self._watchdog is None or self._watchdog.watch(_STALLED, self._look) is None:
            self._looking = False
            self._wake_drainer()  # nobody can look later: another worker joins now

    def _look(self) -> None:
        """The watchdog's look: while work waits, if its latest job began _STALLED ago
        (hung, or slow), one more worker joins; look again while any waits."""
        self._looking = False
        if self.backlog(time.monotonic()):
            self._look_later()

    def backlog(self, now: float) -> bool:
        """Whether handed-over work waits; if its latest job began _STALLED ago, one more
        worker joins."""
        if not self._backlog or self._closed:
            return False
        if now - self._job_began >= _STALLED:
            self._job_began = now  # once per _STALLED at most
            self._wake_drainer()
        return True

    def _wake_drainer(self) -> None:
        self._jobs.put(_DRAIN)
        # A worker is woken only if one waits; a new one starts only if none does.
        if len(self._threads) < self._max_workers and self._running >= len(self._threads):
            self._grow()

    def _grow(self) -> None:
        """Start one more worker, if there is room (lock not held)."""
        with self._cond:
            if self._closed or len(self._threads) >= self._max_workers:  # pragma: no cover
                return  # closed, or another submitter grew it first
            thread = OurThread(self._work, self._name)
            self._threads.add(thread)
        try:
            thread.start()
        except RuntimeError:
            with self._cond:  # the OS refused; the queued work waits for another worker
                self._threads.discard(thread)

    def _work(self) -> None:
        me = threading.current_thread()
        while (job := self._jobs.get()) is not None and not self._closed:
            with self._cond:
                self._running += 1
            try:
                if isinstance(job, _Drain):
                    self._drain()
                else:
                    job()
            except BaseException as error:
                _internal_error(error)
            del job  # an idle worker must not keep its scheduler alive
            with self._cond:
                self._running -= 1
                self._cond.notify_all()
                if me in self._abandoned:
                    self._abandoned.discard(me)
                    if len(self._threads) >= self._max_workers:
                        return  # replaced while it hung
                    self._threads.add(me)
        with self._cond:
            self._threads.discard(me)

    def _drain(self) -> None:
        """Run the backlog until it is empty, or until this worker was replaced."""
        while True:
            with self._cond:
                self._draining += 1
            self._summoned = False  # counted first: hand_over() sees one or the other
            try:
                replaced = self._run_backlog()
            finally:
                with self._cond:
                    self._draining -= 1
            # Work handed over after the backlog looked empty, but before this
            # worker stopped counting, woke nobody: run it too, unless it woke
            # a worker after all (a replaced worker only if no other runs it).
            left = self._summoned or (replaced and self._draining > 0)
            done = self._closed or not self._backlog or left
            if done:  # pragma: no branch - a narrow race
                return

    def _run_backlog(self) -> bool:
        """Run jobs off the backlog until it is empty (False), or until a job of this
        worker's ran _STALLED while another drained (True: it was replaced)."""
        backlog = self._backlog
        while not self._closed:
            try:
                job = backlog.popleft()  # another worker may run the backlog too
            except IndexError:
                return False
            self._job_began = began = time.monotonic()
            try:
                job()
            except BaseException as error:
                _internal_error(error)
            del job
            # A worker joined because this job stalled (hung, slow, or only
            # waiting for the GIL beside a busy thread): one drainer is enough
            # again. Two would contend for every lock, and beside a CPU-bound
            # thread each contended lock costs a 5 ms switch interval: a storm
            # that had one slow token request fell behind for good.
            if self._draining > 1 and time.monotonic() - began >= _STALLED:
                return True
        return False

    def abandon(self, worker: threading.Thread) -> bool:
        with self._cond:
            if worker not in self._threads:
                return True  # finished meanwhile
            if len(self._abandoned) >= self._max_stuck:
                return False  # too many hung: the pool shrinks instead of growing
            self._threads.discard(worker)
            self._abandoned.add(worker)
        self._grow()
        return True

    def close(self) -> list[threading.Thread]:
        with self._cond:
            self._closed = True
            self._backlog.clear()
            threads = [t for t in self._threads | self._abandoned if t.ident is not None]
            wake = len(self._threads) + len(self._abandoned)
        dropped = []  # cleared after the lock (see _SessionTimer.cancel)
        with contextlib.suppress(queue.Empty):
            while True:
                dropped.append(self._jobs.get_nowait())
        dropped.clear()
        for _ in range(wake):
            self._jobs.put(None)  # one for every worker blocked in get()
        return threads

    def wait_idle(self, deadline: float) -> None:  # pragma: no cover - called by _at_exit
        """Wait until no job is running, or until ``deadline`` (monotonic)."""
        with self._cond:
            while self._running and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)


_live_pools: weakref.WeakSet[Workers] = weakref.WeakSet()


@atexit.register
def _at_exit() -> None:  # pragma: no cover - runs at interpreter exit (TestPromptExit)
    """Drop refreshes not yet started; give running ones EXIT_GRACE seconds in all."""
    # A pool inherited through fork() counts work whose threads this process never had.
    pools = [pool for pool in list(_live_pools) if pool.pid == os.getpid()]
    for pool in pools:
        pool.close()
    deadline = time.monotonic() + EXIT_GRACE
    for pool in pools:
        pool.wait_idle(deadline)


# -- The watchdog ---------------------------------------------------------------


class _Watch:
    """A watched call: cancelling it is one store, with no lock and no wake-up."""

    __slots__ = ("callback", "deadline")

    def __init__(self, callback: Callable[[], None], deadline: float) -> None:
        self.callback: Callable[[], None] | None = callback
        self.deadline = deadline  # monotonic

    def cancel(self) -> None:
        self.callback = None  # the watchdog drops it when it next looks


class Watchdog:
    """One daemon thread that calls back for calls still running at their deadline.

    Made for a storm: watching a call appends to a deque and wakes nobody
    unless the thread would otherwise sleep past the new deadline (it sleeps
    until the earliest deadline it knows of, and every call watched later
    ends later), and cancelling is one store. So a burst of refreshes costs
    the thread one wake-up per deadline that passes, not one per call.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._inbox: collections.deque[_Watch] = collections.deque()
        self._wake = threading.Condition(threading.Lock())
        # When the thread wakes by itself (monotonic): inf while it waits for
        # a first watch, 0 while it is awake (it looks at the inbox before it sleeps).
        self._wakes_at = math.inf
        self._linger = 0.0  # the latest timeout a call was watched for
        self._thread: threading.Thread | None = None
        self._stopped = False

    def watch(self, timeout: float, callback: Callable[[], None]) -> Timer | None:
        """Call ``callback`` after ``timeout`` unless cancelled; None if no thread can watch."""
        watch = _Watch(callback, time.monotonic() + timeout)
        self._linger = timeout
        self._inbox.append(watch)
        # Read after the append; the thread sets it before it reads the inbox.
        if watch.deadline < self._wakes_at:
            with self._wake:
                if self._thread is None and not self._stopped and not self._start():
                    watch.cancel()
                    return None
                self._wake.notify()
        return watch

    def _start(self) -> bool:
        """Start the thread (lock held): False if the OS refuses it."""
        thread = OurThread(self._run, self._name)
        try:
            thread.start()
        except RuntimeError:
            return False
        self._thread = thread
        return True

    def stop(self) -> list[threading.Thread]:
        """Stop watching (nothing more is called back); return the thread to join."""
        with self._wake:
            self._stopped = True
            self._inbox.clear()
            self._wake.notify()
            return [] if self._thread is None else [self._thread]

    def _run(self) -> None:
        watched: list[tuple[float, int, _Watch]] = []  # a heap, this thread's own
        sequence = itertools.count()
        with self._wake:
            while not self._stopped:
                self._wakes_at = 0.0  # awake: a watch added now wakes nobody
                took = bool(self._inbox)
                while self._inbox:
                    watch = self._inbox.popleft()
                    if watch.callback is not None:  # a call that returned meanwhile is dropped
                        heapq.heappush(watched, (watch.deadline, next(sequence), watch))
                now = time.monotonic()
                due = self._due(watched, now)
                if due:
                    self._call(due)
                    continue
                if watched:
                    wakes_at = watched[0][0]
                elif took:
                    # Nothing left to watch, but calls keep coming: sleep as long as
                    # a call is watched for, and the next ones, which end later
                    # still, wake nobody (a wake-up per fetch, else).
                    wakes_at = now + self._linger
                else:
                    wakes_at = math.inf
                self._wakes_at = wakes_at
                if self._inbox:  # pragma: no cover - a watch came in the last few bytecodes
                    continue  # before _wakes_at was set: it may be earlier
                wait = min(wakes_at - now, threading.TIMEOUT_MAX)
                self._wake.wait(None if wakes_at == math.inf else wait)
            del watched

    @staticmethod
    def _due(watched: list[tuple[float, int, _Watch]], now: float) -> list[Callable[[], None]]:
        """Take the calls past their deadline off the heap, and drop the cancelled ones."""
        due = []
        while watched and (watched[0][2].callback is None or watched[0][0] <= now):
            callback, watched[0][2].callback = watched[0][2].callback, None
            heapq.heappop(watched)
            if callback is not None:
                due.append(callback)
        return due

    def _call(self, due: list[Callable[[], None]]) -> None:
        """Run the callbacks of calls past their deadline, the lock released."""
        self._wake.release()
        try:
            _call_each(due)
        finally:
            due.clear()
            self._wake.acquire()
