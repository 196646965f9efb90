"""End to end: Schedulers keep sessions fresh against a real OAuth2 server, over HTTP.

The server is oauth2-mock-server (npm, not written here), run by tests/e2e/server.mjs on
127.0.0.1 with tokens that live 3 seconds and faults on demand. get_access_token is the
package's own client_credentials client, token_refresh.oauth.ClientCredentials.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from token_refresh import Scheduler, decode_jwt_expiry, decode_jwt_payload, events
from token_refresh.oauth import ClientCredentials, OAuthError, discover
from token_refresh.shared import InvalidGrant

from conftest import MockOAuthServer, require_mock_server

pytestmark = [
    pytest.mark.realclock,
    pytest.mark.timeout(40),
    pytest.mark.usefixtures("timer_backend"),
]

BUFFER = 1.5  # seconds before exp that a refresh is due: each cycle takes 0.5 to 1.5 s
RETRY = 0.3  # seconds between attempts after a failure
RESTART_LIFETIME = 6  # the restart test's token lifetime and refresh buffer, in seconds
RESTART_BUFFER = 4.0
WAIT = 15.0  # seconds any one handshake may take before the test fails


def header(token: str) -> dict[str, object]:
    segment = token.split(".")[0]
    decoded: dict[str, object] = json.loads(base64.urlsafe_b64decode(segment + "=" * 3))
    return decoded


class Client:
    """get_access_token over HTTP, on_refresh and on_event: all recorded, with handshakes."""

    def __init__(self, server: MockOAuthServer) -> None:
        self.server = server
        self.issued: list[str] = []  # every token the server handed out
        self.expires_in: dict[str, float | None] = {}  # by token
        self.errors: list[OAuthError | InvalidGrant] = []
        self.fetch = ClientCredentials(server.token_url, "e2e", timeout=5)
        self.deliveries: dict[str, list[tuple[float, str]]] = {}  # session -> (when, token)
        self.events: list[events.Event] = []
        self.changed = threading.Condition()
        self.then: Callable[[str, str], None] = lambda session_id, token: None
        self.on_failure: Callable[[], None] = lambda: None  # runs before the failure is raised

    def get_access_token(self) -> str:
        asked = time.time()
        try:
            grant = self.fetch()
        except (OAuthError, InvalidGrant) as error:
            with self.changed:
                self.errors.append(error)
            self.on_failure()
            raise
        token = grant.access_token
        with self.changed:
            self.issued.append(token)
            # The response's expires_in: Grant.expires_at counts it from when the request was
            # sent, a few microseconds after this call began.
            self.expires_in[token] = (
                None if grant.expires_at is None else round(grant.expires_at - asked, 1)
            )
        return token

    def on_refresh(self, session_id: str, token: str) -> None:
        with self.changed:
            self.deliveries.setdefault(session_id, []).append((time.time(), token))
        self.then(session_id, token)  # what the test does next (reschedules, say)

    def on_event(self, event: events.Event) -> None:
        with self.changed:
            self.events.append(event)
            self.changed.notify_all()

    def wait_until(self, condition: Callable[[], bool], what: str) -> None:
        with self.changed:
            assert self.changed.wait_for(condition, WAIT), f"no {what} within {WAIT}s"

    def kinds(self, session_id: str) -> list[str]:
        """The names of the session's events, in order, with a RefreshFailed's attempt."""
        return [
            f"{type(e).__name__}({e.attempt})"
            if isinstance(e, events.RefreshFailed)
            else type(e).__name__
            for e in self.events
            if e.session_id == session_id
        ]

    def count(self, kind: type[events.Event], session_id: str = "s") -> int:
        return sum(isinstance(e, kind) and e.session_id == session_id for e in self.events)


@pytest.fixture
def client(oauth_server: MockOAuthServer) -> Client:
    return Client(oauth_server)


def make_scheduler(client: Client, buffer: float = BUFFER) -> Scheduler:
    return Scheduler(
        client.get_access_token,
        client.on_refresh,
        label="e2e",
        refresh_buffer=buffer,
        retry_delay=RETRY,
        follow_up_interval=60,  # never due here: only exp or expires_in drives a refresh
        expires_in_floor=0.5,  # the seed's 30 s floor, shrunk like the token lifetimes
        on_event=client.on_event,
    )


@pytest.fixture
def scheduler(client: Client, sub_second_delays: None) -> Iterator[Scheduler]:
    with make_scheduler(client) as sched:
        yield sched


def assert_fresh_throughout(
    first: str, deliveries: list[tuple[float, str]], buffer: float = BUFFER, lifetime: float = 3
) -> None:
    """Each token arrived before the one it replaced expired, and not before its refresh was due."""
    previous = first
    for delivered_at, token in deliveries:
        previous_exp = decode_jwt_expiry(previous)
        assert previous_exp is not None
        assert previous_exp - buffer - 0.05 <= delivered_at < previous_exp
        # The new token arrives with more than the buffer left (else it would be due at once).
        assert delivered_at + buffer < (decode_jwt_expiry(token) or 0) <= delivered_at + lifetime
        previous = token


class TestTheServer:
    def test_discovery_and_token_response(self, oauth_server: MockOAuthServer) -> None:
        """The issuer's metadata names its token endpoint, whose JWTs carry its iss and exp."""
        token_url = discover(oauth_server.issuer, timeout=5).token_endpoint
        before = time.time()
        grant = ClientCredentials(token_url, "e2e", timeout=5)()
        after = time.time()

        token = grant.access_token
        payload = decode_jwt_payload(token)
        assert token_url == oauth_server.token_url
        assert grant.expires_at is not None
        assert before + 3 <= grant.expires_at <= after + 3
        assert isinstance(payload, dict)
        assert payload["iss"] == oauth_server.issuer
        assert payload["exp"] == payload["iat"] + 3
        assert header(token)["alg"] == "RS256"


