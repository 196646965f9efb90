"""Bad input gets a clear error at the call, and nothing already scheduled is lost."""

from __future__ import annotations

from typing import Any

import pytest

from token_refresh import Scheduler
from token_refresh.testing import ManualClock

from conftest import START, Recorder, make_jwt

GOOD_JWT = make_jwt({"exp": START + 1000})


@pytest.fixture
def armed(scheduler: Scheduler) -> Scheduler:
    """A scheduler whose session s1 is due at START + 700."""
    scheduler.schedule("s1", GOOD_JWT)
    return scheduler


def assert_still_refreshes(sched: Scheduler, clock: ManualClock, recorder: Recorder) -> None:
    assert sched.next_refresh_at("s1") == START + 700
    clock.advance(700)
    assert recorder.gets == [700.0]


class TestScheduleArguments:
    @pytest.mark.parametrize("session_id", [None, 1, b"s1", ["s1"]])
    def test_non_str_session_id(
        self, armed: Scheduler, clock: ManualClock, recorder: Recorder, session_id: Any
    ) -> None:
        """A session id that is not a str raises TypeError naming the argument."""
        with pytest.raises(TypeError, match="session_id must be a str"):
            armed.schedule(session_id, GOOD_JWT)
        with pytest.raises(TypeError, match="session_id must be a str"):
            armed.schedule_from_expires_in(session_id, 3600)
        with pytest.raises(TypeError, match="session_id must be a str"):
            armed.cancel(session_id)
        with pytest.raises(TypeError, match="session_id must be a str"):
            armed.next_refresh_at(session_id)
        assert_still_refreshes(armed, clock, recorder)

    @pytest.mark.parametrize("token", [None, 42, GOOD_JWT.encode()])
    def test_non_str_token(
        self, armed: Scheduler, clock: ManualClock, recorder: Recorder, token: Any
    ) -> None:
        """A token that is not a str raises TypeError and keeps the session's timer."""
        with pytest.raises(TypeError, match="token must be a str, not"):
            armed.schedule("s1", token)
        assert_still_refreshes(armed, clock, recorder)

    @pytest.mark.parametrize("expires_in", ["3600", None, True, [3600], b"1"])
    def test_non_numeric_expires_in(
        self, armed: Scheduler, clock: ManualClock, recorder: Recorder, expires_in: Any
    ) -> None:
        """A non-numeric expires_in (a bool included) raises TypeError."""
        with pytest.raises(TypeError, match="expires_in must be a number of seconds"):
            armed.schedule_from_expires_in("s1", expires_in)
        assert_still_refreshes(armed, clock, recorder)

    @pytest.mark.parametrize("expires_in", [float("nan"), float("inf"), float("-inf"), 10**400])
    def test_non_finite_expires_in(
        self, armed: Scheduler, clock: ManualClock, recorder: Recorder, expires_in: float
    ) -> None:
        """A NaN, infinite or unrepresentable expires_in raises ValueError."""
        with pytest.raises(ValueError, match="expires_in"):
            armed.schedule_from_expires_in("s1", expires_in)
        assert_still_refreshes(armed, clock, recorder)


class TestConstructorArguments:
    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"get_access_token": "x"}, TypeError, "get_access_token must be callable"),
            ({"on_refresh": None}, TypeError, "on_refresh must be callable"),
            ({"label": 3}, TypeError, "label must be a str"),
            ({"refresh_buffer": "300"}, TypeError, "refresh_buffer must be a number"),
            ({"refresh_buffer": -1}, ValueError, "must not be negative"),
            ({"refresh_buffer": float("nan")}, ValueError, "refresh_buffer must be finite"),
            ({"retry_delay": 0}, ValueError, "retry_delay must be at least 1 second"),
            ({"follow_up_interval": -5}, ValueError, "follow_up_interval must be at least 1"),
            ({"max_workers": 0}, ValueError, "at least 1"),
            ({"max_workers": 2.0}, TypeError, "max_workers must be an int"),
            ({"max_workers": True}, TypeError, "max_workers must be an int"),
            ({"clock": object()}, TypeError, "clock must be a ManualClock"),
        ],
    )
    def test_bad_option(self, kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
        """Each bad option is refused with a message that names it."""
        arguments: dict[str, Any] = {
            "get_access_token": lambda: "t",
            "on_refresh": lambda session_id, token: None,
        }
        arguments.update(kwargs)
        with pytest.raises(error, match=match):
            Scheduler(**arguments)


class TestRefusedTimer:
    def test_schedule_keeps_old_timer_when_a_new_one_is_refused(
        self,
        armed: Scheduler,
        clock: ManualClock,
        recorder: Recorder,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """If no timer can be armed (no threads left), schedule() raises and keeps the old one."""

        def refuse(timer: object) -> None:
            raise RuntimeError("can't start new thread")

        with monkeypatch.context() as patch:
            patch.setattr(clock, "_push", refuse)  # the seam a scheduler's alarms arm through
            with pytest.raises(RuntimeError, match="cannot arm a refresh timer for session 's1'"):
                armed.schedule("s1", make_jwt({"exp": START + 5000}))
            with pytest.raises(RuntimeError, match="existing timer is kept"):
                armed.schedule_from_expires_in("s1", 5000)
        assert_still_refreshes(armed, clock, recorder)

    @pytest.mark.parametrize("token", [None, "ok"])
    def test_refused_retry_or_follow_up_ends_the_chain_loudly(
        self,
        scheduler: Scheduler,
        clock: ManualClock,
        recorder: Recorder,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
        token: str | None,
    ) -> None:
        """A retry or follow-up that cannot be armed is logged as an error; the session ends."""
        recorder.tokens = [token]
        scheduler.schedule_from_expires_in("s1", 600)
        original = clock._push

        def refuse(timer: object) -> None:
            raise RuntimeError("can't start new thread")

        monkeypatch.setattr(clock, "_push", refuse)  # the seam a scheduler's alarms arm through
        clock.advance(300)
        monkeypatch.setattr(clock, "_push", original)
        assert scheduler.next_refresh_at("s1") is None
        assert any(
            r.levelname == "ERROR" and "refresh chain for sessionId=s1 stopped" in r.message
            for r in caplog.records
        )
        scheduler.schedule_from_expires_in("s1", 600)  # the session can start again
        assert scheduler.next_refresh_at("s1") == START + 600
