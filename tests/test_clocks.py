"""Server hints and clocks: one expiry rule, and clock skew past the threshold (issue 21).

The scheduler's tests run on a ManualClock; a fake token server keeps its
own clock, ``offset`` seconds from it. SharedToken's tests move wall time
with time_machine, as test_shared.py does.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import time_machine
from test_shared import make_store, movable_monotonic, shift

from token_refresh import Scheduler, _expiry, _stores, events
from token_refresh._context import served_by_context, served_so_far
from token_refresh.oauth import ClientCredentials
from token_refresh.shared import FileStore, Grant, MemoryStore, Record, SharedToken, Store
from token_refresh.testing import ManualClock

from conftest import START, make_jwt
from strict_oauth import Client, StrictTokenServer, answer

__all__ = ["make_store", "movable_monotonic"]  # fixtures used here

MINUTE = 60.0
SKEW = 15 * MINUTE
LIFETIME = 10 * MINUTE
THRESHOLD = _expiry.SKEW_THRESHOLD


class Issuer:
    """A token server whose clock is ``offset`` seconds from ``clock``'s: 10-minute JWTs."""

    def __init__(self, clock: ManualClock, offset: float, *, iat: bool = True) -> None:
        self.clock = clock
        self.offset = offset
        self.iat = iat
        self.issued: list[float] = []  # local times of each request

    def now(self) -> float:
        return self.clock.time() + self.offset

    def __call__(self) -> str | None:
        if len(self.issued) >= 100:
            return None  # a refresh loop: end it, the test's counts show it
        return self.token()

    def token(self) -> str:
        """A token issued now (a request the server sees)."""
        self.issued.append(self.clock.time() - START)
        now = self.now()
        payload: dict[str, Any] = {"exp": now + LIFETIME, "sub": "svc"}
        if self.iat:
            payload["iat"] = now
        return make_jwt(payload)

    def expired(self, token: str) -> bool:
        """Whether the token has expired by this server's clock (a resource server's view)."""
        exp, _ = _expiry.claims(token)
        assert exp is not None
        return exp <= self.now()


class App:
    """An app that re-schedules each session from on_refresh, as the README recommends."""

    def __init__(self, clock: ManualClock, issuer: Issuer) -> None:
        self.clock = clock
        self.issuer = issuer
        self.events: list[events.Event] = []
        self.held: str | None = None
        self.expired_held: list[float] = []  # times the app found its token expired
        self.scheduler = Scheduler(
            issuer, self.on_refresh, clock=clock, on_event=self.events.append
        )

    def on_refresh(self, session_id: str, token: str) -> None:
        self.check()
        self.held = token
        self.scheduler.schedule(session_id, token)

    def check(self) -> None:
        """A request the app sends now: its token must be good by the server's clock."""
        if self.held is not None and self.issuer.expired(self.held):
            self.expired_held.append(self.clock.time() - START)

    def run(self, seconds: float, step: float = 10.0) -> None:
        """Let ``seconds`` pass, sending a request every ``step`` seconds."""
        for _ in range(int(seconds / step)):
            self.clock.advance(step)
            self.check()

    def skews(self) -> list[float]:
        return [event.skew for event in self.events if isinstance(event, events.ClockSkew)]


def skew_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.WARNING and "lock skew" in record.getMessage()
    ]


# -- the rule itself -------------------------------------------------------------------------


