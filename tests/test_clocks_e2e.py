"""A real token server whose clock is 15 minutes off, under libfaketime, on the real clock.

oauth2-mock-server runs under ``faketime -f "+15m"`` (or ``"-15m"``): its
tokens' ``iat``/``exp`` and its ``Date`` header are on the shifted clock. The
client, a Scheduler fed by a SharedToken over ``token_refresh.oauth``,
re-schedules from every token it gets, as the README recommends. Tokens live
5 seconds and are refreshed 2 seconds before they end (``iat`` and ``exp`` are
whole seconds: a skew measured from them is up to a second off, which a
refresh_buffer absorbs), so a few seconds show whether it loops (hundreds of
requests) or holds an expired token.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from token_refresh import Scheduler, _expiry, events
from token_refresh.oauth import ClientCredentials
from token_refresh.shared import SharedToken

from conftest import MockOAuthServer, require_faketime, require_mock_server

pytestmark = [pytest.mark.realclock, pytest.mark.timeout(40)]

SKEW = 15 * 60.0
LIFETIME = 5.0
BUFFER = 2.0
RUN = 5.0  # seconds of real time per run


@pytest.fixture(params=[SKEW, -SKEW], ids=["server_ahead", "server_behind"])
def skewed_server(request: pytest.FixtureRequest) -> Iterator[tuple[MockOAuthServer, float]]:
    """The e2e token server with its clock shifted; the shift, in seconds."""
    require_mock_server()
    faketime = require_faketime()
    offset = float(request.param)
    # Only the wall clock moves: Node's timers run on the monotonic clock.
    wrapper = (
        "env",
        "FAKETIME_DONT_FAKE_MONOTONIC=1",
        faketime,
        "-f",
        f"{offset / 60:+.0f}m",
    )
    server = MockOAuthServer(lifetime=LIFETIME, wrapper=wrapper)
    try:
        server.start()
        yield server, offset
    finally:
        server.stop()


class Client:
    """An app holding one session's token, re-scheduling from on_refresh."""

    def __init__(self, server: MockOAuthServer, offset: float) -> None:
        self.offset = offset
        fetch = ClientCredentials(server.token_url, "e2e", timeout=5)
        # Reused until refresh_buffer before expiry (min_ttl), shared by a storm for 0.5 s.
        self.token = SharedToken(fetch, min_ttl=BUFFER, max_age=0.5)
        self.lock = threading.Lock()
        self.held: str | None = None
        self.expired: list[float] = []  # how far past its exp (server clock) a held token was
        self.events: list[events.Event] = []
        self.scheduler = Scheduler(
            self.token, self.on_refresh, refresh_buffer=BUFFER, on_event=self.events.append
        )

    def on_refresh(self, session_id: str, token: str) -> None:
        self.check()
        with self.lock:
            self.held = token
        self.scheduler.schedule(session_id, token)

    def check(self) -> None:
        """A request now: the token held must be good by the server's (shifted) clock."""
        with self.lock:
            held = self.held
        if held is None:
            return
        exp, _ = _expiry.claims(held)
        assert exp is not None
        late = time.time() + self.offset - exp
        if late > 0:
            self.expired.append(late)


def test_a_server_fifteen_minutes_off_neither_loops_nor_gets_expired_tokens_sent(
    skewed_server: tuple[MockOAuthServer, float],
) -> None:
    """Ahead or behind: one request per 3 s, the token held always good, one ClockSkew."""
    server, offset = skewed_server
    client = Client(server, offset)
    fetches = 0

    def counting() -> None:
        nonlocal fetches
        fetches += 1

    client.token._observers = (
        lambda kind, _value, _attributes: counting() if kind == "fetch" else None,
    )
    first = client.token()
    assert first is not None
    with client.lock:
        client.held = first
    client.scheduler.schedule("s", first)
    deadline = time.monotonic() + RUN
    tick = threading.Event()
    while time.monotonic() < deadline:
        client.check()
        tick.wait(0.05)  # a request every 50 ms
    client.scheduler.close(timeout=5)

    # A refresh every LIFETIME - BUFFER = 3 s: 1 or 2 in 5 s, plus the first token (and,
    # when our clock looks 15 minutes fast, one at once to learn the skew, if the first
    # token is more than max_age old by then).
    assert 2 <= fetches <= 4, fetches
    assert client.expired == []
    skews = [event.skew for event in client.events if isinstance(event, events.ClockSkew)]
    assert len(skews) == 1, skews
    assert abs(skews[0] - offset) < 5
