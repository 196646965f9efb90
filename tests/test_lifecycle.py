"""Events, introspection, close(timeout) and fork safety."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import pytest

from token_refresh import (
    Scheduler,
    SchedulerClosedError,
    Stats,
    _expiry,
    _scheduler,
    events,
)
from token_refresh.testing import ManualClock

from conftest import START, Recorder, ReraisingThread, make_jwt

pytestmark = pytest.mark.usefixtures("timer_backend")


class EventLog:
    """An on_event that records each event as (type name, session, clock offset, fields)."""

    def __init__(self) -> None:
        self.events: list[events.Event] = []

    def __call__(self, event: events.Event) -> None:
        self.events.append(event)

    def names(self) -> list[str]:
        return [type(event).__name__ for event in self.events]


@pytest.fixture
def event_log() -> EventLog:
    return EventLog()


@pytest.fixture
def observed(clock: ManualClock, recorder: Recorder, event_log: EventLog) -> Scheduler:
    return Scheduler(
        recorder.get_access_token,
        recorder.on_refresh,
        clock=clock,
        label="obs",
        on_event=event_log,
    )


class TestEvents:
    def test_success_path(
        self, observed: Scheduler, clock: ManualClock, event_log: EventLog
    ) -> None:
        """A timed refresh reports scheduled, started, refreshed, then the follow-up."""
        observed.schedule("s1", make_jwt({"exp": START + 900}))
        clock.advance(600)
        assert event_log.names() == ["Scheduled", "RefreshStarted", "Refreshed", "Scheduled"]
        first, started, refreshed, follow_up = event_log.events
        assert first == events.Scheduled(
            session_id="s1", label="obs", time=START, due=START + 600, delay=600.0, reason="exp"
        )
        assert started == events.RefreshStarted(
            session_id="s1",
            label="obs",
            time=START + 600,
            due=START + 600,
            lateness=0.0,
            trigger="exp",
            attempt=1,
        )
        assert isinstance(refreshed, events.Refreshed)
        assert refreshed.token_fingerprint.startswith("sha256:")
        assert follow_up == events.Scheduled(
            session_id="s1",
            label="obs",
            time=START + 600,
            due=START + 2400,
            delay=1800.0,
            reason="follow_up",
        )

    def test_immediate_refresh_reports_zero_delay(
        self, observed: Scheduler, event_log: EventLog
    ) -> None:
        """An expired token reports a Scheduled event with no delay, then the refresh."""
        observed.schedule("s1", make_jwt({"exp": START - 10}))
        assert event_log.names() == ["Scheduled", "RefreshStarted", "Refreshed", "Scheduled"]
        assert event_log.events[0] == events.Scheduled(
            session_id="s1", label="obs", time=START, due=START, delay=0.0, reason="exp"
        )

    def test_retry_and_give_up_path(
        self,
        observed: Scheduler,
        clock: ManualClock,
        recorder: Recorder,
        event_log: EventLog,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Failures report attempt n of 3 with the error type, then a visible give-up."""
        recorder.tokens = [None, OSError("down"), 42]
        observed.schedule_from_expires_in("s1", 330)
        clock.advance(3600)
        assert event_log.names() == [
            "Scheduled",
            "RefreshStarted",
            "RefreshFailed",
            "Scheduled",
            "RefreshStarted",
            "RefreshFailed",
            "Scheduled",
            "RefreshStarted",
            "RefreshFailed",
            "GaveUp",
        ]
        failed = [e for e in event_log.events if isinstance(e, events.RefreshFailed)]
        assert [(e.attempt, e.max_attempts, e.error_type) for e in failed] == [
            (1, 3, None),
            (2, 3, "OSError"),
            (3, 3, "int"),
        ]
        retries = [e for e in event_log.events if isinstance(e, events.Scheduled)][1:]
        assert [(e.reason, e.delay, e.due - START) for e in retries] == [
            ("retry", 60.0, 90.0),
            ("retry", 60.0, 150.0),
        ]
        assert event_log.events[-1] == events.GaveUp(
            session_id="s1", label="obs", time=START + 150, failures=3
        )
        assert "Giving up on sessionId=s1 after 3 consecutive failures" in caplog.text

    def test_stale_and_cancel_path(
        self, clock: ManualClock, recorder: Recorder, event_log: EventLog
    ) -> None:
        """A cancel during the fetch reports Cancelled, then the dropped stale result."""
        sched: Scheduler

        def get_access_token() -> str:
            sched.cancel("s1")
            return "t"

        sched = Scheduler(get_access_token, recorder.on_refresh, clock=clock, on_event=event_log)
        sched.schedule_from_expires_in("s1", 600)
        clock.advance(300)
        assert event_log.names() == ["Scheduled", "RefreshStarted", "Cancelled", "StaleDropped"]

    def test_kept_timer_and_callback_error(
        self, clock: ManualClock, recorder: Recorder, event_log: EventLog
    ) -> None:
        """An undecodable token reports TimerKept; a raising on_refresh reports CallbackError."""

        def on_refresh(session_id: str, token: str) -> None:
            raise KeyError(token)

        sched = Scheduler(recorder.get_access_token, on_refresh, clock=clock, on_event=event_log)
        sched.schedule_from_expires_in("s1", 600)
        sched.schedule("s1", "opaque")
        clock.advance(300)
        assert event_log.names() == [
            "Scheduled",
            "TimerKept",
            "RefreshStarted",
            "Refreshed",
            "CallbackError",
            "Scheduled",
        ]
        assert event_log.events[4] == events.CallbackError(
            session_id="s1", label="token_refresh", time=START + 300, error_type="KeyError"
        )

    def test_cancel_all_and_close_report_each_live_session(
        self, observed: Scheduler, event_log: EventLog
    ) -> None:
        """cancel_all() and close() report one Cancelled per session they stopped."""
        observed.schedule_from_expires_in("a", 600)
        observed.schedule_from_expires_in("b", 600)
        observed.cancel("never-scheduled")
        observed.cancel_all()
        observed.schedule_from_expires_in("c", 600)
        observed.close()
        observed.close()
        cancelled = [e.session_id for e in event_log.events if isinstance(e, events.Cancelled)]
        assert cancelled == ["a", "b", "c"]

    def test_events_never_carry_tokens(
        self, observed: Scheduler, clock: ManualClock, recorder: Recorder, event_log: EventLog
    ) -> None:
        """No field of any event holds token material."""
        secret = "ya29.super-secret-access-token"
        recorder.default = secret
        jwt = make_jwt({"exp": START + 900})
        observed.schedule("s1", jwt)
        observed.schedule("s1", "opaque-" + secret)
        clock.advance(600 + 1800)
        text = " ".join(repr(event) for event in event_log.events)
        assert len(event_log.events) > 5
        for piece in [secret[i : i + 8] for i in range(len(secret) - 7)] + jwt.split("."):
            assert piece not in text

    def test_events_are_immutable(self, observed: Scheduler, event_log: EventLog) -> None:
        """Events are frozen dataclasses."""
        observed.schedule_from_expires_in("s1", 600)
        with pytest.raises(AttributeError):
            event_log.events[0].session_id = "other"  # type: ignore[misc]

    def test_raising_on_event_is_logged_and_changes_nothing(
        self, clock: ManualClock, recorder: Recorder, caplog: pytest.LogCaptureFixture
    ) -> None:
        """An exception from on_event is logged by type and the refresh goes on."""

        def on_event(event: events.Event) -> None:
            raise ValueError("observer broke")

        sched = Scheduler(
            recorder.get_access_token, recorder.on_refresh, clock=clock, on_event=on_event
        )
        sched.schedule_from_expires_in("s1", 600)
        clock.advance(300)
        assert recorder.deliveries == [(300.0, "s1", "access-token")]
        assert "[token_refresh:token] on_event raised ValueError" in caplog.text

    def test_on_event_may_cancel_without_deadlock(
        self, clock: ManualClock, recorder: Recorder
    ) -> None:
        """on_event runs outside the lock, so it may call back into the scheduler."""
        sched: Scheduler

        def on_event(event: events.Event) -> None:
            if isinstance(event, events.Refreshed):
                sched.cancel(event.session_id)

        sched = Scheduler(
            recorder.get_access_token, recorder.on_refresh, clock=clock, on_event=on_event
        )
        sched.schedule_from_expires_in("s1", 600)
        clock.advance(3600)
        assert len(recorder.deliveries) == 1  # delivered, but no follow-up
        assert sched.sessions() == frozenset()

    def test_on_event_must_be_callable(self) -> None:
        """A non-callable on_event is refused at construction."""
        with pytest.raises(TypeError, match="on_event must be callable"):
            Scheduler(lambda: "t", lambda s, t: None, on_event="print")  # type: ignore[arg-type]


