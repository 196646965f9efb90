"""The seed's behaviour, branch by branch, driven by a ManualClock."""

from __future__ import annotations

from datetime import timedelta

import pytest

from token_refresh import Scheduler
from token_refresh.testing import ManualClock

from conftest import START, Recorder, make_jwt


def jwt_expiring_in(seconds: float) -> str:
    return make_jwt({"sub": "user", "exp": START + seconds})


class TestSchedule:
    def test_refreshes_buffer_seconds_before_expiry(
        self, scheduler: Scheduler, clock: ManualClock, recorder: Recorder
    ) -> None:
        """A token expiring in 1 h is refreshed at 55 min, not a second earlier."""
        scheduler.schedule("s1", jwt_expiring_in(3600))
        clock.advance(3300 - 1)
        assert recorder.calls == []
        clock.advance(1)
        assert recorder.calls == [("get", 3300.0), ("deliver", 3300.0, "s1", "access-token")]

    def test_token_within_buffer_refreshes_immediately(
        self, scheduler: Scheduler, recorder: Recorder
    ) -> None:
        """A token expiring inside the buffer is refreshed during schedule() itself."""
        scheduler.schedule("s1", jwt_expiring_in(120))
        assert recorder.calls == [("get", 0.0), ("deliver", 0.0, "s1", "access-token")]

    def test_expired_token_refreshes_immediately(
        self, scheduler: Scheduler, recorder: Recorder
    ) -> None:
        """A token that has already expired is refreshed at once."""
        scheduler.schedule("s1", jwt_expiring_in(-3600))
        assert recorder.gets == [0.0]

    def test_token_expiring_exactly_at_buffer_refreshes_immediately(
        self, scheduler: Scheduler, recorder: Recorder
    ) -> None:
        """A delay of exactly zero counts as due, as the seed's `delayMs <= 0` does."""
        scheduler.schedule("s1", jwt_expiring_in(300))
        assert recorder.gets == [0.0]

    def test_undecodable_token_keeps_existing_timer(
        self, scheduler: Scheduler, clock: ManualClock, recorder: Recorder
    ) -> None:
        """A token without a usable exp leaves the session's timer as it was."""
        scheduler.schedule("s1", jwt_expiring_in(1000))
        scheduler.schedule("s1", "opaque-oauth-token")
        scheduler.schedule("s1", make_jwt({"sub": "no exp"}))
        clock.advance(700)
        assert recorder.gets == [700.0]

    def test_undecodable_token_arms_nothing_for_new_session(
        self, scheduler: Scheduler, clock: ManualClock, recorder: Recorder
    ) -> None:
        """An undecodable token for an unknown session schedules nothing."""
        scheduler.schedule("s1", "not.a-jwt")
        assert scheduler.next_refresh_at("s1") is None
        clock.advance(10 * 3600)
        assert recorder.calls == []

    def test_exp_zero_counts_as_missing(
        self, scheduler: Scheduler, clock: ManualClock, recorder: Recorder
    ) -> None:
        """An exp of 0 is falsy in the seed, so it keeps the existing timer instead of firing."""
        scheduler.schedule("s1", jwt_expiring_in(1000))
        scheduler.schedule("s1", make_jwt({"exp": 0}))
        assert recorder.calls == []
        clock.advance(700)
        assert recorder.gets == [700.0]

    def test_reschedule_replaces_timer(
        self, scheduler: Scheduler, clock: ManualClock, recorder: Recorder
    ) -> None:
        """A second schedule() replaces the first timer rather than adding one."""
        scheduler.schedule("s1", jwt_expiring_in(1000))
        scheduler.schedule("s1", jwt_expiring_in(2000))
        clock.advance(1699)
        assert recorder.calls == []
        clock.advance(1)
        assert recorder.gets == [1700.0]
        assert clock.pending == 1  # only the follow-up

    def test_session_ingress_prefix_is_stripped(
        self, scheduler: Scheduler, clock: ManualClock, recorder: Recorder
    ) -> None:
        """An sk-ant-si- prefixed JWT is scheduled from its exp."""
        scheduler.schedule("s1", make_jwt({"exp": START + 900}, prefix="sk-ant-si-"))
        assert scheduler.next_refresh_at("s1") == START + 600

    @pytest.mark.parametrize("buffer", [60, 60.0, timedelta(minutes=1)])
    def test_custom_refresh_buffer(
        self, clock: ManualClock, recorder: Recorder, buffer: float | timedelta
    ) -> None:
        """refresh_buffer takes seconds or a timedelta."""
        sched = Scheduler(
            recorder.get_access_token, recorder.on_refresh, clock=clock, refresh_buffer=buffer
        )
        assert sched.refresh_buffer == 60.0
        sched.schedule("s1", jwt_expiring_in(1000))
        clock.advance(940)
        assert recorder.gets == [940.0]

    def test_sessions_are_independent(
        self, scheduler: Scheduler, clock: ManualClock, recorder: Recorder
    ) -> None:
        """Each session has its own timer, and timers due together fire in the order armed."""
        scheduler.schedule("b", jwt_expiring_in(900))
        scheduler.schedule("a", jwt_expiring_in(900))
        scheduler.schedule("c", jwt_expiring_in(400))
        clock.advance(600)
        assert [d[1] for d in recorder.deliveries] == ["c", "b", "a"]