class TestExpiryRule:
    def test_a_lifetime_counts_from_when_the_request_was_sent_less_its_age(self) -> None:
        """expires_in (a number or a numeric str) ends at sent + expires_in - Age."""
        assert _expiry.lifetime_end(100.0, 600, age=20.0) == 680.0
        assert _expiry.lifetime_end(100.0, "60") == 160.0
        for bad in (0, -5, True, None, "soon", "1e999", 10**400, float("nan"), [60]):
            assert _expiry.lifetime_end(100.0, bad) is None

    def test_the_earlier_of_expires_in_and_exp_wins(self) -> None:
        """A JWT's exp and a grant's expires_at: whichever comes first; either alone; neither."""
        jwt = make_jwt({"exp": START + 600})
        assert _expiry.expires(jwt, START + 3600, None, START) == START + 600
        assert _expiry.expires(jwt, START + 60, None, START) == START + 60
        assert _expiry.expires(jwt, None, None, START) == START + 600
        assert _expiry.expires("opaque", START + 60, None, START) == START + 60
        assert _expiry.expires("opaque", None, None, START) is None

    def test_exp_moves_onto_our_clock_only_past_the_threshold(self) -> None:
        """A skew within the threshold leaves exp alone; past it, exp - skew."""
        jwt = make_jwt({"exp": START + 600, "iat": START})
        assert _expiry.expires(jwt, None, THRESHOLD, START) == START + 600
        assert _expiry.expires(jwt, None, -THRESHOLD, START) == START + 600
        assert _expiry.expires(jwt, None, SKEW, START) == START + 600 - SKEW
        behind = make_jwt({"exp": START - SKEW + 600, "iat": START - SKEW})
        assert _expiry.expires(behind, None, -SKEW, START) == START + 600
        # A server cannot have issued a token later than its own now: that iat bounds the skew.
        assert _expiry.expires(jwt, None, -SKEW, START) == START + 600

    def test_an_iat_in_the_future_is_skew_an_old_one_is_not(self) -> None:
        """iat 15 minutes ahead shows skew with nothing learned; iat 20 minutes ago shows none."""
        assert _expiry.effective_skew(START + SKEW, None, START) == SKEW
        assert _expiry.effective_skew(START + 60, None, START) == 0.0
        assert _expiry.effective_skew(START - 20 * MINUTE, None, START) == 0.0
        # A learned skew still holds for an old token: its age is not skew either way.
        assert _expiry.effective_skew(START - 20 * MINUTE, -SKEW, START) == -SKEW
        assert _expiry.effective_skew(None, None, START) == 0.0

    def test_claims_reads_exp_and_iat_like_the_seed(self) -> None:
        """An exp of 0, a bool, a string or an int beyond a float is no exp; iat likewise."""
        assert _expiry.claims(make_jwt({"exp": 0, "iat": 5})) == (None, 5)
        assert _expiry.claims(make_jwt({"exp": True, "iat": "5"})) == (None, None)
        assert _expiry.claims(make_jwt({"exp": 10**400})) == (None, None)
        assert _expiry.claims(make_jwt([1])) == (None, None)
        assert _expiry.claims("opaque") == (None, None)

    def test_a_plain_functions_old_token_is_not_skew(self) -> None:
        """iat 20 minutes ago and 40 left: maybe a cache's; expired on arrival: skew."""
        cached = make_jwt({"iat": START - 20 * MINUTE, "exp": START + 40 * MINUTE})
        assert _expiry.received_skew(cached, START) is None
        fast_host = make_jwt({"iat": START - SKEW, "exp": START - SKEW + LIFETIME})
        assert _expiry.received_skew(fast_host, START) == -SKEW
        assert _expiry.received_skew(make_jwt({"iat": START + SKEW}), START) == SKEW
        assert _expiry.received_skew(make_jwt({"exp": START + 60}), START) is None

    def test_iat_before_date(self) -> None:
        """A token's iat says the skew; without one, the response's Date does."""
        assert _expiry.measured_skew(make_jwt({"iat": START + 5}), START, START + 900) == 5
        assert _expiry.measured_skew("opaque", START, START + 900) == 900
        assert _expiry.measured_skew("opaque", START) is None

    def test_reuse_until(self) -> None:
        """min_ttl before expiry, or refresh_at, whichever is first."""
        assert _expiry.reuse_until(1000.0, None, 300.0) == 700.0
        assert _expiry.reuse_until(1000.0, 500.0, 300.0) == 500.0
        assert _expiry.reuse_until(1000.0, 800.0, 300.0) == 700.0
        assert _expiry.reuse_until(None, 500.0, 300.0) == 500.0
        assert _expiry.reuse_until(None, None, 300.0) is None

    def test_a_tracker_reports_once_per_change(self) -> None:
        """The same skew again, or a few seconds off, is no change; back within the threshold is."""
        tracker = _expiry.SkewTracker()
        assert tracker.learn(30.0) is None
        assert tracker.learn(-SKEW) == -SKEW
        assert tracker.learn(-SKEW - 3) is None
        assert tracker.learned == -SKEW - 3
        assert tracker.learn(SKEW) == SKEW
        assert tracker.learn(2.0) == 0.0
        assert tracker.learn(-1.0) is None


