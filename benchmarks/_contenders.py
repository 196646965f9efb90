"""The schedulers under test, each behind one small interface.

A contender holds one pending timer per session id. ``schedule()`` arms (or
replaces) the session's timer for a wall-clock instant, ``cancel()`` drops it,
``close()`` stops everything and waits for the contender's threads. When a
timer fires, the contender calls ``on_fire(session_id)`` on the thread where
user code would run (for token_refresh: just before ``get_access_token``).
A contender's ``delivered`` factory, where it has one, calls ``on_fire``
where the refreshed token is delivered instead (token_refresh: in
``on_refresh``); for the others the callback is the delivery.
"""

from __future__ import annotations

import heapq
import inspect
import itertools
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol

FireCallback = Callable[[str], None]


class Unavailable(Exception):
    """This contender cannot run here (a backend not built yet, a missing package)."""


class Contender(Protocol):
    def schedule(self, session_id: str, due: float, token: str) -> None:
        """Arm or replace the session's timer for wall time ``due``; ``token``'s exp is ``due``."""

    def cancel(self, session_id: str) -> None:
        """Drop the session's pending timer."""

    def close(self) -> None:
        """Drop every timer and wait for the contender's threads to end."""


class HeapTimer:
    """The best-case reference: one thread, a deadline heap and a Condition.

    Cancelled and replaced entries stay in the heap (lazy deletion) and are
    skipped when they reach the top; the heap is rebuilt when they outnumber
    the live ones, so memory stays proportional to the pending sessions.
    """

    def __init__(self, on_fire: FireCallback) -> None:
        self._on_fire = on_fire
        self._heap: list[tuple[float, int, str]] = []  # (monotonic deadline, seq, session)
        self._live: dict[str, int] = {}  # session -> seq of its live entry
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="bare-heap", daemon=True)
        self._thread.start()

    def schedule(self, session_id: str, due: float, token: str) -> None:
        deadline = time.monotonic() + (due - time.time())
        seq = next(self._seq)
        with self._cond:
            self._live[session_id] = seq
            heapq.heappush(self._heap, (deadline, seq, session_id))
            if self._heap[0][1] == seq:
                self._cond.notify()  # a new earliest deadline: the thread waits too long
            if len(self._heap) > 2 * len(self._live) + 1024:
                self._heap = [e for e in self._heap if self._live.get(e[2]) == e[1]]
                heapq.heapify(self._heap)

    def cancel(self, session_id: str) -> None:
        with self._cond:
            self._live.pop(session_id, None)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._live.clear()
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    while self._heap and self._live.get(self._heap[0][2]) != self._heap[0][1]:
                        heapq.heappop(self._heap)
                    if not self._heap:
                        self._cond.wait()
                        continue
                    delay = self._heap[0][0] - time.monotonic()
                    if delay <= 0:
                        break
                    self._cond.wait(delay)
                _, _, session_id = heapq.heappop(self._heap)
                del self._live[session_id]
            self._on_fire(session_id)  # outside the lock, as a real scheduler must


class FloorLoop:
    """The floor: one thread that calls ``on_fire`` for each due session, in deadline order.

    No lock, no hand-off, no worker: what one thread can do. It re-sorts the
    deadlines whenever ``schedule()`` or ``cancel()`` changed them, sleeps
    until the earliest is due (``POLL`` at most, to see new ones), and calls
    the callback directly. A storm reference only: idle, it wakes every
    ``POLL`` seconds.
    """

    POLL = 0.05

    def __init__(self, on_fire: FireCallback) -> None:
        self._on_fire = on_fire
        self._due: dict[str, float] = {}  # session -> monotonic deadline
        self._version = 0  # bumped by every change; dict and int updates are atomic
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="floor", daemon=True)
        self._thread.start()

    def schedule(self, session_id: str, due: float, token: str) -> None:
        self._due[session_id] = time.monotonic() + (due - time.time())
        self._version += 1

    def cancel(self, session_id: str) -> None:
        self._due.pop(session_id, None)
        self._version += 1

    def close(self) -> None:
        self._closed = True
        self._thread.join()

    def _run(self) -> None:
        while not self._closed:
            seen = self._version
            pending = sorted((deadline, session) for session, deadline in list(self._due.items()))
            for deadline, session_id in pending:
                while (delay := deadline - time.monotonic()) > 0 and seen == self._version:
                    time.sleep(min(delay, self.POLL))
                if self._closed or seen != self._version:
                    break  # closed, or the deadlines changed: sort them again
                if self._due.pop(session_id, None) is not None:
                    self._on_fire(session_id)
            else:
                if seen == self._version:
                    time.sleep(self.POLL)  # nothing pending: look again later


