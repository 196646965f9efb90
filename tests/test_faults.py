"""Faults a daemon meets within a month: hung calls, raising and blocking callbacks, exit, GC."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Literal

import pytest

from token_refresh import Scheduler, current_session_id, events
from token_refresh._machine import Machine
from token_refresh.testing import ManualClock

from conftest import START, Recorder, make_jwt

WAIT = 10.0  # a bound for handshakes; a passing test never waits this long

BASE_EXCEPTIONS = [KeyboardInterrupt, SystemExit, asyncio.CancelledError, GeneratorExit]


def expiring_in(seconds: float) -> str:
    return make_jwt({"exp": time.time() + seconds})


def wait_for(event: threading.Event, what: str) -> None:
    assert event.wait(WAIT), f"timed out waiting for {what}"


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll a condition the library offers no event for (stats); bounded by WAIT."""
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


class EventLog:
    """An on_event that records event types and lets a test wait for one."""

    def __init__(self) -> None:
        self.seen: list[events.Event] = []
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)

    def __call__(self, event: events.Event) -> None:
        with self.changed:
            self.seen.append(event)
            self.changed.notify_all()

    def of(self, kind: type[events.Event], session_id: str | None = None) -> list[events.Event]:
        with self.lock:
            return [
                e
                for e in self.seen
                if isinstance(e, kind) and (session_id is None or e.session_id == session_id)
            ]

    def wait(self, kind: type[events.Event], count: int = 1, session_id: str | None = None) -> None:
        with self.changed:
            ok = self.changed.wait_for(lambda: len(self.of_locked(kind, session_id)) >= count, WAIT)
        assert ok, f"timed out waiting for {count} {kind.__name__}"

    def of_locked(self, kind: type[events.Event], session_id: str | None) -> list[events.Event]:
        return [
            e
            for e in self.seen
            if isinstance(e, kind) and (session_id is None or e.session_id == session_id)
        ]


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """An event that hung callbacks wait on; set at teardown so no thread outlives the test."""
    event = threading.Event()
    yield event
    event.set()


# -- Deterministic: ManualClock ---------------------------------------------------------


