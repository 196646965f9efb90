"""What the scheduler logs, and that token material never reaches a log or a repr."""

from __future__ import annotations

import logging

import pytest
import time_machine

from token_refresh import Scheduler
from token_refresh.testing import ManualClock

from conftest import START, Recorder, make_jwt

SECRET_JWT = make_jwt({"sub": "alice@example.com", "exp": START + 900, "jti": "q7Zr9xLm2Pw"})
SECRET_ACCESS = "ya29.A0ARrdaM-very-secret-access-token-value"


def windows(secret: str, width: int = 8) -> set[str]:
    """Every substring of ``secret`` of the given width: any of them in a log is a leak."""
    return {secret[i : i + width] for i in range(len(secret) - width + 1)}


class TestNoTokenMaterial:
    def test_debug_logs_and_reprs_never_contain_tokens(
        self, clock: ManualClock, caplog: pytest.LogCaptureFixture
    ) -> None:
        """At DEBUG, across every log point, no 8-character piece of any token appears."""
        caplog.set_level(logging.DEBUG, logger="token_refresh")
        outcomes: list[object] = [
            None,
            ValueError(f"server rejected {SECRET_ACCESS}"),
            SECRET_ACCESS,
            42,
            SECRET_ACCESS,
        ]

        def get_access_token() -> str | None:
            value = outcomes.pop(0) if outcomes else SECRET_ACCESS
            if isinstance(value, Exception):
                raise value
            return value  # type: ignore[return-value]

        def on_refresh(session_id: str, token: str) -> None:
            raise RuntimeError(f"could not deliver {token}")

        sched = Scheduler(get_access_token, on_refresh, clock=clock, label="leak-check")
        sched.schedule("s1", SECRET_JWT)
        sched.schedule("s1", "opaque-" + SECRET_ACCESS)
        sched.schedule("s2", make_jwt({"exp": START - 5, "jti": "q7Zr9xLm2Pw"}))
        sched.schedule_from_expires_in("s3", 3600)
        clock.advance(4 * 3600)
        sched.cancel("s1")
        texts = [r.getMessage() for r in caplog.records] + [repr(sched), repr(clock)]
        assert len(caplog.records) > 15
        secrets = set()
        for token in (SECRET_JWT, SECRET_ACCESS, *SECRET_JWT.split(".")):
            secrets |= windows(token)
        leaks = [(text, s) for text in texts for s in secrets if s in text]
        assert leaks == []
        assert any("sha256:" in text for text in texts)


class TestLogLines:
    def test_lines_start_with_label_and_levels_match_the_seed(
        self, clock: ManualClock, recorder: Recorder, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Every line starts with [label:token]; failures are ERROR, the rest DEBUG."""
        caplog.set_level(logging.DEBUG, logger="token_refresh")
        recorder.tokens = [OSError("down"), None]
        sched = Scheduler(recorder.get_access_token, recorder.on_refresh, clock=clock, label="api")
        sched.schedule("s1", make_jwt({"exp": START + 1000}))
        clock.advance(700 + 120)
        lines = [(r.levelname, r.getMessage()) for r in caplog.records]
        assert all(message.startswith("[api:token] ") for _, message in lines)
        assert lines == [
            (
                "DEBUG",
                "[api:token] Scheduled token refresh for sessionId=s1 in 11m 40s "
                "(expires=2027-01-15T08:16:40.000Z, buffer=300s)",
            ),
            ("ERROR", "[api:token] get_access_token raised OSError for sessionId=s1"),
            (
                "ERROR",
                "[api:token] No access token available for refresh, sessionId=s1 (failure 1/3)",
            ),
            (
                "ERROR",
                "[api:token] No access token available for refresh, sessionId=s1 (failure 2/3)",
            ),
            (
                "DEBUG",
                "[api:token] Refreshing token for sessionId=s1: new token sha256:"
                + lines[4][1].rsplit("sha256:", 1)[-1],
            ),
            ("DEBUG", "[api:token] Scheduled follow-up refresh for sessionId=s1 in 30m"),
        ]

    def test_expires_in_and_immediate_and_stale_lines(
        self, clock: ManualClock, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The expires_in, immediate, undecodable and stale log points read as the seed's."""
        caplog.set_level(logging.DEBUG, logger="token_refresh")
        sched: Scheduler

        def get_access_token() -> str:
            sched.schedule_from_expires_in("s1", 90.5)
            return "t"

        sched = Scheduler(get_access_token, lambda s, t: None, clock=clock, refresh_buffer=60)
        sched.schedule("s1", "opaque")
        sched.schedule("s1", make_jwt({"exp": START - 1}))
        messages = [r.getMessage() for r in caplog.records]
        assert messages[0].startswith("[token_refresh:token] Could not decode JWT expiry")
        assert messages[0].endswith(", keeping existing timer")
        assert messages[1] == (
            "[token_refresh:token] Token for sessionId=s1 expires=2027-01-15T07:59:59.000Z "
            "(past or within buffer), refreshing immediately"
        )
        assert messages[2] == (
            "[token_refresh:token] Scheduled token refresh for sessionId=s1 in 31s "
            "(expires_in=90.5s, buffer=60s)"
        )
        assert messages[3].startswith("[token_refresh:token] Refresh for sessionId=s1 stale (gen")

    def test_library_is_silent_without_configuration(self) -> None:
        """The package logger has a NullHandler, so an unconfigured app prints nothing."""
        logger = logging.getLogger("token_refresh")
        assert any(isinstance(h, logging.NullHandler) for h in logger.handlers)


class TestWallClock:
    def test_delay_is_computed_from_wall_time(self, recorder: Recorder) -> None:
        """With real timers, schedule() measures exp against time.time() (time-machine)."""
        with (
            time_machine.travel(START, tick=False),
            Scheduler(recorder.get_access_token, recorder.on_refresh) as sched,
        ):
            sched.schedule("s1", make_jwt({"exp": START + 3600}))
            assert sched.next_refresh_at("s1") == START + 3300

    def test_token_expired_by_wall_time_refreshes_at_once(self) -> None:
        """A token valid yesterday is refreshed at once once the wall clock has moved on."""
        token = make_jwt({"exp": START + 3600})
        clock = ManualClock(start=START + 86400)
        recorder = Recorder(clock)
        sched = Scheduler(recorder.get_access_token, recorder.on_refresh, clock=clock)
        sched.schedule("s1", token)
        assert recorder.gets == [86400.0]
        with time_machine.travel(START + 86400, tick=False):
            real = Scheduler(lambda: None, lambda s, t: None)
            real.schedule("s1", make_jwt({"exp": START + 86400 + 600}))
            assert real.next_refresh_at("s1") == START + 86400 + 300
            real.close()