class TestStaysFresh:
    def test_schedule_follows_each_tokens_exp(self, client: Client, scheduler: Scheduler) -> None:
        """Two sessions, each rescheduled from its new JWT's exp, stay fresh for 3 cycles."""
        client.then = scheduler.schedule  # the usual pattern: schedule(session, new token)
        firsts = {session: client.get_access_token() for session in ("alice", "bob")}
        for session, token in firsts.items():
            scheduler.schedule(session, token)

        client.wait_until(
            lambda: all(len(client.deliveries.get(s, [])) >= 3 for s in firsts), "3 refreshes each"
        )

        for session, first in firsts.items():
            deliveries = client.deliveries[session][:3]
            assert_fresh_throughout(first, deliveries)
            assert len({token for _, token in deliveries} | {first}) == 4
            scheduled = [e for e in client.events if isinstance(e, events.Scheduled)]
            assert {e.reason for e in scheduled if e.session_id == session} == {"exp"}
        assert client.errors == []

    def test_schedule_from_expires_in_of_each_response(
        self, client: Client, scheduler: Scheduler
    ) -> None:
        """A session rescheduled from each response's expires_in stays fresh for 3 cycles."""

        def reschedule(session_id: str, token: str) -> None:
            expires_in = client.expires_in[token]
            assert expires_in is not None
            scheduler.schedule_from_expires_in(session_id, expires_in)

        client.then = reschedule
        first = client.get_access_token()
        scheduler.schedule_from_expires_in("s", 3.0)

        client.wait_until(lambda: len(client.deliveries.get("s", [])) >= 3, "3 refreshes")

        deliveries = client.deliveries["s"][:3]
        times = [when for when, _ in deliveries]
        for earlier, later in itertools.pairwise(times):
            assert 3 - BUFFER - 0.05 <= later - earlier < 3  # due at expires_in - buffer
        for when, token in deliveries:
            assert client.expires_in[token] == 3
            assert (decode_jwt_expiry(token) or 0) > when + 1  # fresh when it arrives
        assert times[0] < (decode_jwt_expiry(first) or 0)
        scheduled = [e for e in client.events if isinstance(e, events.Scheduled)]
        assert {(e.reason, e.delay) for e in scheduled} == {("expires_in", 3 - BUFFER)}


