"""End to end, real clock: the token server paused (SIGSTOP) past three retries, then resumed."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import pytest

from token_refresh import RetryPolicy, Scheduler, events
from token_refresh.oauth import ClientCredentials
from token_refresh.shared import SharedToken

from conftest import MockOAuthServer, make_jwt

STEP = 0.2  # the policy's every delay: first_delay = cap, no jitter
REQUEST_TIMEOUT = 0.3  # a token request to the paused server gives up after this
DUE_NOW = make_jwt({"exp": 1})  # schedule() refreshes at once


class Watch:
    """on_event and on_refresh, with a condition a test waits on (no sleeping)."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.failures = 0
        self.gave_up = False
        self.tokens: list[tuple[float, str]] = []

    def on_event(self, event: events.Event) -> None:
        with self.changed:
            self.failures += isinstance(event, events.RefreshFailed)
            self.gave_up |= isinstance(event, events.GaveUp)
            self.changed.notify_all()

    def on_refresh(self, session_id: str, token: str) -> None:
        with self.changed:
            self.tokens.append((time.monotonic(), token))
            self.changed.notify_all()

    def wait(self, what: str, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        with self.changed:
            assert self.changed.wait_for(condition, timeout), f"no {what} within {timeout}s"


@pytest.mark.realclock
@pytest.mark.timeout(30)
def test_paused_token_server_is_ridden_out(oauth_server: MockOAuthServer) -> None:
    """Past three failed retries the session keeps trying and gets a token one step after resume."""
    process = oauth_server._process
    assert process is not None
    fetch = ClientCredentials(oauth_server.token_url, "client", "secret", timeout=REQUEST_TIMEOUT)
    policy = RetryPolicy(first_delay=STEP, cap=STEP, jitter=0)
    token = SharedToken(fetch, min_ttl=60, max_age=None, retry_policy=policy)  # never reused
    watch = Watch()
    with Scheduler(
        token,
        watch.on_refresh,
        on_event=watch.on_event,
        retry_policy=policy,
        fetch_timeout=5,
        follow_up_interval=3600,
    ) as sched:
        sched.schedule("s", DUE_NOW)
        watch.wait("first token", lambda: len(watch.tokens) == 1)
        os.kill(process.pid, signal.SIGSTOP)
        try:
            sched.schedule("s", DUE_NOW)  # a refresh while the server is paused
            watch.wait("four failures", lambda: watch.failures >= 4)
        finally:
            resumed = time.monotonic()
            os.kill(process.pid, signal.SIGCONT)
        watch.wait("a token after the pause", lambda: len(watch.tokens) == 2)
        assert not watch.gave_up
        (_, first), (delivered_at, second) = watch.tokens
        assert second != first
        # The attempt in flight when the server resumed fails by its timeout at worst; the
        # next comes one step later. A second of slack for a loaded machine.
        assert delivered_at - resumed < REQUEST_TIMEOUT + STEP + 1.0