class TestScheduleFromExpiresIn:
    def test_fires_buffer_before_expiry(
        self, scheduler: Scheduler, clock: ManualClock, recorder: Recorder
    ) -> None:
        """expires_in=3600 refreshes after 3300 seconds."""
        scheduler.schedule_from_expires_in("s1", 3600)
        assert scheduler.next_refresh_at("s1") == START + 3300
        clock.advance(3300)
        assert recorder.gets == [3300.0]

    @pytest.mark.parametrize("expires_in", [0, 10, 300, 330, -50])
    def test_floor_of_thirty_seconds(
        self, scheduler: Scheduler, clock: ManualClock, recorder: Recorder, expires_in: float
    ) -> None:
        """A lifetime shorter than buffer + 30 s still waits 30 s, so it never tight-loops."""
        scheduler.schedule_from_expires_in("s1", expires_in)
        clock.advance(29.9)
        assert recorder.gets == []
        clock.advance(0.1)
        assert recorder.gets == [30.0]

    def test_replaces_existing_timer(
        self, scheduler: Scheduler, clock: ManualClock, recorder: Recorder
    ) -> None:
        """schedule_from_expires_in() replaces a timer armed by schedule()."""
        scheduler.schedule("s1", jwt_expiring_in(1000))
        scheduler.schedule_from_expires_in("s1", 1200)
        clock.advance(899)
        assert recorder.gets == []
        clock.advance(1)
        assert recorder.gets == [900.0]

    def test_timedelta_and_float(
        self, scheduler: Scheduler, clock: ManualClock, recorder: Recorder
    ) -> None:
        """expires_in may be a float or a timedelta."""
        scheduler.schedule_from_expires_in("a", 400.5)
        scheduler.schedule_from_expires_in("b", timedelta(seconds=500))
        assert scheduler.next_refresh_at("a") == START + 100.5
        assert scheduler.next_refresh_at("b") == START + 200