class TestFaults:
    @pytest.mark.parametrize(
        ("fault", "count", "error_type", "message"),
        [
            ("http500", 2, "OAuthError", "answered HTTP 500 (server_error)"),
            ("invalid_grant", 1, "InvalidGrant", "answered HTTP 400 (invalid_grant: injected"),
        ],
    )
    def test_failures_are_retried_and_the_session_recovers(
        self,
        client: Client,
        scheduler: Scheduler,
        oauth_server: MockOAuthServer,
        fault: str,
        count: int,
        error_type: str,
        message: str,
    ) -> None:
        """The server failing fewer than 3 times in a row costs retries, not the session."""
        first = client.get_access_token()
        oauth_server.fail(count, fault)
        scheduler.schedule("s", first)

        client.wait_until(lambda: client.count(events.Refreshed) == 1, "recovery")

        failed = [f"RefreshFailed({n})" for n in range(1, count + 1)]
        expected = ["Scheduled"] + [
            kind for attempt in failed for kind in ("RefreshStarted", attempt, "Scheduled")
        ]
        assert client.kinds("s")[: len(expected) + 2] == [*expected, "RefreshStarted", "Refreshed"]
        assert [type(e).__name__ for e in client.errors] == [error_type] * count
        assert all(message in str(e) for e in client.errors), client.errors
        failures = [e for e in client.events if isinstance(e, events.RefreshFailed)]
        assert {e.error_type for e in failures} == {error_type}
        assert_fresh_throughout(first, client.deliveries["s"][:1])

    def test_server_restarted_on_the_same_port(self, sub_second_delays: None) -> None:
        """A refresh fails while the server is down; the retry reaches it back on its port."""
        # Tokens that live 6 s and a 4 s buffer: restarting Node takes up to a second
        # or two on a busy machine, and the token must stay fresh all the same.
        require_mock_server()
        oauth_server = MockOAuthServer(lifetime=RESTART_LIFETIME)
        oauth_server.start()
        client = Client(oauth_server)
        try:
            with make_scheduler(client, RESTART_BUFFER) as scheduler:
                self.restart_while_refreshing(client, scheduler, oauth_server)
        finally:
            oauth_server.stop()

    def restart_while_refreshing(
        self, client: Client, scheduler: Scheduler, oauth_server: MockOAuthServer
    ) -> None:
        first = client.get_access_token()
        port = oauth_server.port
        oauth_server.stop()
        # The server comes back while the client waits to retry: before the failed attempt
        # returns, so the retry timer (armed after it) cannot win the race.
        client.on_failure = oauth_server.start
        scheduler.schedule("s", first)

        client.wait_until(lambda: client.count(events.Refreshed) == 1, "recovery")

        assert client.kinds("s")[:6] == [
            "Scheduled",
            "RefreshStarted",
            "RefreshFailed(1)",
            "Scheduled",
            "RefreshStarted",
            "Refreshed",
        ]
        assert oauth_server.port == port
        ((_, token),) = client.deliveries["s"]
        (error,) = client.errors
        assert isinstance(error, OAuthError)
        assert error.status is None
        assert str(error).startswith(f"no answer from {oauth_server.token_url}: ")
        assert header(token)["kid"] != header(first)["kid"]  # a new server: new signing keys
        assert_fresh_throughout(first, client.deliveries["s"], RESTART_BUFFER, RESTART_LIFETIME)

    @pytest.mark.parametrize("outage", ["invalid_grant", "stopped"])
    def test_three_failures_in_a_row_give_up_visibly(
        self,
        client: Client,
        scheduler: Scheduler,
        oauth_server: MockOAuthServer,
        caplog: pytest.LogCaptureFixture,
        outage: str,
    ) -> None:
        """A server that keeps failing ends the chain with a GaveUp event and an ERROR log."""
        caplog.set_level(logging.ERROR, logger="token_refresh")
        first = client.get_access_token()
        if outage == "stopped":
            oauth_server.stop()
        else:
            oauth_server.fail(3, outage)
        scheduler.schedule("s", first)

        client.wait_until(lambda: client.count(events.GaveUp) == 1, "give-up")

        assert client.kinds("s")[-2:] == ["RefreshFailed(3)", "GaveUp"]
        assert client.count(events.Refreshed) == 0
        assert scheduler.sessions() == frozenset()
        assert len(client.errors) == 3
        messages = [record.getMessage() for record in caplog.records]
        assert "[e2e:token] Giving up on sessionId=s after 3 consecutive failures" in messages
        raised = "InvalidGrant" if outage == "invalid_grant" else "OAuthError"
        assert messages.count(f"[e2e:token] get_access_token raised {raised} for sessionId=s") == 3
        for token in client.issued:
            for segment in token.split("."):
                assert segment not in caplog.text