class TestBaseExceptionsFromCallbacks:
    @pytest.mark.parametrize("error", BASE_EXCEPTIONS)
    def test_from_get_access_token_is_a_failure_that_is_retried(
        self, clock: ManualClock, recorder: Recorder, error: type[BaseException]
    ) -> None:
        """A BaseException from get_access_token counts as a failure and the retry comes."""
        recorder.tokens = [error()]
        sched = Scheduler(recorder.get_access_token, recorder.on_refresh, clock=clock)
        sched.schedule_from_expires_in("s1", 600)
        clock.advance(300)
        assert sched.stats().failures == 1
        assert sched.next_refresh_at("s1") == START + 360
        clock.advance(60)
        assert recorder.deliveries == [(360.0, "s1", "access-token")]
        assert sched.sessions() == {"s1"}

    @pytest.mark.parametrize("error", BASE_EXCEPTIONS)
    def test_from_on_refresh_still_arms_the_follow_up(
        self, clock: ManualClock, error: type[BaseException]
    ) -> None:
        """A BaseException from on_refresh is a callback error: the follow-up still comes."""
        calls: list[float] = []

        def on_refresh(session_id: str, token: str) -> None:
            calls.append(clock.time() - START)
            raise error()

        log = EventLog()
        sched = Scheduler(lambda: "t", on_refresh, clock=clock, on_event=log)
        sched.schedule_from_expires_in("s1", 600)
        clock.advance(300 + 1800)
        assert calls == [300.0, 2100.0]
        assert [e.error_type for e in log.of(events.CallbackError)] == [error.__name__] * 2  # type: ignore[attr-defined]
        assert sched.next_refresh_at("s1") == START + 3900

    @pytest.mark.parametrize("error", BASE_EXCEPTIONS)
    @pytest.mark.parametrize("kind", [events.Refreshed, events.RefreshStarted, events.Scheduled])
    def test_from_on_event_breaks_nothing(
        self,
        clock: ManualClock,
        recorder: Recorder,
        error: type[BaseException],
        kind: type[events.Event],
    ) -> None:
        """on_event raising at any step leaves the delivery, the follow-up and cancel() working."""

        def on_event(event: events.Event) -> None:
            if isinstance(event, kind):
                raise error()

        sched = Scheduler(
            recorder.get_access_token, recorder.on_refresh, clock=clock, on_event=on_event
        )
        sched.schedule_from_expires_in("s1", 600)
        clock.advance(300)
        assert recorder.deliveries == [(300.0, "s1", "access-token")]
        assert sched.next_refresh_at("s1") == START + 2100
        assert sched.cancel("s1", timeout=1) is True
        assert sched.sessions() == frozenset()

    @pytest.mark.parametrize("error", BASE_EXCEPTIONS)
    def test_from_a_log_handler_breaks_nothing(
        self, clock: ManualClock, recorder: Recorder, error: type[BaseException]
    ) -> None:
        """A log handler that raises on every line cannot break a chain or a delivery."""

        class Raising(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                raise error()

        logger = logging.getLogger("token_refresh")
        handler = Raising()
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        try:
            recorder.tokens = [None]
            sched = Scheduler(recorder.get_access_token, recorder.on_refresh, clock=clock)
            sched.schedule("s1", "opaque")  # logs "Could not decode"
            sched.schedule_from_expires_in("s1", 600)
            clock.advance(300 + 60)
            assert recorder.deliveries == [(360.0, "s1", "access-token")]
            assert sched.next_refresh_at("s1") == START + 2160
            assert sched.cancel("s1", timeout=1) is True
        finally:
            logger.removeHandler(handler)
            logger.setLevel(logging.NOTSET)


class TestReentrantLogHandler:
    def test_handler_cancelling_on_the_error_line_does_not_wait_for_itself(
        self, clock: ManualClock
    ) -> None:
        """A handler that cancels the session named in 'on_refresh raised' returns at once."""
        sched: Scheduler
        results: list[bool] = []

        class Canceller(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if "on_refresh raised" in record.getMessage():
                    results.append(sched.cancel("s1"))

        def on_refresh(session_id: str, token: str) -> None:
            raise RuntimeError("boom")

        logger = logging.getLogger("token_refresh")
        handler = Canceller()
        logger.addHandler(handler)
        try:
            sched = Scheduler(lambda: "t", on_refresh, clock=clock)
            sched.schedule_from_expires_in("s1", 600)
            clock.advance(300)
        finally:
            logger.removeHandler(handler)
        assert results == [False]  # cancelled; its own delivery was still running
        assert sched.sessions() == frozenset()
        assert clock.pending == 0  # cancelled inside its delivery: no follow-up


class TestBadInputToWaits:
    @pytest.mark.parametrize("method", ["close", "cancel_all"])
    def test_huge_timeout_waits_like_none(self, scheduler: Scheduler, method: str) -> None:
        """close(1e10) and cancel_all(1e300) do not overflow; they wait as for None."""
        assert getattr(scheduler, method)(timeout=1e10) is True
        assert getattr(scheduler, method)(timeout=float("inf")) is True
        assert getattr(scheduler, method)(timeout=timedelta(days=10**6)) is True
        assert getattr(scheduler, method)(timeout=10**400) is True  # too large for a float

    @pytest.mark.parametrize("timeout", [-1, float("nan"), "1", True])
    def test_bad_timeout_is_refused_before_anything_changes(
        self, scheduler: Scheduler, timeout: object
    ) -> None:
        """A bad timeout is an error at the call; the scheduler is neither closed nor cancelled."""
        scheduler.schedule_from_expires_in("s1", 600)
        calls: list[Callable[[], object]] = [
            lambda: scheduler.close(timeout=timeout),  # type: ignore[arg-type]
            lambda: scheduler.cancel("s1", timeout=timeout),  # type: ignore[arg-type]
            lambda: scheduler.cancel_all(timeout=timeout),  # type: ignore[arg-type]
        ]
        for call in calls:
            with pytest.raises((TypeError, ValueError), match="timeout"):
                call()
        assert scheduler.sessions() == {"s1"}
        scheduler.schedule_from_expires_in("s2", 600)  # still open

    @pytest.mark.parametrize(
        ("value", "error"),
        [(0, ValueError), (-1, ValueError), ("5", TypeError), (float("nan"), ValueError)],
    )
    def test_fetch_timeout_must_be_positive(self, value: object, error: type[Exception]) -> None:
        """fetch_timeout takes positive seconds, a timedelta, or None."""
        with pytest.raises(error, match="fetch_timeout"):
            Scheduler(lambda: "t", lambda s, t: None, fetch_timeout=value)  # type: ignore[arg-type]
        Scheduler(lambda: "t", lambda s, t: None, fetch_timeout=None).close()
        Scheduler(lambda: "t", lambda s, t: None, fetch_timeout=timedelta(seconds=5)).close()


class TestCredentialLikeSessionIds:
    @pytest.mark.parametrize(
        "session_id",
        [
            "sk-ant-si-0123456789abcdefSECRET",
            " sk-ant-si-0123456789abcdefSECRET",
            make_jwt({"sub": "alice", "exp": 1}),
            "eyJhbGciOiJIUzI1NiJ9.SECRETnotJSON0123.SECRETsignature0123",  # a payload not JSON
            "eyJhbGciOiJIUzI1NiJ9..SECRETdetached0123",  # a detached-payload JWS
            "eyJhbGciOiJSU0EtT0FFUCJ9.SECRETkey01234.iv.SECRETcipher0123.tag",  # a JWE
        ],
    )
    def test_logged_as_fingerprints(
        self, clock: ManualClock, caplog: pytest.LogCaptureFixture, session_id: str
    ) -> None:
        """A session id that looks like a credential never reaches a log line verbatim."""
        caplog.set_level(logging.DEBUG, logger="token_refresh")

        def on_refresh(s: str, t: str) -> None:
            raise ValueError("x")

        sched = Scheduler(lambda: None, on_refresh, clock=clock)
        sched.schedule_from_expires_in(session_id, 600)
        clock.advance(300 + 60 + 60)
        sched.schedule(session_id, "opaque")
        text = caplog.text
        assert len(caplog.records) >= 5
        assert "sessionId=sha256:" in text
        for piece in (session_id[:12], session_id[-12:], "SECRET"):
            assert piece not in text

    def test_ordinary_ids_are_logged_as_they_are(
        self, clock: ManualClock, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Ordinary ids, dotted ones included, stay readable."""
        caplog.set_level(logging.DEBUG, logger="token_refresh")
        sched = Scheduler(lambda: "t", lambda s, t: None, clock=clock)
        sched.schedule_from_expires_in("user.42.web", 600)
        assert "sessionId=user.42.web " in caplog.text


class TestCurrentSessionId:
    def test_get_access_token_knows_which_session_it_refreshes(self, clock: ManualClock) -> None:
        """current_session_id() names the session inside get_access_token, None outside."""
        seen: list[str | None] = []

        def get_access_token() -> str:
            seen.append(current_session_id())
            return "t"

        sched = Scheduler(get_access_token, lambda s, t: None, clock=clock)
        sched.schedule_from_expires_in("a", 100)
        sched.schedule_from_expires_in("b", 200)
        clock.advance(200)
        assert seen == ["a", "b"]
        assert current_session_id() is None


class TestExpiresInFloorWarning:
    def test_floor_past_the_tokens_expiry_warns(
        self, clock: ManualClock, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A 6 s expires_in refreshed after the 30 s floor is a WARNING and after_expiry."""
        log = EventLog()
        sched = Scheduler(lambda: "t", lambda s, t: None, clock=clock, on_event=log)
        sched.schedule_from_expires_in("s1", 6)
        sched.schedule_from_expires_in("s2", 3600)
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert warnings == [
            "[token_refresh:token] Refresh for sessionId=s1 comes 24s after its token "
            "expires (expires_in is under the 30s floor)"
        ]
        flags = [(e.session_id, e.after_expiry) for e in log.of(events.Scheduled)]  # type: ignore[attr-defined]
        assert flags == [("s1", True), ("s2", False)]


# -- Real threads -------------------------------------------------------------------------


@pytest.mark.realclock
@pytest.mark.timeout(30)
@pytest.mark.usefixtures("timer_backend")
class TestHungFetches:
    def test_hung_calls_do_not_starve_other_sessions(self, release: threading.Event) -> None:
        """As many hung calls as workers time out, are replaced, and others are refreshed."""
        hung = threading.Semaphore(0)
        delivered = threading.Event()

        def get_access_token() -> str:
            if current_session_id() != "healthy":
                hung.release()
                release.wait()
                return "late"
            return "fresh"

        def on_refresh(session_id: str, token: str) -> None:
            if session_id == "healthy":
                delivered.set()

        log = EventLog()
        sched = Scheduler(
            get_access_token,
            on_refresh,
            max_workers=2,
            fetch_timeout=0.2,
            refresh_buffer=0,
            on_event=log,
        )
        for n in range(2):
            sched.schedule(f"hung-{n}", expiring_in(-1))
        for _ in range(2):
            assert hung.acquire(timeout=WAIT)
        log.wait(events.RefreshTimedOut, count=2)
        stats = sched.stats()
        assert (stats.stuck, stats.running) == (2, 2)
        sched.schedule("healthy", expiring_in(-1))
        wait_for(delivered, "the healthy session's refresh")
        timed_out = log.of(events.RefreshTimedOut)
        assert all(isinstance(e, events.RefreshFailed) for e in timed_out)
        assert {e.timeout for e in timed_out} == {0.2}  # type: ignore[attr-defined]
        assert sched.stats().failures == 2
        assert sched.next_refresh_at("hung-0") is not None  # retried like None
        release.set()
        wait_until(lambda: sched.stats().stuck == 0, "the hung calls to return")
        assert log.of(events.Refreshed, "hung-0") == []  # the late results were dropped
        assert sched.close(timeout=WAIT)

    def test_without_fetch_timeout_a_hung_call_is_only_running(
        self, release: threading.Event
    ) -> None:
        """fetch_timeout=None never gives up on a call: it shows as running, not stuck."""
        entered = threading.Event()

        def get_access_token() -> str:
            entered.set()
            release.wait()
            return "t"

        sched = Scheduler(get_access_token, lambda s, t: None, fetch_timeout=None, refresh_buffer=0)
        sched.schedule("s1", expiring_in(-1))
        wait_for(entered, "the call")
        assert (sched.stats().running, sched.stats().stuck) == (1, 0)
        assert sched.close(timeout=0.05) is False  # the call still runs
        release.set()
        assert sched.close(timeout=WAIT) is True

    def test_past_the_bound_the_pool_stops_growing(
        self, release: threading.Event, caplog: pytest.LogCaptureFixture
    ) -> None:
        """With max_workers hung already, another hung call is not replaced; it says so later."""
        hung = threading.Semaphore(0)

        def get_access_token() -> str:
            hung.release()
            release.wait()
            return "t"

        log = EventLog()
        sched = Scheduler(
            get_access_token,
            lambda s, t: None,
            max_workers=1,
            fetch_timeout=0.1,
            label="bound",
            refresh_buffer=0,
            on_event=log,
        )
        sched.schedule("a", expiring_in(-1))
        sched.schedule("b", expiring_in(-1))
        for _ in range(2):
            assert hung.acquire(timeout=WAIT)
        wait_until(lambda: sched.stats().stuck == 2, "both calls to time out")
        assert sched.stats().failures == 2  # counted, and retries armed, on time
        assert {sched.next_refresh_at("a") is None, sched.next_refresh_at("b") is None} == {False}
        sched.schedule("c", expiring_in(-1))
        assert not hung.acquire(timeout=0.3)  # no worker left for it: it waits
        workers = [t for t in threading.enumerate() if t.name == "token-refresh-bound-worker"]
        assert len(workers) == 2  # the one it replaced, and the replacement
        release.set()
        assert hung.acquire(timeout=WAIT)  # a returning worker takes it
        log.wait(events.RefreshTimedOut, count=2)  # reported once a worker was free
        assert "no more workers are added" in caplog.text
        assert sched.close(timeout=WAIT)

    def test_a_session_whose_call_hangs_is_not_called_again(self, release: threading.Event) -> None:
        """Retries of sessions whose calls still hang pile up no threads; others are served."""
        calls: dict[str, int] = {}
        delivered = threading.Event()

        def get_access_token() -> str:
            session = current_session_id() or ""
            calls[session] = calls.get(session, 0) + 1
            if session != "healthy":
                release.wait()
            return "t"

        def on_refresh(session_id: str, token: str) -> None:
            if session_id == "healthy":
                delivered.set()

        log = EventLog()
        sched = Scheduler(
            get_access_token,
            on_refresh,
            fetch_timeout=0.05,
            refresh_buffer=0,
            on_event=log,
        )  # max_workers: 4, the default
        for attempt in (1, 2, 3):  # an expired token is refreshed at once: no retry_delay
            for n in range(4):
                sched.schedule(f"hung-{n}", expiring_in(-1))
            log.wait(events.RefreshFailed, count=4 * attempt)
        log.wait(events.GaveUp, count=4)  # three attempts each, two of them never called
        assert calls == {f"hung-{n}": 1 for n in range(4)}
        assert sched.stats().stuck == 4
        sched.schedule("healthy", expiring_in(-1))
        wait_for(delivered, "the healthy session")
        assert sched.close(timeout=0) is False
        release.set()
        assert sched.close(timeout=WAIT)

    def test_a_blocking_on_event_does_not_stop_other_timeouts(
        self, release: threading.Event
    ) -> None:
        """on_event blocking on a RefreshTimedOut holds a worker, not the fetch watchdog."""
        timed_out: list[str] = []
        first = threading.Event()

        def on_event(event: events.Event) -> None:
            if isinstance(event, events.RefreshTimedOut):
                timed_out.append(event.session_id)
                first.set()
                release.wait()

        def get_access_token() -> str:
            release.wait()
            return "t"

        sched = Scheduler(
            get_access_token,
            lambda s, t: None,
            fetch_timeout=0.1,
            refresh_buffer=0,
            on_event=on_event,
        )
        sched.schedule("a", expiring_in(-1))
        wait_for(first, "the first timeout's event")
        sched.schedule("b", expiring_in(-1))
        wait_until(lambda: sched.stats().stuck == 2, "the second call to time out too")
        release.set()
        assert sched.close(timeout=WAIT)


@pytest.mark.realclock
@pytest.mark.timeout(30)
@pytest.mark.usefixtures("timer_backend")
class TestBlockedDelivery:
    def test_a_refresh_cancelled_while_queued_is_never_called(
        self, release: threading.Event
    ) -> None:
        """A refresh waiting for a worker when its session is cancelled never calls the source."""
        busy = threading.Event()
        called: list[str | None] = []

        def get_access_token() -> str:
            called.append(current_session_id())
            if current_session_id() == "busy":
                busy.set()
                release.wait()
            return "t"

        log = EventLog()
        sched = Scheduler(
            get_access_token, lambda s, t: None, max_workers=1, refresh_buffer=0, on_event=log
        )
        sched.schedule("busy", expiring_in(-1))
        wait_for(busy, "the only worker to be busy")
        sched.schedule("queued", expiring_in(-1))
        assert sched.cancel("queued") is True
        release.set()
        log.wait(events.Refreshed, session_id="busy")
        assert sched.close(timeout=WAIT)
        assert called == ["busy"]
        assert log.of(events.RefreshStarted, "queued") == []

    def test_blocked_on_refresh_pins_one_worker_and_cancel_is_bounded(
        self, release: threading.Event
    ) -> None:
        """Rescheduling a session whose on_refresh blocks pins no more workers; cancel is bound."""
        blocked = threading.Event()
        other = threading.Event()
        tokens: list[tuple[str, str]] = []
        counter = iter(range(1000))

        def get_access_token() -> str:
            return f"t{next(counter)}"

        def on_refresh(session_id: str, token: str) -> None:
            tokens.append((session_id, token))
            if session_id == "stuck" and not blocked.is_set():
                blocked.set()
                release.wait()
            if session_id == "other":
                other.set()

        log = EventLog()
        sched = Scheduler(
            get_access_token, on_refresh, max_workers=2, refresh_buffer=0, on_event=log
        )
        sched.schedule("stuck", expiring_in(-1))
        wait_for(blocked, "the blocking delivery")
        for _ in range(3):
            sched.schedule("stuck", expiring_in(-1))  # newer generations, refreshed at once
        # The newest is fetched (the overtaken ones may never be) and handed over, not waited on.
        log.wait(events.RefreshStarted, count=2, session_id="stuck")
        sched.schedule("other", expiring_in(-1))
        wait_for(other, "another session's delivery beside the blocked one")
        assert sched.cancel("stuck", timeout=0.05) is False  # cancelled; its call still runs
        assert sched.sessions() == {"other"}
        release.set()
        assert sched.cancel("stuck", timeout=WAIT) is True
        assert [t for s, t in tokens if s == "stuck"] == ["t0"]  # nothing after the cancel
        assert sched.close(timeout=WAIT)

    def test_newest_result_is_delivered_after_the_blocked_one(
        self, release: threading.Event
    ) -> None:
        """Results that arrive while on_refresh blocks: only the newest is delivered, in order."""
        blocked = threading.Event()
        done = threading.Event()
        tokens: list[str] = []
        counter = iter(range(1000))

        def on_refresh(session_id: str, token: str) -> None:
            tokens.append(token)
            if token == "t0":
                blocked.set()
                release.wait()
            if token == "t3":
                done.set()

        log = EventLog()
        sched = Scheduler(lambda: f"t{next(counter)}", on_refresh, refresh_buffer=0, on_event=log)
        sched.schedule("s1", expiring_in(-1))
        wait_for(blocked, "the blocking delivery")
        for n in range(3):
            sched.schedule("s1", expiring_in(-1))
            log.wait(events.RefreshStarted, count=n + 2)
        log.wait(events.StaleDropped, count=2)
        release.set()
        wait_for(done, "the newest token")
        assert tokens == ["t0", "t3"]
        assert sched.cancel_all(timeout=WAIT) is True
        assert sched.close(timeout=WAIT)

    def test_handler_cancelling_on_a_worker_does_not_deadlock(self) -> None:
        """A log handler calling cancel() of the session being delivered, on the worker, returns."""
        sched: Scheduler
        cancelled = threading.Event()

        class Canceller(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if "on_refresh raised" in record.getMessage():
                    sched.cancel("s1")
                    cancelled.set()

        def on_refresh(session_id: str, token: str) -> None:
            raise KeyboardInterrupt

        logger = logging.getLogger("token_refresh")
        handler = Canceller()
        logger.addHandler(handler)
        try:
            sched = Scheduler(lambda: "t", on_refresh, refresh_buffer=0)
            sched.schedule("s1", expiring_in(-1))
            wait_for(cancelled, "the handler's cancel()")
            assert sched.cancel("s1", timeout=WAIT) is True
            assert sched.sessions() == frozenset()
            assert sched.close(timeout=WAIT)
        finally:
            logger.removeHandler(handler)

    @pytest.mark.parametrize("error", BASE_EXCEPTIONS)
    def test_base_exception_from_on_event_leaves_cancel_working(
        self, error: type[BaseException]
    ) -> None:
        """After on_event(Refreshed) raised, the session is delivered and cancel() returns."""
        delivered = threading.Event()

        def on_event(event: events.Event) -> None:
            if isinstance(event, events.Refreshed):
                raise error()

        sched = Scheduler(
            lambda: "t", lambda s, t: delivered.set(), refresh_buffer=0, on_event=on_event
        )
        sched.schedule("s1", expiring_in(-1))
        wait_for(delivered, "the delivery")
        assert sched.cancel("s1", timeout=WAIT) is True
        assert sched.close(timeout=WAIT)

    @pytest.mark.parametrize("error", BASE_EXCEPTIONS)
    def test_base_exception_from_get_access_token_retries(self, error: type[BaseException]) -> None:
        """A BaseException from get_access_token on a worker is a failure; the retry is armed."""
        log = EventLog()

        def get_access_token() -> str:
            raise error()

        sched = Scheduler(get_access_token, lambda s, t: None, refresh_buffer=0, on_event=log)
        sched.schedule("s1", expiring_in(-1))
        log.wait(events.Scheduled, count=2)
        retry = log.of(events.Scheduled)[-1]
        assert retry.reason == "retry"  # type: ignore[attr-defined]
        assert sched.next_refresh_at("s1") is not None
        assert sched.close(timeout=WAIT)


@pytest.mark.realclock
@pytest.mark.timeout(30)
class TestStormPath:
    def test_schedule_starts_no_thread_under_the_lock(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """schedule() starts its timer thread before it takes the scheduler's lock."""
        sched = Scheduler(lambda: "t", lambda s, t: None, refresh_buffer=0, label="nolock")
        held: list[bool] = []
        original = threading.Thread.start

        def recording_start(self: threading.Thread) -> None:
            held.append(sched._lock.locked())
            original(self)

        monkeypatch.setattr(threading.Thread, "start", recording_start)
        for n in range(20):
            sched.schedule_from_expires_in(f"s{n}", 3600)
            sched.schedule(f"now{n}", expiring_in(-1))
        monkeypatch.undo()
        assert held
        assert not any(held)
        assert sched.close(timeout=WAIT)

    def test_no_refresh_path_starts_a_thread(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Timer-fired refreshes re-arm their own timer threads: workers never start one."""
        starts_on_workers: list[str] = []
        original = threading.Thread.start

        def counting_start(self: threading.Thread) -> None:
            # The clock watcher is started by the first timer thread, as it registers.
            if threading.current_thread().name.startswith("token-refresh-storm") and (
                self.name != "token-refresh-clock-watch"
            ):
                starts_on_workers.append(self.name)
            original(self)

        log = EventLog()
        monkeypatch.setattr(threading.Thread, "start", counting_start)
        sched = Scheduler(
            lambda: "t", lambda s, t: None, refresh_buffer=0, label="storm", on_event=log
        )
        sessions = 200
        for n in range(sessions):
            sched.schedule(f"s{n}", expiring_in(0.05))
        log.wait(events.Scheduled, count=2 * sessions)  # every follow-up armed
        assert sched.stats().pending == sessions
        # Only the pool's own workers, started by the first timers that fired, and its watchdog.
        assert len(starts_on_workers) <= 1 + 4
        assert sched.close(timeout=WAIT)


@pytest.mark.realclock
@pytest.mark.timeout(60)
class TestPromptExit:
    def run(self, script: str) -> tuple[subprocess.CompletedProcess[str], float]:
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(script)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return result, time.monotonic() - started

    @pytest.mark.parametrize("timers", ["thread", "heap"])
    def test_exits_promptly_with_a_hung_fetch_after_close_returned_false(self, timers: str) -> None:
        """close(timeout) returning False does not hold the interpreter: exit takes a second."""
        result, took = self.run(
            f"""
            import threading, time
            from token_refresh import Scheduler
            entered = threading.Event()
            def hang():
                entered.set()
                time.sleep(60)
            sched = Scheduler(hang, lambda s, t: None, timers={timers!r}, fetch_timeout=None)
            sched.schedule("s1", "x.eyJleHAiOjF9.y")
            assert entered.wait(10)
            print(sched.close(timeout=0.2))
            """
        )
        assert (result.returncode, result.stdout, result.stderr) == (0, "False\n", "")
        assert took < 5  # EXIT_GRACE is 1 s; interpreter start-up makes the rest

    @pytest.mark.parametrize("timers", ["thread", "heap"])
    def test_queued_refreshes_are_dropped_at_exit(self, timers: str) -> None:
        """Refreshes not yet started when main returns are dropped, not run one by one."""
        result, took = self.run(
            f"""
            import threading, time
            from token_refresh import Scheduler
            first = threading.Event()
            def slow():
                first.set()
                time.sleep(0.1)
                return "t"
            sched = Scheduler(slow, lambda s, t: print("delivered", flush=True),
                              timers={timers!r}, max_workers=1)
            for n in range(40):
                sched.schedule(f"s{{n}}", "x.eyJleHAiOjF9.y")
            assert first.wait(10)
            """
        )
        assert (result.returncode, result.stderr) == (0, "")
        assert result.stdout.count("delivered") <= 2
        assert took < 5

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
    def test_child_does_not_wait_for_work_inherited_from_the_parent(self) -> None:
        """A child forked while a parent worker ran a call exits at once: that work is not its."""
        result, took = self.run(
            """
            import os, sys, threading, time
            import token_refresh._workers
            from token_refresh import Scheduler
            token_refresh._workers.EXIT_GRACE = 30.0  # a wrong wait would show
            entered = threading.Event()
            def hang():
                entered.set()
                time.sleep(60)
            sched = Scheduler(hang, lambda s, t: None, fetch_timeout=None)
            sched.schedule("s1", "x.eyJleHAiOjF9.y")
            assert entered.wait(10)
            pid = os.fork()
            if pid == 0:
                sys.exit(0)  # a normal exit: atexit hooks run
            started = time.monotonic()
            os.waitpid(pid, 0)
            print(round(time.monotonic() - started))
            os._exit(0)
            """
        )
        assert (result.returncode, result.stderr) == (0, "")
        assert int(result.stdout) < 10
        assert took < 20


@pytest.mark.realclock
@pytest.mark.timeout(30)
class TestCollection:
    @pytest.mark.parametrize("timers", ["thread", "heap"])
    def test_idle_scheduler_nobody_references_is_collected_with_its_threads(
        self, timers: Literal["thread", "heap"]
    ) -> None:
        """A scheduler with no session left and no reference is collected; its threads end."""
        delivered = threading.Event()
        sched = Scheduler(
            lambda: "t", lambda s, t: delivered.set(), refresh_buffer=0, timers=timers, label="gc"
        )
        sched.schedule("s1", expiring_in(-1))  # starts workers (and the heap thread)
        wait_for(delivered, "the delivery")
        sched.schedule_from_expires_in("s2", 3600)
        sched.cancel("s1")
        sched.cancel("s2")
        collected = threading.Event()
        weakref.finalize(sched, collected.set)
        threads = [t for t in threading.enumerate() if t.name.startswith("token-refresh-gc")]
        assert threads
        del sched
        gc.collect()  # the last worker may still be returning from its job: then it frees it
        wait_for(collected, "the scheduler to be collected")
        for thread in threads:
            thread.join(WAIT)
            assert not thread.is_alive(), thread.name

    @pytest.mark.parametrize("timers", ["thread", "heap"])
    @pytest.mark.parametrize("jitter", [0.0, 5.0])
    def test_an_idle_scheduler_needs_no_garbage_collection(
        self, timers: Literal["thread", "heap"], jitter: float
    ) -> None:
        """No reference cycle holds an idle scheduler (jitter= made one): dropped, it is
        collected at once, not at a collection that a quiet daemon may not run for hours."""
        sched = Scheduler(lambda: "t", lambda s, t: None, timers=timers, jitter=jitter)
        sched.schedule_from_expires_in("s1", 3600)
        assert sched.cancel("s1")
        collected = threading.Event()
        weakref.finalize(sched, collected.set)
        gc.disable()
        try:
            del sched
            assert collected.is_set()
        finally:
            gc.enable()

    @pytest.mark.parametrize("timers", ["thread", "heap"])
    def test_scheduler_with_a_live_session_keeps_refreshing(
        self, timers: Literal["thread", "heap"]
    ) -> None:
        """Dropping the last reference does not stop a live session, as with threading.Timer."""
        delivered = threading.Event()
        sched = Scheduler(
            lambda: "t", lambda s, t: delivered.set(), refresh_buffer=0, timers=timers
        )
        sched.schedule("s1", expiring_in(0.2))
        ref = weakref.ref(sched)
        del sched
        gc.collect()
        wait_for(delivered, "the refresh of an unreferenced scheduler")
        kept = ref()
        assert kept is not None
        assert kept.close(timeout=WAIT)


@pytest.mark.realclock
@pytest.mark.timeout(120)
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
class TestForkWhileLogging:
    def test_children_never_hang_while_the_parent_logs(self, tmp_path: object) -> None:
        """Forking while other threads log to a stream: no child hangs in os.fork()."""
        stream = open(os.devnull, "w")  # noqa: SIM115 - closed below
        handler = logging.StreamHandler(stream)
        logger = logging.getLogger("token_refresh")
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        sched = Scheduler(lambda: "t", lambda s, t: None, label="forklog")
        sched.schedule_from_expires_in("parent", 3600)
        stop = threading.Event()

        def chatter() -> None:
            while not stop.is_set():
                logger.debug("[app] busy line %s", "x" * 200)

        talkers = [threading.Thread(target=chatter, daemon=True) for _ in range(3)]
        for thread in talkers:
            thread.start()
        hung = 0
        try:
            for _ in range(30):
                pid = os.fork()
                if pid == 0:  # pragma: no cover - the child: it only has to get here
                    os._exit(0)
                killer = threading.Timer(5, os.kill, (pid, 9))
                killer.start()
                _, status = os.waitpid(pid, 0)
                killer.cancel()
                hung += os.waitstatus_to_exitcode(status) != 0
        finally:
            stop.set()
            for thread in talkers:
                thread.join(WAIT)
            logger.removeHandler(handler)
            logger.setLevel(logging.NOTSET)
            stream.close()
            sched.close()
        assert hung == 0


class TestWithoutFork:
    def test_imports_and_runs_where_register_at_fork_is_missing(self) -> None:
        """On a platform without os.register_at_fork (Windows), the package imports and works."""
        script = textwrap.dedent(
            """
            import os
            del os.fork, os.register_at_fork  # as on Windows
            from token_refresh import Scheduler
            from token_refresh.testing import ManualClock
            clock = ManualClock()
            delivered = []
            sched = Scheduler(lambda: "t", lambda s, t: delivered.append(s), clock=clock)
            sched.schedule_from_expires_in("s1", 600)
            clock.advance(300)
            print(delivered)
            """
        )
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
        )
        assert (result.returncode, result.stdout, result.stderr) == (0, "['s1']\n", "")


class TestMarksUndone:
    def test_an_unexpected_error_after_delivery_leaves_no_stuck_delivery(
        self, clock: ManualClock, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Even an error inside the scheduler after on_refresh unmarks the delivery."""
        sched = Scheduler(recorder.get_access_token, recorder.on_refresh, clock=clock)
        sched.schedule_from_expires_in("s1", 600)

        def broken(*args: object, **kwargs: object) -> None:
            raise MemoryError  # arming the follow-up fails, inside the delivery's bookkeeping

        monkeypatch.setattr(Machine, "delivered", broken)
        with pytest.raises(MemoryError):
            clock.advance(300)
        assert recorder.deliveries == [(300.0, "s1", "access-token")]
        assert sched.cancel("s1", timeout=0) is True  # no delivery left marked