class TestRefresh:
    def test_success_delivers_and_arms_follow_up(
        self, scheduler: Scheduler, clock: ManualClock, recorder: Recorder
    ) -> None:
        """A token is delivered and a follow-up refresh is due 30 minutes later."""
        scheduler.schedule_from_expires_in("s1", 600)
        clock.advance(300)
        assert recorder.deliveries == [(300.0, "s1", "access-token")]
        assert scheduler.next_refresh_at("s1") == START + 300 + 1800

    def test_follow_ups_keep_a_session_fresh_for_hours(
        self, scheduler: Scheduler, clock: ManualClock, recorder: Recorder
    ) -> None:
        """Follow-ups repeat every 30 minutes for as long as the session lives."""
        recorder.tokens = [f"token-{n}" for n in range(1, 12)]
        scheduler.schedule("s1", jwt_expiring_in(600))
        clock.advance(5 * 3600)
        assert recorder.deliveries == [
            (300.0 + 1800 * n, "s1", f"token-{n + 1}") for n in range(10)
        ]

    def test_none_retries_after_a_minute_and_recovers(
        self, scheduler: Scheduler, clock: ManualClock, recorder: Recorder
    ) -> None:
        """No token is a failure retried after 60 s; the next token is delivered."""
        recorder.tokens = [None, None, "fresh"]
        scheduler.schedule_from_expires_in("s1", 600)
        clock.advance(300 + 120)
        assert recorder.gets == [300.0, 360.0, 420.0]
        assert recorder.deliveries == [(420.0, "s1", "fresh")]
        assert scheduler.next_refresh_at("s1") == START + 420 + 1800

    def test_exception_counts_as_failure(
        self, scheduler: Scheduler, clock: ManualClock, recorder: Recorder
    ) -> None:
        """An exception from get_access_token is retried like None."""
        recorder.tokens = [OSError("connection refused"), "fresh"]
        scheduler.schedule_from_expires_in("s1", 600)
        clock.advance(360)
        assert recorder.gets == [300.0, 360.0]
        assert recorder.deliveries == [(360.0, "s1", "fresh")]

    def test_empty_string_counts_as_failure(
        self, scheduler: Scheduler, clock: ManualClock, recorder: Recorder
    ) -> None:
        """An empty token is falsy in the seed: a failure, not a delivery."""
        recorder.tokens = [""]
        scheduler.schedule_from_expires_in("s1", 600)
        clock.advance(300)
        assert recorder.deliveries == []
        assert scheduler.next_refresh_at("s1") == START + 360

    @pytest.mark.parametrize("bad", [b"bytes-token", 42, {"access_token": "x"}, True])
    def test_non_str_token_counts_as_failure(
        self,
        scheduler: Scheduler,
        clock: ManualClock,
        recorder: Recorder,
        bad: object,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """A token that is not a str is logged as an error and retried like None."""
        recorder.tokens = [bad, "fresh"]
        scheduler.schedule_from_expires_in("s1", 600)
        clock.advance(360)
        assert recorder.deliveries == [(360.0, "s1", "fresh")]
        assert any(
            r.levelname == "ERROR" and f"returned {type(bad).__name__}, not a str" in r.message
            for r in caplog.records
        )

    def test_gives_up_after_third_consecutive_failure(
        self, scheduler: Scheduler, clock: ManualClock, recorder: Recorder
    ) -> None:
        """Three failures in a row end the chain: no fourth call, no timer left."""
        recorder.default = None
        scheduler.schedule_from_expires_in("s1", 600)
        clock.advance(10 * 3600)
        assert recorder.gets == [300.0, 360.0, 420.0]
        assert scheduler.next_refresh_at("s1") is None
        assert clock.pending == 0

    def test_success_resets_failure_count(
        self, scheduler: Scheduler, clock: ManualClock, recorder: Recorder
    ) -> None:
        """After a delivered token, failures are counted from zero again."""
        recorder.tokens = [None, None, "ok", None, None, "ok again"]
        scheduler.schedule_from_expires_in("s1", 600)
        clock.advance(420 + 1800 + 120)
        assert recorder.gets == [300.0, 360.0, 420.0, 2220.0, 2280.0, 2340.0]
        assert [d[2] for d in recorder.deliveries] == ["ok", "ok again"]

    def test_failures_carry_across_schedule(
        self, scheduler: Scheduler, clock: ManualClock, recorder: Recorder
    ) -> None:
        """schedule() keeps the failure count, so two old failures and one new one give up."""
        recorder.default = None
        scheduler.schedule_from_expires_in("s1", 600)
        clock.advance(360)  # failures 1 and 2
        scheduler.schedule("s1", jwt_expiring_in(2000))
        clock.advance(10 * 3600)
        assert recorder.gets == [300.0, 360.0, 1700.0]
        assert clock.pending == 0

    def test_failure_count_after_giving_up_persists_until_success(
        self, scheduler: Scheduler, clock: ManualClock, recorder: Recorder
    ) -> None:
        """As in the seed, a session that gave up gets no retry on its next failure."""
        recorder.tokens = [None, None, None, None, "ok", None]
        scheduler.schedule_from_expires_in("s1", 600)
        clock.advance(3600)
        scheduler.schedule_from_expires_in("s1", 600)  # 4th failure: no retry
        clock.advance(3600)
        scheduler.schedule_from_expires_in("s1", 600)  # success resets the count
        clock.advance(300 + 1800)  # the follow-up fails once and is retried
        assert recorder.gets == [300.0, 360.0, 420.0, 3900.0, 7500.0, 9300.0]
        assert scheduler.next_refresh_at("s1") == START + 9360

    def test_on_refresh_exception_keeps_the_chain(
        self, clock: ManualClock, recorder: Recorder, caplog: pytest.LogCaptureFixture
    ) -> None:
        """An exception from on_refresh is logged and the follow-up still comes."""
        delivered: list[float] = []

        def on_refresh(session_id: str, token: str) -> None:
            delivered.append(clock.time() - START)
            raise RuntimeError("transport closed")

        sched = Scheduler(recorder.get_access_token, on_refresh, clock=clock)
        sched.schedule_from_expires_in("s1", 600)
        clock.advance(300 + 1800)
        assert delivered == [300.0, 2100.0]
        assert [r.levelname for r in caplog.records if "on_refresh raised" in r.message] == [
            "ERROR",
            "ERROR",
        ]

    def test_custom_retry_delay_and_follow_up_interval(
        self, clock: ManualClock, recorder: Recorder
    ) -> None:
        """retry_delay and follow_up_interval replace the seed's 60 s and 30 min."""
        recorder.tokens = [None, "ok", "ok"]
        sched = Scheduler(
            recorder.get_access_token,
            recorder.on_refresh,
            clock=clock,
            retry_delay=5,
            follow_up_interval=timedelta(minutes=2),
        )
        sched.schedule_from_expires_in("s1", 600)
        clock.advance(305 + 120)
        assert recorder.gets == [300.0, 305.0, 425.0]


class TestStale:
    def test_reschedule_during_fetch_drops_the_result(
        self, clock: ManualClock, recorder: Recorder
    ) -> None:
        """A schedule() that lands while get_access_token runs makes its token stale."""
        sched: Scheduler

        def get_access_token() -> str | None:
            token = recorder.get_access_token()
            if len(recorder.gets) == 1:
                sched.schedule("s1", jwt_expiring_in(clock.time() - START + 1000))
                return "stale-token"
            return token

        sched = Scheduler(get_access_token, recorder.on_refresh, clock=clock)
        sched.schedule_from_expires_in("s1", 600)
        clock.advance(300)
        assert recorder.deliveries == []
        assert sched.next_refresh_at("s1") == START + 300 + 700
        clock.advance(700)
        assert recorder.deliveries == [(1000.0, "s1", "access-token")]

    def test_cancel_during_fetch_drops_the_result(
        self, clock: ManualClock, recorder: Recorder
    ) -> None:
        """A cancel() that lands while get_access_token runs drops the token and the chain."""
        sched: Scheduler

        def get_access_token() -> str:
            recorder.get_access_token()
            sched.cancel("s1")
            return "stale-token"

        sched = Scheduler(get_access_token, recorder.on_refresh, clock=clock)
        sched.schedule_from_expires_in("s1", 600)
        clock.advance(10 * 3600)
        assert recorder.gets == [300.0]
        assert recorder.deliveries == []
        assert clock.pending == 0

    def test_cancel_all_during_fetch_drops_the_result(
        self, clock: ManualClock, recorder: Recorder
    ) -> None:
        """A cancel_all() while get_access_token runs drops every session's result."""
        sched: Scheduler

        def get_access_token() -> None:
            recorder.get_access_token()
            sched.cancel_all()

        sched = Scheduler(get_access_token, recorder.on_refresh, clock=clock)
        sched.schedule_from_expires_in("s1", 600)
        sched.schedule_from_expires_in("s2", 900)
        clock.advance(10 * 3600)
        assert recorder.gets == [300.0]
        assert clock.pending == 0

    def test_failure_during_reschedule_is_not_counted(
        self, clock: ManualClock, recorder: Recorder
    ) -> None:
        """A failed fetch that went stale neither counts a failure nor arms a retry."""
        sched: Scheduler
        outcomes: list[str | None] = [None, None, None, "ok"]

        def get_access_token() -> str | None:
            recorder.get_access_token()
            if len(recorder.gets) == 1:
                sched.schedule_from_expires_in("s1", 600)
            return outcomes.pop(0)

        sched = Scheduler(get_access_token, recorder.on_refresh, clock=clock)
        sched.schedule_from_expires_in("s1", 600)
        clock.advance(300)  # stale failure: not counted
        clock.advance(300 + 120)  # two real failures, then the third call succeeds
        assert recorder.gets == [300.0, 600.0, 660.0, 720.0]
        assert [d[2] for d in recorder.deliveries] == ["ok"]


class TestCancel:
    def test_cancel_stops_the_timer(
        self, scheduler: Scheduler, clock: ManualClock, recorder: Recorder
    ) -> None:
        """A cancelled session is never refreshed."""
        scheduler.schedule("s1", jwt_expiring_in(1000))
        scheduler.cancel("s1")
        clock.advance(10 * 3600)
        assert recorder.calls == []
        assert scheduler.next_refresh_at("s1") is None

    def test_cancel_unknown_session_is_a_no_op(self, scheduler: Scheduler) -> None:
        """Cancelling a session that was never scheduled does nothing and leaves no state."""
        scheduler.cancel("never-seen")
        assert repr(scheduler) == "Scheduler(label='token_refresh', pending=0, closed=False)"

    def test_cancel_clears_failure_count(
        self, scheduler: Scheduler, clock: ManualClock, recorder: Recorder
    ) -> None:
        """After cancel(), a session starts with a clean failure count."""
        recorder.default = None
        scheduler.schedule_from_expires_in("s1", 600)
        clock.advance(360)  # two failures
        scheduler.cancel("s1")
        scheduler.schedule_from_expires_in("s1", 600)
        clock.advance(300)  # failure 1 again: retried
        assert scheduler.next_refresh_at("s1") == START + 360 + 300 + 60

    def test_cancel_all_stops_every_session_and_clears_failures(
        self, scheduler: Scheduler, clock: ManualClock, recorder: Recorder
    ) -> None:
        """cancel_all() stops every timer and resets every failure count."""
        recorder.default = None
        scheduler.schedule_from_expires_in("a", 600)
        scheduler.schedule_from_expires_in("b", 900)
        clock.advance(360)  # a: two failures
        scheduler.cancel_all()
        clock.advance(10 * 3600)
        assert recorder.gets == [300.0, 360.0]
        scheduler.schedule_from_expires_in("a", 600)
        clock.advance(300)
        assert scheduler.next_refresh_at("a") is not None  # failure 1 of 3, retrying

    def test_cancel_frees_state_for_many_sessions(
        self, scheduler: Scheduler, clock: ManualClock
    ) -> None:
        """Scheduling and cancelling many distinct sessions leaves nothing behind."""
        for n in range(1000):
            scheduler.schedule_from_expires_in(f"s{n}", 600)
            scheduler.cancel(f"s{n}")
        assert repr(scheduler).endswith("pending=0, closed=False)")
        assert clock.pending == 0


class TestNestedCalls:
    def test_schedule_inside_on_refresh_supersedes_follow_up(
        self, clock: ManualClock, recorder: Recorder
    ) -> None:
        """A schedule() from on_refresh replaces the follow-up: one timer, at the new time."""
        sched: Scheduler

        def on_refresh(session_id: str, token: str) -> None:
            recorder.on_refresh(session_id, token)
            sched.schedule(session_id, jwt_expiring_in(clock.time() - START + 3600))

        sched = Scheduler(recorder.get_access_token, on_refresh, clock=clock)
        sched.schedule_from_expires_in("s1", 600)
        clock.advance(300)
        assert clock.pending == 1
        assert sched.next_refresh_at("s1") == START + 300 + 3300
        sched.cancel("s1")
        assert clock.pending == 0
        clock.advance(10 * 3600)
        assert recorder.gets == [300.0]

    def test_schedule_from_expires_in_inside_on_refresh_supersedes_follow_up(
        self, clock: ManualClock, recorder: Recorder
    ) -> None:
        """schedule_from_expires_in() from on_refresh also replaces the follow-up."""
        sched: Scheduler

        def on_refresh(session_id: str, token: str) -> None:
            recorder.on_refresh(session_id, token)
            sched.schedule_from_expires_in(session_id, 900)

        sched = Scheduler(recorder.get_access_token, on_refresh, clock=clock)
        sched.schedule_from_expires_in("s1", 600)
        clock.advance(300 + 600 + 600)
        assert recorder.gets == [300.0, 900.0, 1500.0]
        assert clock.pending == 1

    def test_immediate_refresh_from_on_refresh_runs_after_it_returns(
        self, clock: ManualClock, recorder: Recorder
    ) -> None:
        """An immediate refresh armed inside on_refresh fetches at once but delivers afterwards."""
        sched: Scheduler
        events: list[str] = []

        def get_access_token() -> str:
            events.append("get")
            return "t"

        def on_refresh(session_id: str, token: str) -> None:
            events.append(f"start {session_id}")
            if session_id == "a":
                sched.schedule("b", jwt_expiring_in(0))
            events.append(f"end {session_id}")

        sched = Scheduler(get_access_token, on_refresh, clock=clock)
        sched.schedule_from_expires_in("a", 600)
        clock.advance(300)
        assert events == ["get", "start a", "get", "end a", "start b", "end b"]

    def test_same_session_rescheduled_immediately_inside_on_refresh(
        self, clock: ManualClock, recorder: Recorder
    ) -> None:
        """An expired token rescheduled from its own on_refresh is delivered after, not inside."""
        sched: Scheduler
        depth = 0
        seen: list[int] = []

        def on_refresh(session_id: str, token: str) -> None:
            nonlocal depth
            depth += 1
            seen.append(depth)
            if len(seen) == 1:
                sched.schedule(session_id, jwt_expiring_in(60))
            depth -= 1

        sched = Scheduler(recorder.get_access_token, on_refresh, clock=clock)
        sched.schedule_from_expires_in("s1", 600)
        clock.advance(300)
        assert seen == [1, 1]
        assert sched.next_refresh_at("s1") == START + 300 + 1800

    def test_cancel_inside_on_refresh_stops_follow_up(
        self, clock: ManualClock, recorder: Recorder
    ) -> None:
        """cancel() from inside the session's own on_refresh returns and arms nothing."""
        sched: Scheduler

        def on_refresh(session_id: str, token: str) -> None:
            recorder.on_refresh(session_id, token)
            sched.cancel(session_id)

        sched = Scheduler(recorder.get_access_token, on_refresh, clock=clock)
        sched.schedule_from_expires_in("s1", 600)
        clock.advance(10 * 3600)
        assert len(recorder.deliveries) == 1
        assert clock.pending == 0

    def test_cancel_all_and_close_inside_on_refresh(
        self, clock: ManualClock, recorder: Recorder
    ) -> None:
        """cancel_all() and close() from inside on_refresh return at once and stop everything."""
        sched: Scheduler

        def on_refresh(session_id: str, token: str) -> None:
            recorder.on_refresh(session_id, token)
            sched.cancel_all()
            sched.close()

        sched = Scheduler(recorder.get_access_token, on_refresh, clock=clock)
        sched.schedule_from_expires_in("a", 600)
        sched.schedule_from_expires_in("b", 700)
        clock.advance(10 * 3600)
        assert len(recorder.deliveries) == 1
        assert clock.pending == 0
        assert "closed=True" in repr(sched)


class TestFarFuture:
    def test_far_future_exp_does_not_fire_early(
        self, scheduler: Scheduler, clock: ManualClock, recorder: Recorder
    ) -> None:
        """An exp centuries ahead is armed in steps and never fires before it is due."""
        exp = START + 1e12
        scheduler.schedule("s1", make_jwt({"exp": exp}))
        assert scheduler.next_refresh_at("s1") == exp - 300
        for _ in range(99):  # each step is longer than any one timer may wait
            clock.advance(1e10)
        clock.advance(1e12 - 300 - 99 * 1e10 - 1)
        assert recorder.calls == []
        clock.advance(1)
        assert recorder.gets == [1e12 - 300]

    @pytest.mark.parametrize("exp", [1.7e308, 2**1000, 9e15])
    def test_huge_exp_does_not_crash(
        self, scheduler: Scheduler, clock: ManualClock, recorder: Recorder, exp: float
    ) -> None:
        """An exp beyond what datetime or timers hold is accepted and stays pending."""
        scheduler.schedule("s1", make_jwt({"exp": exp}))
        clock.advance(1e10)
        assert recorder.calls == []
        assert scheduler.next_refresh_at("s1") is not None

    def test_huge_expires_in_does_not_crash(
        self, scheduler: Scheduler, clock: ManualClock, recorder: Recorder
    ) -> None:
        """A huge expires_in is accepted and does not fire early."""
        scheduler.schedule_from_expires_in("s1", 1e300)
        clock.advance(1e10)
        assert recorder.calls == []

    @pytest.mark.parametrize("exp", [float("nan"), float("inf"), True, "1800000000", None])
    def test_non_finite_or_non_number_exp_is_no_expiry(
        self, scheduler: Scheduler, clock: ManualClock, recorder: Recorder, exp: object
    ) -> None:
        """An exp that is not a finite number keeps the existing timer, like a missing one."""
        scheduler.schedule("s1", jwt_expiring_in(1000))
        scheduler.schedule("s1", make_jwt({"exp": exp}) if exp is not None else make_jwt({}))
        assert scheduler.next_refresh_at("s1") == START + 700