# -- Scheduler.schedule() ---------------------------------------------------------------------


class TestSchedulerSkew:
    @pytest.mark.parametrize("offset", [-SKEW, SKEW], ids=["host_fast", "host_slow"])
    def test_fifteen_minutes_either_way_neither_loops_nor_sends_expired_tokens(
        self, offset: float, caplog: pytest.LogCaptureFixture
    ) -> None:
        """10-minute tokens: one refresh per 5 minutes, every token good by the server's clock."""
        caplog.set_level(logging.WARNING, logger="token_refresh")
        clock = ManualClock(start=START)
        issuer = Issuer(clock, offset)
        app = App(clock, issuer)
        first = issuer.token()
        app.held = first
        app.scheduler.schedule("s", first)
        app.run(3600)

        refreshes = issuer.issued[1:]
        # Fast host: the first token looks expired, so one refresh comes at once (it learns
        # the skew from it); then every 5 minutes (10-minute lifetime, 5-minute buffer).
        start = 0.0 if offset < 0 else 300.0
        assert refreshes == [start + 300.0 * n for n in range(len(refreshes))]
        assert 12 <= len(refreshes) <= 13
        assert app.expired_held == []
        assert app.skews() == [offset]
        assert len(skew_lines(caplog)) == 1
        ahead = "ahead of" if offset > 0 else "behind"
        assert f"the token server's clock is 15m {ahead} this host's" in skew_lines(caplog)[0]

    def test_the_seed_sends_expired_tokens_on_a_slow_host(self) -> None:
        """What the rule prevents: without an iat, 15 minutes slow holds expired tokens."""
        clock = ManualClock(start=START)
        issuer = Issuer(clock, SKEW, iat=False)
        app = App(clock, issuer)
        first = issuer.token()
        app.held = first
        app.scheduler.schedule("s", first)
        app.run(1800)

        assert app.expired_held  # a token without iat keeps the seed's rule
        assert app.skews() == []

    @pytest.mark.parametrize("offset", [-THRESHOLD, -60.0, 60.0, THRESHOLD])
    def test_below_the_threshold_the_seeds_times_hold(self, offset: float) -> None:
        """A skew of up to 120 s changes nothing: the refresh is exp - refresh_buffer."""
        clock = ManualClock(start=START)
        issuer = Issuer(clock, offset)
        app = App(clock, issuer)
        token = issuer.token()
        app.scheduler.schedule("s", token)
        exp, _ = _expiry.claims(token)
        assert exp is not None
        assert app.scheduler.next_refresh_at("s") == exp - 300
        app.run(1200)

        assert app.skews() == []
        assert issuer.issued[1] == exp - 300 - START

    def test_an_old_cached_token_is_not_skew(self) -> None:
        """iat 20 minutes ago, 40 minutes left: scheduled by exp; no ClockSkew."""
        got: list[events.Event] = []

        def cache() -> str:  # a get_access_token that serves a cached token
            return make_jwt({"iat": START - 20 * MINUTE, "exp": START + 40 * MINUTE})

        clock = ManualClock(start=START)
        with Scheduler(cache, lambda _s, _t: None, clock=clock, on_event=got.append) as sched:
            sched.schedule("s", cache())
            assert sched.next_refresh_at("s") == START + 35 * MINUTE
            clock.advance(36 * MINUTE)  # the refresh gets the cached token again: 55 minutes old
            assert got[-1] == events.Scheduled(
                session_id="s",
                label="token_refresh",
                time=START + 35 * MINUTE,
                due=START + 65 * MINUTE,
                delay=30 * MINUTE,
                reason="follow_up",
            )
            fresh = make_jwt({"iat": clock.time(), "exp": clock.time() + LIFETIME})
            sched.schedule("s", fresh)
            assert sched.next_refresh_at("s") == clock.time() + LIFETIME - 300

        assert not [event for event in got if isinstance(event, events.ClockSkew)]

    def test_a_skew_that_ends_is_reported_once_and_exp_rules_again(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The clock fixed (NTP): one ClockSkew of 0 and one WARNING; then the seed's times."""
        caplog.set_level(logging.WARNING, logger="token_refresh")
        clock = ManualClock(start=START)
        issuer = Issuer(clock, -SKEW)
        app = App(clock, issuer)
        app.scheduler.schedule("s", issuer.token())
        app.run(1800)
        assert app.expired_held == []
        issuer.offset = 0.0  # the server's clock jumps: the token held expires by it at once
        app.run(1800)

        assert app.skews() == [-SKEW, 0.0]
        assert len(skew_lines(caplog)) == 2
        assert "Clock skew back within 120s" in skew_lines(caplog)[1]
        last = issuer.issued[-1]
        assert app.scheduler.next_refresh_at("s") == START + last + 300

    def test_a_token_without_iat_keeps_the_seeds_rule(self) -> None:
        """A skew once learned does not move a token that has no iat."""
        clock = ManualClock(start=START)
        issuer = Issuer(clock, SKEW)
        app = App(clock, issuer)
        app.scheduler.schedule("s", issuer.token())  # learns +15 minutes from the future iat
        plain = make_jwt({"exp": START + 3600})
        app.scheduler.schedule("t", plain)

        assert app.scheduler.next_refresh_at("t") == START + 3600 - 300
        assert app.scheduler.next_refresh_at("s") == START + 300

    def test_a_shared_token_tells_the_skew_its_grant_came_with(
        self, movable_monotonic: None
    ) -> None:
        """A SharedToken serving another's fetch from the store: the scheduler learns it too."""
        with time_machine.travel(START, tick=False) as traveller:
            clock = ManualClock(start=START)
            issuer = Issuer(clock, -SKEW)
            store = MemoryStore()
            SharedToken(issuer, store)()  # another worker fetched
            got: list[events.Event] = []
            delivered: list[str] = []
            reader = SharedToken(issuer, store)
            sched = Scheduler(
                reader, lambda _s, t: delivered.append(t), clock=clock, on_event=got.append
            )
            stale = make_jwt({"iat": START - SKEW - 60, "exp": START - SKEW - 60 + LIFETIME})
            sched.schedule("s", stale)  # looks expired: refreshes at once, from the store
            clock.advance(0)
            assert len(delivered) == 1
            assert len(issuer.issued) == 1
            sched.schedule("s", delivered[0])
            shift(traveller, 1.0)

            assert sched.next_refresh_at("s") == START + 300
            assert [e.skew for e in got if isinstance(e, events.ClockSkew)] == [-SKEW]
            sched.close()

    def test_the_context_carries_who_served_and_the_skew(self) -> None:
        """Outside a scheduler's call nothing is noted; inside, who served and the skew."""
        assert served_so_far() == (None, None)
        now = time.time()
        same = make_jwt({"iat": now - SKEW, "exp": now - SKEW + LIFETIME})
        token = SharedToken(lambda: same)
        with served_by_context():
            assert served_so_far() == (None, None)
            token()
            served, skew = served_so_far()
            assert served == "fetch"
            assert skew is not None
            assert abs(skew + SKEW) < 2
        token.reject(same)
        with served_by_context():
            token()  # the same token again, after it was refused: served, not cached
            assert served_so_far() == ("fetch", None)

    @pytest.mark.filterwarnings("ignore:This process:DeprecationWarning")
    def test_a_forked_child_learns_while_the_parent_holds_the_lock(self) -> None:
        """A tracker's lock held by another thread at fork() does not hang the child."""
        tracker = _expiry.SkewTracker()
        with tracker._lock:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                os._exit(0 if tracker.learn(SKEW) == SKEW else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


# -- SharedToken ------------------------------------------------------------------------------


@pytest.fixture
def traveller(movable_monotonic: None) -> Iterator[time_machine.Traveller]:
    with time_machine.travel(START, tick=False) as moving:
        yield moving


class Counting:
    """A fetch of 10-minute JWTs from a server ``offset`` seconds off, counting calls."""

    def __init__(self, offset: float = 0.0, refresh_in: float | None = None) -> None:
        self.offset = offset
        self.refresh_in = refresh_in
        self.calls = 0

    def __call__(self) -> Grant:
        self.calls += 1
        now = time.time()
        server = now + self.offset
        token = make_jwt({"iat": server, "exp": server + LIFETIME, "n": self.calls})
        refresh_at = None if self.refresh_in is None else now + self.refresh_in
        return Grant(token, refresh_at=refresh_at)


@pytest.mark.realclock
class TestSharedTokenClock:
    def test_refresh_at_ends_reuse(self, traveller: time_machine.Traveller) -> None:
        """A grant whose refresh_at is past is fetched again, long before it expires."""
        fetch = Counting(refresh_in=60.0)
        token = SharedToken(fetch, max_age=None)
        token()
        shift(traveller, 59)
        token()
        assert fetch.calls == 1
        shift(traveller, 1)
        token()
        assert fetch.calls == 2

    def test_an_opaque_token_is_reused_until_refresh_at(
        self, traveller: time_machine.Traveller
    ) -> None:
        """refresh_in tells an opaque token's reuse, as expires_in does."""
        calls: list[float] = []

        def fetch() -> Grant:
            calls.append(time.time())
            return Grant("opaque", refresh_at=time.time() + 120)

        token = SharedToken(fetch, max_age=None)
        token()
        shift(traveller, 119)
        token()
        shift(traveller, 1)
        token()
        assert len(calls) == 2

    @pytest.mark.parametrize(
        ("offset", "reused_for"), [(-SKEW, 300.0), (SKEW, 300.0), (60.0, 360.0)]
    )
    def test_a_skewed_token_is_reused_for_its_lifetime_from_receipt(
        self,
        offset: float,
        reused_for: float,
        traveller: time_machine.Traveller,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """15 minutes either way: reused for 10 minutes less min_ttl; 60 s ahead: exp as it is."""
        caplog.set_level(logging.WARNING, logger="token_refresh.shared")
        seen: list[tuple[str, float]] = []
        fetch = Counting(offset)
        token = SharedToken(fetch, max_age=None)
        token._observers = (lambda kind, value, _a: seen.append((kind, value)),)
        token()
        shift(traveller, reused_for - 1)
        token()
        assert fetch.calls == 1
        shift(traveller, 1)
        token()
        assert fetch.calls == 2

        skewed = abs(offset) > THRESHOLD
        assert [value for kind, value in seen if kind == "clock_skew"] == (
            [offset] if skewed else []
        )
        assert len(skew_lines(caplog)) == (1 if skewed else 0)

    def test_an_old_stored_token_is_not_skew(
        self, traveller: time_machine.Traveller, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A record with iat 20 minutes ago, 40 minutes left: reused by its exp, no WARNING."""
        caplog.set_level(logging.WARNING, logger="token_refresh.shared")
        old = make_jwt({"iat": START - 20 * MINUTE, "exp": START + 40 * MINUTE})
        store = MemoryStore()
        store.write("default", Record(Grant(old), 1, START - 20 * MINUTE))
        calls: list[int] = []

        def fetch() -> str:
            calls.append(1)
            return "new"

        token = SharedToken(fetch, store)
        assert token() == old
        shift(traveller, 35 * MINUTE - 1)
        assert token() == old
        assert calls == []
        assert skew_lines(caplog) == []

    def test_the_skew_ends(
        self, traveller: time_machine.Traveller, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A fetch within the threshold after a skewed one: one WARNING that it ended."""
        caplog.set_level(logging.WARNING, logger="token_refresh.shared")
        fetch = Counting(-SKEW)
        token = SharedToken(fetch, max_age=None)
        token()
        fetch.offset = 0.0
        shift(traveller, 300)
        token()
        assert fetch.calls == 2
        assert "clock skew back within 120s" in skew_lines(caplog)[-1]
        assert len(skew_lines(caplog)) == 2

    def test_hints_survive_every_store(self, make_store: Any) -> None:
        """refresh_at and clock_skew are stored with the grant, in every store."""
        store: Store = make_store()
        grant = Grant("t", "r", 500.0, refresh_at=400.0, clock_skew=-900.0)
        assert store.write("k", Record(grant, 1, 1.0))
        read = store.read("k")
        assert read is not None
        assert read.grant == grant

    def test_a_record_without_hints_reads(self, tmp_path: Path) -> None:
        """A record written before refresh_at and clock_skew existed still reads."""
        store = FileStore(tmp_path)
        assert store.write("k", Record(Grant("t", None, 500.0), 1, 1.0))
        path = next(tmp_path.glob("*.json"))
        data = json.loads(path.read_text())
        assert "refresh_at" not in data
        assert "clock_skew" not in data
        assert _stores._load(json.dumps(data), "k") == Record(Grant("t", None, 500.0), 1, 1.0)

    def test_the_repr_shows_the_hints_but_no_token(self) -> None:
        """Grant's repr names refresh_at and clock_skew when set."""
        text = repr(Grant("secret-token", refresh_at=1.5, clock_skew=-2.0))
        assert "refresh_at=1.5, clock_skew=-2.0" in text
        assert "secret-token" not in text
        assert "refresh_at" not in repr(Grant("secret-token"))


# -- token_refresh.oauth ----------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[StrictTokenServer]:
    strict = StrictTokenServer(clients={"public": Client(None, "none")})
    with strict:
        yield strict


def http_date(unix_seconds: float) -> str:
    return email.utils.formatdate(unix_seconds, usegmt=True)


@pytest.mark.realclock
class TestOAuthHints:
    def test_refresh_in_and_age(self, server: StrictTokenServer) -> None:
        """refresh_in sets refresh_at; Age is taken off both lifetimes; sent, not received."""
        server.queue(
            answer(
                200,
                {"access_token": "at", "expires_in": 600, "refresh_in": 300},
                Age="100",
            )
        )
        before = time.time()
        grant = ClientCredentials(server.token_url, "public", client_auth="none")()
        after = time.time()
        assert grant.expires_at is not None
        assert grant.refresh_at is not None
        assert before + 500 <= grant.expires_at <= after + 500
        assert before + 200 <= grant.refresh_at <= after + 200

    @pytest.mark.parametrize("offset", [-SKEW, SKEW])
    def test_the_date_header_tells_the_skew(self, offset: float, server: StrictTokenServer) -> None:
        """A server 15 minutes off: its Date says so, and a JWT without iat lives from receipt."""
        server_now = time.time() + offset
        jwt = make_jwt({"exp": server_now + LIFETIME})
        server.queue(answer(200, {"access_token": jwt}, Date=http_date(server_now)))
        grant = ClientCredentials(server.token_url, "public", client_auth="none")()
        assert grant.clock_skew is not None
        assert abs(grant.clock_skew - offset) < 2
        calls: list[Grant] = []

        def fetch() -> Grant:
            calls.append(grant)
            return grant

        token = SharedToken(fetch, max_age=None)
        token()
        token()  # neither expired (fast host) nor kept past its expiry (slow host)
        assert len(calls) == 1
        local = _expiry.expires(jwt, None, grant.clock_skew, time.time())
        assert local is not None
        assert abs(local - (server_now - offset + LIFETIME)) < 2

    def test_an_iat_wins_over_the_date(self, server: StrictTokenServer) -> None:
        """A token's own iat is read before the response's Date."""
        now = time.time()
        jwt = make_jwt({"iat": now + SKEW, "exp": now + SKEW + LIFETIME})
        server.queue(answer(200, {"access_token": jwt}, Date=http_date(now - SKEW)))
        grant = ClientCredentials(server.token_url, "public", client_auth="none")()
        assert grant.clock_skew is not None
        assert abs(grant.clock_skew - SKEW) < 2

    def test_expires_in_and_exp_the_earlier_wins(self, server: StrictTokenServer) -> None:
        """expires_in of an hour and a JWT exp in 10 minutes: reused until exp - min_ttl."""
        now = time.time()
        jwt = make_jwt({"iat": now, "exp": now + LIFETIME})
        server.queue(answer(200, {"access_token": jwt, "expires_in": 3600}))
        grant = ClientCredentials(server.token_url, "public", client_auth="none")()
        local = _expiry.expires(jwt, grant.expires_at, grant.clock_skew, now)
        assert local == now + LIFETIME
        assert replace(grant, clock_skew=None).expires_at is not None