class BareThreadTimers:
    """The thread-per-session baseline: one daemon ``threading.Timer`` per session."""

    def __init__(self, on_fire: FireCallback) -> None:
        self._on_fire = on_fire
        self._timers: dict[str, threading.Timer] = {}

    def schedule(self, session_id: str, due: float, token: str) -> None:
        old = self._timers.pop(session_id, None)
        if old is not None:
            old.cancel()
        timer = threading.Timer(due - time.time(), self._on_fire, (session_id,))
        timer.daemon = True
        timer.start()
        self._timers[session_id] = timer

    def cancel(self, session_id: str) -> None:
        timer = self._timers.pop(session_id, None)
        if timer is not None:
            timer.cancel()

    def close(self) -> None:
        timers = list(self._timers.values())
        self._timers.clear()
        for timer in timers:
            timer.cancel()
        for timer in timers:
            timer.join()


def _fire_job(on_fire: FireCallback, session_id: str) -> None:
    on_fire(session_id)


class APSchedulerContender:
    """APScheduler 3's BackgroundScheduler, one date-triggered job per session."""

    def __init__(self, on_fire: FireCallback) -> None:
        try:
            from apscheduler.events import EVENT_JOB_MISSED  # type: ignore[import-untyped]
            from apscheduler.schedulers.background import (  # type: ignore[import-untyped]
                BackgroundScheduler,
            )
            from apscheduler.triggers.date import DateTrigger  # type: ignore[import-untyped]
        except ImportError as error:
            raise Unavailable(f"APScheduler 3 is not installed ({error})") from None
        # Its "missed by" warnings would go to stderr; the listener counts them instead.
        logging.getLogger("apscheduler").setLevel(logging.ERROR)
        self._on_fire = on_fire
        self._trigger = DateTrigger
        self._jobs: set[str] = set()
        self.missed = 0
        self._scheduler = BackgroundScheduler(timezone=UTC)
        self._scheduler.add_listener(self._count_missed, EVENT_JOB_MISSED)
        self._scheduler.start()

    def _count_missed(self, event: object) -> None:
        self.missed += 1

    def schedule(self, session_id: str, due: float, token: str) -> None:
        trigger = self._trigger(run_date=datetime.fromtimestamp(due, UTC), timezone=UTC)
        if session_id in self._jobs:
            self._scheduler.reschedule_job(session_id, trigger=trigger)
        else:
            self._scheduler.add_job(
                _fire_job, trigger, args=(self._on_fire, session_id), id=session_id
            )
            self._jobs.add(session_id)

    def cancel(self, session_id: str) -> None:
        self._jobs.discard(session_id)
        self._scheduler.remove_job(session_id)

    def close(self) -> None:
        self._scheduler.shutdown(wait=True)