class TestWhatEventsCarryForMetrics:
    """The fields token_refresh.otel reads: due, lateness, trigger, attempts, durations."""

    def test_a_suspend_makes_a_late_resume(
        self, observed: Scheduler, clock: ManualClock, event_log: EventLog
    ) -> None:
        observed.schedule("s1", make_jwt({"exp": START + 900}))  # due at +600
        clock.advance(10)
        clock.suspend(1000)
        clock.advance(0)
        started = next(e for e in event_log.events if isinstance(e, events.RefreshStarted))
        assert (started.due, started.lateness, started.trigger) == (START + 600, 410.0, "resume")
        refreshed = next(e for e in event_log.events if isinstance(e, events.Refreshed))
        assert refreshed.trigger == "resume"

    def test_retries_keep_the_refresh_trigger_and_count_attempts(
        self,
        observed: Scheduler,
        clock: ManualClock,
        recorder: Recorder,
        event_log: EventLog,
    ) -> None:
        new = make_jwt({"exp": START + 5000})
        recorder.tokens = [ValueError("down"), new]
        observed.schedule_from_expires_in("s1", 900)
        clock.advance(600 + 60)
        started = [e for e in event_log.events if isinstance(e, events.RefreshStarted)]
        assert [(e.trigger, e.attempt) for e in started] == [("expires_in", 1), ("retry", 2)]
        failed = next(e for e in event_log.events if isinstance(e, events.RefreshFailed))
        assert (failed.final, failed.trigger, failed.fetch_duration) == (False, "expires_in", 0.0)
        refreshed = next(e for e in event_log.events if isinstance(e, events.Refreshed))
        assert (refreshed.trigger, refreshed.attempts) == ("expires_in", 2)
        assert (refreshed.expires_at, refreshed.served_by) == (START + 5000, None)

    def test_the_last_failure_is_final(
        self,
        observed: Scheduler,
        clock: ManualClock,
        recorder: Recorder,
        event_log: EventLog,
    ) -> None:
        recorder.tokens = [None, None, None]
        observed.schedule("s1", make_jwt({"exp": START}))
        clock.advance(120)
        failed = [e for e in event_log.events if isinstance(e, events.RefreshFailed)]
        assert [e.final for e in failed] == [False, False, True]
        assert [e.trigger for e in failed] == ["exp"] * 3

    def test_a_stale_result_names_its_trigger(self, clock: ManualClock) -> None:
        seen: list[events.Event] = []
        scheduler: Scheduler

        def reschedule_meanwhile() -> str:
            scheduler.schedule("s1", make_jwt({"exp": START + 99_999}))
            return "late"

        scheduler = Scheduler(
            reschedule_meanwhile, lambda _s, _t: None, clock=clock, on_event=seen.append
        )
        scheduler.schedule_from_expires_in("s1", 900)
        clock.advance(600)
        stale = [e for e in seen if isinstance(e, events.StaleDropped)]
        assert [e.trigger for e in stale] == ["expires_in"]

    @pytest.mark.parametrize("how", ["cancel", "cancel_all", "close", "schedule", "expired"])
    def test_a_dropped_retry_ends_its_refresh(
        self,
        observed: Scheduler,
        clock: ManualClock,
        recorder: Recorder,
        event_log: EventLog,
        how: str,
    ) -> None:
        """A cancel or reschedule during a retry wait reports RetryDropped, then its own event."""
        recorder.tokens = [ValueError("down")]
        observed.schedule_from_expires_in("s1", 900)
        clock.advance(600)  # fails; the retry would come at +660
        del event_log.events[:]
        if how == "schedule":
            observed.schedule("s1", make_jwt({"exp": START + 9000}))
        elif how == "expired":
            observed.schedule("s1", make_jwt({"exp": START}))  # refreshes at once
        elif how == "cancel":
            observed.cancel("s1")
        else:
            getattr(observed, how)()  # cancel_all() or close()
        dropped, following = event_log.events[:2]
        assert dropped == events.RetryDropped(
            session_id="s1", label="obs", time=START + 600, trigger="expires_in"
        )
        expected = events.Cancelled if how.startswith(("cancel", "close")) else events.Scheduled
        assert isinstance(following, expected)

    def test_cancelling_an_armed_refresh_drops_no_retry(
        self, observed: Scheduler, clock: ManualClock, event_log: EventLog
    ) -> None:
        observed.schedule("s1", make_jwt({"exp": START + 900}))
        observed.schedule("s1", make_jwt({"exp": START + 950}))
        observed.cancel("s1")
        assert event_log.names() == ["Scheduled", "Scheduled", "Cancelled"]

    def test_expiry_is_decoded_only_for_a_listener(
        self, clock: ManualClock, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        decoded: list[str] = []
        real = _expiry.claims  # the scheduler's one JWT decoder (exp and iat)

        def counting(token: str) -> tuple[float | int | None, float | int | None]:
            decoded.append(token)
            return real(token)

        monkeypatch.setattr(_scheduler, "claims", counting)
        quiet = Scheduler(recorder.get_access_token, recorder.on_refresh, clock=clock)
        quiet.schedule("s1", make_jwt({"exp": START}))
        assert len(decoded) == 1  # schedule() decodes what it was given; no event to fill


class TestIntrospection:
    def test_sessions_next_refresh_and_stats(
        self, scheduler: Scheduler, clock: ManualClock, recorder: Recorder
    ) -> None:
        """sessions(), next_refresh_at() and stats() describe what is pending and what happened."""
        recorder.tokens = ["t1", None, None, None]
        scheduler.schedule_from_expires_in("ok", 600)
        scheduler.schedule_from_expires_in("bad", 1200)
        assert scheduler.sessions() == frozenset({"ok", "bad"})
        assert scheduler.stats() == Stats(
            sessions=2, pending=2, refreshes=0, failures=0, give_ups=0
        )
        clock.advance(300)
        assert scheduler.next_refresh_at("ok") == START + 2100
        clock.advance(900)  # "bad" fails three times and gives up
        assert scheduler.sessions() == frozenset({"ok"})
        assert scheduler.next_refresh_at("bad") is None
        assert scheduler.stats() == Stats(
            sessions=1, pending=1, refreshes=1, failures=3, give_ups=1
        )


class TestClose:
    @pytest.mark.realclock
    @pytest.mark.timeout(30)
    def test_close_with_timeout_reports_work_still_running(self) -> None:
        """close(timeout) gives up waiting on a stuck fetch and says so; a later close() waits."""
        entered, release = threading.Event(), threading.Event()

        def get_access_token() -> str:
            entered.set()
            release.wait(10)
            return "t"

        sched = Scheduler(get_access_token, lambda s, t: None, refresh_buffer=0, label="stuck")
        sched.schedule("s1", make_jwt({"exp": 1}))
        assert entered.wait(10)
        started = time.monotonic()
        assert sched.close(timeout=0.1) is False
        assert time.monotonic() - started < 5
        with pytest.raises(SchedulerClosedError):
            sched.schedule_from_expires_in("s2", 600)
        release.set()
        assert sched.close() is True
        assert [t for t in threading.enumerate() if t.name.startswith("token-refresh-stuck")] == []

    @pytest.mark.realclock
    @pytest.mark.timeout(30)
    def test_close_joins_cancelled_timers(self) -> None:
        """Timers cancelled or replaced before close() are gone when it returns."""
        sched = Scheduler(lambda: "t", lambda s, t: None, label="joined")
        for n in range(50):
            sched.schedule_from_expires_in(f"s{n}", 3600)
            sched.schedule_from_expires_in(f"s{n}", 7200)
            sched.cancel(f"s{n}")
        assert sched.close(timeout=10) is True
        assert [t for t in threading.enumerate() if "joined" in t.name] == []

    def test_close_rejects_bad_timeout(self, scheduler: Scheduler) -> None:
        """A non-numeric timeout is a TypeError; zero means do not wait."""
        with pytest.raises(TypeError, match="timeout"):
            scheduler.close(timeout="soon")  # type: ignore[arg-type]
        assert scheduler.close(timeout=0) is True


@pytest.mark.realclock
@pytest.mark.timeout(60)
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
class TestFork:
    def run_in_child(self, child: Any) -> int:
        """Fork; run child() in the child and exit with its return code; return that code."""
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child; its exit code is the result
            code = 99
            try:
                code = child()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)

    def test_child_works_with_lock_busy_and_executor_warm(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Forked with the lock held by another thread and warm workers, the child refreshes."""
        delivered: dict[str, threading.Event] = {
            name: threading.Event() for name in ("warm", "parent", "child")
        }
        parent_pid = os.getpid()

        def on_refresh(session_id: str, token: str) -> None:
            delivered[session_id].set()

        sched = Scheduler(
            lambda: "t", on_refresh, refresh_buffer=0, follow_up_interval=1, label="fork"
        )
        sched.schedule("warm", make_jwt({"exp": 1}))  # starts the worker pool
        assert delivered["warm"].wait(10)
        sched.cancel("warm")
        sched.schedule_from_expires_in("parent-later", 3600)

        holding, release = threading.Event(), threading.Event()

        def hold_lock() -> None:
            with sched._lock:  # the lock is busy at the moment of fork()
                holding.set()
                release.wait(10)

        holder = ReraisingThread(hold_lock)
        holder.start()
        assert holding.wait(10)

        def child() -> int:
            if sched.sessions():  # the parent's session is not refreshed here
                return 3
            sched.schedule("child", make_jwt({"exp": 1}))
            if not delivered["child"].wait(10):
                return 4
            sched.cancel("child")
            return 0 if sched.close(timeout=10) else 5

        code = self.run_in_child(child)
        release.set()
        holder.join()
        assert os.getpid() == parent_pid
        assert code == 0
        sched.schedule("parent", make_jwt({"exp": 1}))
        assert delivered["parent"].wait(10)
        assert "parent-later" in sched.sessions()
        assert sched.close(timeout=10)

    def test_child_warns_once_about_dropped_sessions(self, tmp_path: Any) -> None:
        """The child logs one WARNING with the number of inherited sessions it will not refresh."""
        sched = Scheduler(lambda: "t", lambda s, t: None, label="warn")
        sched.schedule_from_expires_in("a", 3600)
        sched.schedule_from_expires_in("b", 3600)
        handler = logging.FileHandler(tmp_path / "child.log")
        handler.setFormatter(logging.Formatter("%(process)d %(levelname)s %(message)s"))
        logger = logging.getLogger("token_refresh")
        logger.addHandler(handler)

        def child() -> int:
            sched.after_fork()  # a post_fork hook calling it again changes nothing
            sched.schedule_from_expires_in("mine", 3600)
            return 0 if sched.sessions() == {"mine"} else 6

        try:
            assert self.run_in_child(child) == 0
        finally:
            logger.removeHandler(handler)
            handler.close()
        lines = (tmp_path / "child.log").read_text().splitlines()
        warnings = [line for line in lines if " WARNING [warn:token] " in line]
        assert len(warnings) == 1, lines
        assert warnings[0].split()[0] != str(os.getpid())  # logged by the child
        assert "[warn:token] Forked: 2 session(s) scheduled in the parent process" in warnings[0]
        assert sched.sessions() == {"a", "b"}
        sched.close()

    def test_child_with_nothing_inherited_stays_quiet(
        self, scheduler: Scheduler, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A child that inherited no sessions resets without a warning."""
        scheduler._state.pid = -1  # as if forked
        assert scheduler.sessions() == frozenset()
        assert caplog.records == []

    def test_concurrent_first_calls_in_a_child_reset_once(
        self, scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A reset done by another thread of the child while this one waited is kept."""
        import token_refresh._scheduler as scheduler_module

        class OtherThreadWins:
            """Stands in for the fork lock while another thread resets and schedules."""

            def __enter__(self) -> None:
                scheduler._reset_state()
                scheduler.schedule_from_expires_in("scheduled-by-the-winner", 600)

            def __exit__(self, *exc_info: object) -> None:
                pass

        scheduler.schedule_from_expires_in("inherited", 600)
        scheduler._state.pid = -1
        monkeypatch.setattr(scheduler_module, "_fork_lock", OtherThreadWins())
        assert scheduler.sessions() == {"scheduled-by-the-winner"}

    def test_pid_check_covers_forks_without_hooks(
        self, clock: ManualClock, recorder: Recorder, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A child forked without at-fork hooks (uWSGI) resets at its first call."""
        sched = Scheduler(recorder.get_access_token, recorder.on_refresh, clock=clock, label="uw")
        sched.schedule_from_expires_in("inherited", 600)
        sched.schedule_from_expires_in("also", 600)
        sched._state.pid = -1  # as if this were a child forked with no Python at-fork hooks
        caplog.set_level(logging.WARNING, logger="token_refresh")
        assert sched.sessions() == frozenset()
        assert sched.sessions() == frozenset()
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1
        assert warnings[0].startswith("[uw:token] Forked: 2 session(s) scheduled in the parent")
        clock.advance(3600)
        assert recorder.calls == []
        sched.schedule_from_expires_in("mine", 600)
        clock.advance(300)
        assert recorder.gets == [3900.0]