class TokenRefreshContender:
    """token_refresh's Scheduler with one timer backend, driven through ``schedule(jwt)``.

    ``refresh_buffer=0``, so a session is due at its token's ``exp``. When
    ``on_fire`` is given, an ``on_event`` hook notes which session a worker
    thread is about to refresh, and ``get_access_token`` reports it: the
    timestamp is taken where the user's code starts. Without ``on_fire``
    (throughput and memory runs) no ``on_event`` is installed, as in a default
    setup. ``on_delivered`` is called from ``on_refresh`` instead, with no
    ``on_event``: the storm runs time the delivery of a token that
    ``get_access_token`` returns at once.
    """

    def __init__(
        self,
        on_fire: FireCallback | None,
        timers: str | None,
        on_delivered: FireCallback | None = None,
    ) -> None:
        try:
            import token_refresh
            from token_refresh import events
        except Exception as error:  # a half-edited working tree must not stop the run
            raise Unavailable(f"token_refresh does not import ({error!r})") from None
        options: dict[str, Any] = {}
        if "jitter" in inspect.signature(token_refresh.Scheduler).parameters:
            options["jitter"] = 0.0  # lateness is measured against the exact due time
        self._local = threading.local()
        self._on_fire = on_fire
        self._on_delivered = on_delivered
        self._started = events.RefreshStarted
        self.backend = timers

        def build(**extra: Any) -> token_refresh.Scheduler:
            return token_refresh.Scheduler(
                self._get_access_token,
                self._on_refresh,
                label="bench",
                refresh_buffer=0.0,
                on_event=None if on_fire is None else self._on_event,
                **options,
                **extra,
            )

        try:
            self._scheduler = build(timers=timers)
        except TypeError as error:
            if timers != "thread":
                raise Unavailable(
                    f"Scheduler(timers={timers!r}) is not supported: {error}"
                ) from None
            # Before the timers= option existed, a Timer per session was the only backend.
            self._scheduler = build()
            self.backend = "thread (default; no timers= option)"

    def _on_event(self, event: object) -> None:
        if isinstance(event, self._started):
            self._local.session_id = event.session_id

    def _get_access_token(self) -> str | None:
        if self._on_fire is not None:
            self._on_fire(self._local.session_id)
        return "refreshed-token"

    def _on_refresh(self, session_id: str, token: str) -> None:
        if self._on_delivered is not None:
            self._on_delivered(session_id)

    def schedule(self, session_id: str, due: float, token: str) -> None:
        self._scheduler.schedule(session_id, token)

    def cancel(self, session_id: str) -> None:
        self._scheduler.cancel(session_id)

    def close(self) -> None:
        self._scheduler.close(timeout=60.0)


class Entry(NamedTuple):
    factory: Callable[[FireCallback | None], Contender]
    description: str
    thread_per_session: bool  # holds one OS thread per pending session
    # Calls on_fire where the token is delivered; None: on_fire is the delivery already.
    delivered: Callable[[FireCallback], Contender] | None = None
    # Seconds per session that arming N takes at worst, for the storm runs' lead time.
    arm_seconds: float = 5e-5
    # A reference for the storm rows only (the floor): left out of the other phases.
    storm_only: bool = False


def _ignore(session_id: str) -> None:
    pass


#: The contenders, in the report's order.
CONTENDERS: dict[str, Entry] = {
    "token_refresh[heap]": Entry(
        lambda on_fire: TokenRefreshContender(on_fire, "heap"),
        'token_refresh `Scheduler(timers="heap")`: one timer thread, deadline heap',
        False,
        lambda on_delivered: TokenRefreshContender(None, "heap", on_delivered),
    ),
    "token_refresh[thread]": Entry(
        lambda on_fire: TokenRefreshContender(on_fire, "thread"),
        "token_refresh default backend: one `threading.Timer` per session",
        True,
        lambda on_delivered: TokenRefreshContender(None, "thread", on_delivered),
        # Starting a thread per session took 0.5-1.3 ms each here once thousands were
        # up, and up to 3 ms on a loaded machine: hence twice the calm figure.
        arm_seconds=2e-3,
    ),
    "bare heap": Entry(
        lambda on_fire: HeapTimer(on_fire or _ignore),
        "reference: one thread, `heapq` + `threading.Condition` (~50 lines, no features)",
        False,
    ),
    "bare Timer": Entry(
        lambda on_fire: BareThreadTimers(on_fire or _ignore),
        "baseline: one bare daemon `threading.Timer` per session",
        True,
        arm_seconds=2e-3,
    ),
    "APScheduler": Entry(
        lambda on_fire: APSchedulerContender(on_fire or _ignore),
        "APScheduler 3 `BackgroundScheduler`, `DateTrigger` job per session",
        False,
        arm_seconds=4e-4,  # 6-12k add_job()/s here at N = 10,000, twice that for room
    ),
    "floor": Entry(
        lambda on_fire: FloorLoop(on_fire or _ignore),
        "the floor: one thread calls the callback for each due session in deadline order"
        " (no lock, no hand-off; storm and budget runs only)",
        False,
        storm_only=True,
    ),
}

#: The same two backends from another checkout (``run.py --baseline DIR``): the
#: worker imports token_refresh from there, so a change is measured against the
#: code before it in one interleaved run.
BASELINE: dict[str, Entry] = {
    f"baseline[{timers}]": CONTENDERS[f"token_refresh[{timers}]"]._replace(
        description=f"token_refresh from --baseline, `timers={timers!r}`",
        storm_only=True,
    )
    for timers in ("heap", "thread")
}
CONTENDERS.update(BASELINE)
