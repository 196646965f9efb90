"""SharedToken: one fetch for every thread, process and host that needs the token."""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import time_machine

from token_refresh import Scheduler, _stores, current_session_id
from token_refresh._context import session_context
from token_refresh._stores import hashed
from token_refresh.shared import (
    FetchTimeout,
    FileStore,
    Grant,
    InvalidGrant,
    MemoryStore,
    RateLimited,
    Record,
    RedisStore,
    SharedToken,
    Store,
    StoreUnavailable,
)
from token_refresh.testing import ManualClock

from conftest import START, RedisServer, ReraisingThread, make_jwt

# Every SharedToken fetch runs on a thread of its own: each test here uses real threads.
pytestmark = pytest.mark.realclock

CHILD = Path(__file__).parent / "shared_child.py"
SECRET = "opaque-secret-token-value"


class MonotonicOffset:
    """The stores' monotonic clock, which a test moves together with time_machine's wall time."""

    seconds = 0.0

    @classmethod
    def now(cls) -> float:
        return time.monotonic() + cls.seconds


@pytest.fixture(autouse=True)
def movable_monotonic(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let shift() move the monotonic clock that hold-backs and shared failures count on."""
    MonotonicOffset.seconds = 0.0
    monkeypatch.setattr(_stores, "_monotonic", MonotonicOffset.now)


def shift(traveller: time_machine.Traveller, seconds: float) -> None:
    """Move wall time and the stores' monotonic clock forward together, as real time passes."""
    traveller.shift(seconds)
    MonotonicOffset.seconds += seconds


class Fetcher:
    """A token request that counts its calls and returns (or raises) what the test lines up."""

    def __init__(self, *results: object, gate: threading.Event | None = None) -> None:
        self.results = list(results)
        self.default: object = SECRET
        self.gate = gate  # when set, each call waits for it (a slow or hung request)
        self.started = threading.Event()
        self.calls = 0
        self.sessions: list[str | None] = []
        self.previous: list[Grant | None] = []
        self.lock = threading.Lock()

    def _next(self) -> Any:
        with self.lock:
            self.calls += 1
            self.sessions.append(current_session_id())
            value = self.results.pop(0) if self.results else self.default
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10), "the test never opened the gate"
        if isinstance(value, BaseException):
            raise value
        return value

    def __call__(self) -> Any:
        return self._next()

    def rotate(self, previous: Grant | None) -> Any:
        self.previous.append(previous)
        return self._next()


def call_from_threads(token: Callable[[], str | None], count: int) -> list[str | None]:
    """Call ``token`` from ``count`` threads released together; return what each got."""
    barrier = threading.Barrier(count)
    results: list[str | None] = []

    def call() -> None:
        barrier.wait(10)
        results.append(token())

    threads = [ReraisingThread(call) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@pytest.fixture(params=["memory", "file", "redis"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    """Stores that share one backing: the same MemoryStore, directory or Redis server."""
    if request.param == "memory":
        memory = MemoryStore()
        return lambda: memory
    if request.param == "file":
        return lambda: FileStore(tmp_path / "tokens")
    server: RedisServer = request.getfixturevalue("redis_server")
    return lambda: RedisStore(server.client())


def spawn(spec: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(CHILD), json.dumps(spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def expect_line(process: subprocess.Popen[str], prefix: str) -> str:
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith(prefix), f"expected {prefix!r} from the child, got {line!r}"
    return line.strip()


def kill(process: subprocess.Popen[str]) -> None:
    process.kill()
    process.wait(10)
    for pipe in (process.stdin, process.stdout):
        if pipe is not None:
            pipe.close()


def join_fetch_threads() -> None:
    """Wait until every SharedToken fetch thread has ended (what follows the delivery, too)."""
    for thread in threading.enumerate():
        if thread.name == "token-refresh-shared":
            thread.join(10)
            assert not thread.is_alive()


def wait_for_version(store: Store, key: str, version: int) -> Record:
    """The key's record once the store holds ``version`` (a delivered token is stored after)."""
    deadline = time.monotonic() + 10
    while (record := store.read(key)) is None or record.version < version:
        assert time.monotonic() < deadline, record
        time.sleep(0.005)
    return record


def end_redis_hold_back(store: Store, key: str) -> None:
    """Redis counts a hold-back on its own clock, which time_machine cannot move: end it there."""
    if isinstance(store, RedisStore):
        store._client.pexpire(store._name(key, ":hold"), 1)
        deadline = time.monotonic() + 10
        while (record := store.read(key)) is not None and record.blocked_until:
            assert time.monotonic() < deadline
            time.sleep(0.005)


def expired_record() -> Record:
    return Record(Grant("expired-token"), version=1, fetched_at=time.time() - 3600)


# -- in one process ---------------------------------------------------------------


@pytest.mark.timeout(20)
class TestOneFetch:
    def test_thirty_two_threads_share_one_fetch(self) -> None:
        """32 threads asking at once cause one token request, and all get its token."""
        fetch = Fetcher()
        token = SharedToken(fetch)
        assert call_from_threads(token, 32) == [SECRET] * 32
        assert fetch.calls == 1

    def test_callers_join_the_fetch_in_flight(self) -> None:
        """A call made while a fetch runs waits for that fetch instead of starting one."""
        gate = threading.Event()
        fetch = Fetcher(gate=gate)
        token = SharedToken(fetch, max_age=None)  # no reuse after it: only the join shares
        first = ReraisingThread(lambda: results.append(token()))
        results: list[str | None] = []
        first.start()
        assert fetch.started.wait(10)
        second = ReraisingThread(lambda: results.append(token()))
        second.start()
        gate.set()
        first.join()
        second.join()
        assert results == [SECRET, SECRET]
        assert fetch.calls <= 2  # the second call may come after the fetch ended
        assert token() == SECRET
        assert fetch.calls <= 3

    def test_a_scheduler_storm_makes_one_fetch(self) -> None:
        """100 sessions falling due together on a Scheduler make one token request."""
        fetch = Fetcher()
        delivered: list[str] = []
        clock = ManualClock(start=START)
        with Scheduler(SharedToken(fetch), lambda s, t: delivered.append(t), clock=clock) as sched:
            for index in range(100):
                sched.schedule_from_expires_in(f"s{index}", 330)
            clock.advance(30)
        assert delivered == [SECRET] * 100
        assert fetch.calls == 1


class TestReuse:
    def test_a_jwt_is_reused_until_min_ttl_before_exp(self) -> None:
        """A JWT is served from the cache while exp is more than min_ttl away, then fetched."""
        with time_machine.travel(START, tick=False) as traveller:
            jwt = make_jwt({"exp": START + 3600})
            fetch = Fetcher(jwt, "second")
            token = SharedToken(fetch, min_ttl=300)
            assert token() == jwt
            shift(traveller, 3600 - 301)
            assert token() == jwt
            assert fetch.calls == 1
            shift(traveller, 2)
            assert token() == "second"
            assert fetch.calls == 2

    def test_an_opaque_token_is_reused_for_max_age(self) -> None:
        """An opaque token serves calls for max_age seconds after its fetch, not after."""
        with time_machine.travel(START, tick=False) as traveller:
            fetch = Fetcher("first", "second")
            token = SharedToken(fetch, max_age=5)
            assert token() == "first"
            shift(traveller, 4.9)
            assert token() == "first"
            shift(traveller, 0.2)
            assert token() == "second"

    def test_a_short_lived_jwt_is_shared_for_max_age(self) -> None:
        """A JWT living less than min_ttl still serves the calls within max_age of its fetch."""
        with time_machine.travel(START, tick=False) as traveller:
            jwt = make_jwt({"exp": START + 120})  # 2 minutes: always within min_ttl=300
            fetch = Fetcher(jwt, "second")
            token = SharedToken(fetch, min_ttl=300, max_age=5)
            assert call_from_threads(token, 8) == [jwt] * 8
            shift(traveller, 4.9)
            assert token() == jwt
            assert fetch.calls == 1
            shift(traveller, 0.2)
            assert token() == "second"

    def test_max_age_none_fetches_every_time(self) -> None:
        """With max_age=None an opaque token is never reused."""
        fetch = Fetcher("first", "second")
        token = SharedToken(fetch, max_age=None)
        assert [token(), token()] == ["first", "second"]

    def test_a_grant_with_expires_at_is_reused_like_a_jwt(self) -> None:
        """A Grant's expires_at counts as its expiry, for opaque tokens with an expires_in."""
        with time_machine.travel(START, tick=False) as traveller:
            fetch = Fetcher(Grant("first", expires_at=START + 600), "second")
            token = SharedToken(fetch, min_ttl=300, max_age=0)
            assert token() == "first"
            shift(traveller, 299)
            assert token() == "first"
            shift(traveller, 2)
            assert token() == "second"

    def test_a_stored_token_is_reused_across_shared_tokens(
        self, make_store: Callable[[], Store]
    ) -> None:
        """A second SharedToken (another process, in effect) reuses what the first stored."""
        fetch = Fetcher()
        first = SharedToken(fetch, make_store(), "k")
        second = SharedToken(Fetcher("never"), make_store(), "k")
        assert first() == SECRET
        assert second() == SECRET
        assert fetch.calls == 1


class TestFailures:
    def test_none_is_returned_and_shared_for_max_age(self) -> None:
        """A fetch that returns None gives None, and calls within max_age get None unfetched."""
        with time_machine.travel(START, tick=False) as traveller:
            fetch = Fetcher(None, "")
            token = SharedToken(fetch, max_age=5)
            assert token() is None
            assert token() is None
            assert fetch.calls == 1
            shift(traveller, 6)
            assert token() is None  # "" is no token either
            shift(traveller, 6)
            assert token() == SECRET

    def test_an_exception_reaches_every_caller_of_the_fetch(self) -> None:
        """The fetch's exception is raised to its callers and to calls within max_age."""
        with time_machine.travel(START, tick=False) as traveller:
            fetch = Fetcher(ConnectionResetError("down"))
            token = SharedToken(fetch)
            for _ in range(3):
                with pytest.raises(ConnectionResetError, match="down"):
                    token()
            assert fetch.calls == 1
            shift(traveller, 6)
            assert token() == SECRET

    def test_a_scheduler_counts_a_failure_and_retries(self) -> None:
        """Under a Scheduler a failed SharedToken call is a failure, retried 60 s later."""
        clock = ManualClock(start=START)
        fetch = Fetcher(OSError("no route"))
        delivered: list[str] = []
        with Scheduler(SharedToken(fetch), lambda s, t: delivered.append(t), clock=clock) as sched:
            sched.schedule_from_expires_in("s", 330)
            clock.advance(30)
            assert delivered == []
            with time_machine.travel(time.time() + 61):
                MonotonicOffset.seconds += 61  # past the shared failure's max_age
                clock.advance(60)
        assert delivered == [SECRET]

    def test_a_wrong_type_from_fetch_is_a_type_error(self) -> None:
        """A fetch returning neither a str, a Grant nor None fails with a TypeError."""
        token = SharedToken(Fetcher(42))
        with pytest.raises(TypeError, match="fetch returned int"):
            token()

    @pytest.mark.parametrize(
        ("options", "error"),
        [
            ({"fetch": "not callable"}, TypeError),
            ({"key": ""}, TypeError),
            ({"min_ttl": -1}, ValueError),
            ({"max_age": "5"}, TypeError),
            ({"lease_ttl": 0}, ValueError),
            ({"fetch_timeout": 0}, ValueError),
            ({"invalid_grant_wait": float("nan")}, ValueError),
            ({"min_ttl": True}, TypeError),
        ],
    )
    def test_bad_options_are_refused(self, options: dict[str, Any], error: type[Exception]) -> None:
        """Bad arguments raise at construction."""
        with pytest.raises(error):
            SharedToken(**{"fetch": Fetcher(), **options})

    def test_no_token_in_reprs_or_logs(self, caplog: pytest.LogCaptureFixture) -> None:
        """Grants, records and SharedTokens show fingerprints; debug logs never carry a token."""
        caplog.set_level(logging.DEBUG, logger="token_refresh")
        grant = Grant(SECRET, "refresh-secret", expires_at=1.0)
        token = SharedToken(Fetcher(grant))
        assert token() == SECRET
        shown = repr(grant) + repr(Record(grant, 1, 2.0)) + repr(token) + caplog.text
        assert "sha256:" in shown
        assert SECRET not in shown
        assert "refresh-secret" not in shown

    def test_a_grant_must_hold_tokens(self) -> None:
        """A Grant refuses an empty access token or a non-str refresh token."""
        with pytest.raises(TypeError, match="access_token"):
            Grant("")
        with pytest.raises(TypeError, match="refresh_token"):
            Grant("a", 42)  # type: ignore[arg-type]


@pytest.mark.timeout(20)
class TestFetchTimeout:
    def test_a_hung_fetch_fails_its_callers_and_its_late_token_is_kept(self) -> None:
        """Past fetch_timeout a caller gets FetchTimeout naming the key; the late token is kept."""
        gate = threading.Event()
        written = threading.Event()
        store = MemoryStore()
        original_write = store.write

        def write(key: str, record: Record, *, expect: int | None = None) -> bool:
            stored = original_write(key, record, expect=expect)
            written.set()
            return stored

        store.write = write  # type: ignore[method-assign]
        fetch = Fetcher(gate=gate)
        token = SharedToken(fetch, store, "slow", fetch_timeout=0.2)
        began = time.monotonic()
        with pytest.raises(FetchTimeout, match="'slow'") as raised:
            token()
        assert time.monotonic() - began < 2
        assert SECRET not in str(raised.value)
        gate.set()
        assert written.wait(10)
        assert token() == SECRET
        assert fetch.calls == 1

    def test_default_fetch_timeout_outlasts_the_lease_and_the_schedulers_is_longer(
        self,
    ) -> None:
        """By default a call waits lease_ttl + 5 s, and a Scheduler waits longer than that."""
        assert SharedToken(Fetcher(), lease_ttl=2)._fetch_timeout == 7.0
        assert SharedToken(Fetcher())._fetch_timeout == 35.0
        defaults = Scheduler.__init__.__kwdefaults__
        assert defaults is not None
        assert defaults["fetch_timeout"] > SharedToken(Fetcher())._fetch_timeout

    def test_stuck_fetches_are_capped(self) -> None:
        """A new fetch starts once the hung one is past fetch_timeout, up to three stuck at once."""
        gate = threading.Event()
        fetch = Fetcher(gate=gate)
        token = SharedToken(fetch, lease_ttl=0.01, fetch_timeout=0.05)
        try:
            for _ in range(3):
                with pytest.raises(FetchTimeout, match="within"):
                    token()
            with pytest.raises(FetchTimeout, match="3 fetches for key 'default' are still running"):
                token()
            assert fetch.calls <= 3
        finally:
            gate.set()

    def test_fetch_timeout_none_waits_for_the_fetch(self) -> None:
        """With fetch_timeout=None a call waits for as long as the fetch takes."""
        assert SharedToken(Fetcher(), fetch_timeout=None)() == SECRET

    def test_a_fork_without_hooks_drops_the_fetch_in_flight(self) -> None:
        """In a process forked without at-fork hooks (uWSGI) a call starts its own fetch."""
        gate = threading.Event()
        fetch = Fetcher(gate=gate)
        fetch.results = ["parent's"]
        token = SharedToken(fetch, lease_ttl=0.05, fetch_timeout=5)
        parent = ReraisingThread(token)
        parent.start()
        assert fetch.started.wait(10)
        token._pid = -1  # as a child sees it: the pid the state was made for is not its own
        fetch.gate = None
        try:
            assert token() == SECRET  # not the parent's fetch, which never ends in a child
        finally:
            gate.set()
            parent.join()

    def test_an_error_after_delivery_is_logged(self, caplog: pytest.LogCaptureFixture) -> None:
        """A store failing after the token was delivered is logged; the callers have their token."""

        class Failing:
            def release(self) -> None:
                raise RuntimeError("bug in a store")

        store = MemoryStore()
        store.try_lease = lambda key, ttl: Failing()  # type: ignore[method-assign]
        assert SharedToken(Fetcher(), store)() == SECRET
        join_fetch_threads()
        assert "RuntimeError after the token was delivered" in caplog.text

    def test_a_refused_thread_fails_the_call_only(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """If the OS refuses the fetch's thread the call raises, and the next call works."""

        def refuse(self: threading.Thread) -> None:
            raise RuntimeError("can't start new thread")

        token = SharedToken(Fetcher(), max_age=0)
        with monkeypatch.context() as patch:
            patch.setattr(threading.Thread, "start", refuse)
            with pytest.raises(RuntimeError, match="can't start"):
                token()
        assert token() == SECRET


# -- per-session credentials ------------------------------------------------------------


class TestSessions:
    def test_the_scheduler_tells_get_access_token_its_session(self, clock: ManualClock) -> None:
        """Inside get_access_token, current_session_id() is the session being refreshed."""
        seen: list[str | None] = []

        def get_access_token() -> str:
            seen.append(current_session_id())
            return "t"

        with Scheduler(get_access_token, lambda s, t: None, clock=clock) as sched:
            sched.schedule_from_expires_in("alice", 330)
            sched.schedule_from_expires_in("bob", 331)
            clock.advance(31)
        assert seen == ["alice", "bob"]
        assert current_session_id() is None

    def test_per_session_tokens_are_fetched_per_session(self, clock: ManualClock) -> None:
        """With per_session=True each session gets its own fetch, which knows the session."""
        fetch = Fetcher("for-alice", "for-bob")
        delivered: dict[str, str] = {}
        token = SharedToken(fetch, per_session=True)
        with Scheduler(token, delivered.__setitem__, clock=clock) as sched:
            sched.schedule_from_expires_in("alice", 330)
            sched.schedule_from_expires_in("bob", 330)
            clock.advance(30)
        assert delivered == {"alice": "for-alice", "bob": "for-bob"}
        assert fetch.sessions == ["alice", "bob"]
        with session_context("alice"):
            assert token() == "for-alice"  # reused
        assert fetch.calls == 2

    def test_per_session_outside_a_session_is_an_error(self) -> None:
        """A per-session SharedToken called with no current session raises LookupError."""
        with pytest.raises(LookupError, match="current_session_id"):
            SharedToken(Fetcher(), per_session=True)()

    def test_a_credential_like_session_id_is_fingerprinted(self) -> None:
        """A session id shaped like a credential never appears in an error message."""
        token = SharedToken(Fetcher(RateLimited(30)), per_session=True)
        session = "sk-ant-si-" + "x" * 20
        with session_context(session), pytest.raises(RateLimited) as raised:
            token()
        with session_context(session), pytest.raises(RateLimited, match="default/sha256:"):
            token()
        assert session not in str(raised.value)

    def test_many_sessions_do_not_pile_up(self) -> None:
        """Cached tokens and finished fetches of sessions gone by are forgotten."""
        token = SharedToken(Fetcher(), per_session=True, max_age=0)
        for index in range(300):
            with session_context(f"s{index}"):
                assert token() == SECRET
        assert len(token._cache) + len(token._flights) < 200


# -- rotating refresh tokens ------------------------------------------------------------


class TestRotation:
    def test_each_refresh_token_is_spent_once(self, make_store: Callable[[], Store]) -> None:
        """Two holders take turns: each fetch gets the grant the other stored, never an old one."""
        with time_machine.travel(START, tick=False) as traveller:
            fetch = Fetcher(*(Grant(f"access-{n}", f"refresh-{n}") for n in range(4)))
            holders = [
                SharedToken(fetch.rotate, make_store(), "rot", rotating=True, max_age=1)
                for _ in range(2)
            ]
            for round_ in range(4):
                assert holders[round_ % 2]() == f"access-{round_}"
                shift(traveller, 2)
        spent = [None if p is None else p.refresh_token for p in fetch.previous]
        assert spent == [None, "refresh-0", "refresh-1", "refresh-2"]

    def test_a_failed_write_keeps_the_new_refresh_token_for_the_next_fetch(
        self, tmp_path: Path
    ) -> None:
        """If the new grant could not be stored, the next fetch still gets it, not the spent one."""
        with time_machine.travel(START, tick=False) as traveller:
            fetch = Fetcher(*(Grant(f"access-{n}", f"refresh-{n}") for n in range(3)))
            token = SharedToken(fetch.rotate, FileStore(tmp_path), "rot", rotating=True, max_age=1)
            assert token() == "access-0"
            join_fetch_threads()  # stored
            (tmp_path / ".write.lock").unlink()
            (tmp_path / ".write.lock").mkdir()  # the next write fails
            shift(traveller, 2)
            assert token() == "access-1"  # served from this process only
            join_fetch_threads()
            (tmp_path / ".write.lock").rmdir()
            shift(traveller, 2)
            assert token() == "access-2"
        spent = [None if p is None else p.refresh_token for p in fetch.previous]
        assert spent == [None, "refresh-0", "refresh-1"]

    @pytest.mark.timeout(20)
    def test_a_rotating_waiter_never_fetches_without_the_lease(self, tmp_path: Path) -> None:
        """Past lease_ttl, a waiter of a rotating token still waits for a live holder's grant."""
        gate = threading.Event()
        fetch = Fetcher(Grant("access-0", "refresh-0"), gate=gate)
        options: dict[str, Any] = {"rotating": True, "lease_ttl": 0.1, "fetch_timeout": 10}
        holder = SharedToken(fetch.rotate, FileStore(tmp_path), "rot", **options)
        waiter = SharedToken(fetch.rotate, FileStore(tmp_path), "rot", **options)
        first = ReraisingThread(lambda: holder())
        first.start()
        assert fetch.started.wait(10)
        results: list[str | None] = []
        second = ReraisingThread(lambda: results.append(waiter()))
        second.start()
        assert not gate.wait(0.5)  # five lease_ttls pass (real time) while the holder fetches
        gate.set()
        first.join()
        second.join()
        assert results == ["access-0"]
        assert fetch.calls == 1

    def test_invalid_grant_waits_for_the_sibling_that_rotated_first(self) -> None:
        """An invalid_grant is not a failure when a newer grant turns up in the store."""
        store = MemoryStore()

        def refresh(previous: Grant | None) -> Grant:
            # A sibling rotated this refresh token a moment ago, without our lease.
            store.write("k", Record(Grant("sibling-access", "sibling-refresh"), 1, time.time()))
            raise InvalidGrant("invalid_grant")

        token = SharedToken(refresh, store, "k", rotating=True)
        assert token() == "sibling-access"

    @pytest.mark.timeout(10)
    def test_invalid_grant_with_no_newer_grant_fails(self) -> None:
        """With nothing newer stored within invalid_grant_wait the invalid_grant is the failure."""
        fetch = Fetcher(InvalidGrant("invalid_grant"))
        token = SharedToken(fetch.rotate, rotating=True, invalid_grant_wait=0.05)
        with pytest.raises(InvalidGrant):
            token()

    def test_invalid_grant_without_rotation_fails_at_once(self) -> None:
        """A plain fetch's InvalidGrant is an ordinary failure."""
        with pytest.raises(InvalidGrant):
            SharedToken(Fetcher(InvalidGrant("x")), invalid_grant_wait=60)()


# -- one failure, seen by all ----------------------------------------------------------


class TestRateLimited:
    def test_a_429_holds_back_every_process_sharing_the_key(
        self, make_store: Callable[[], Store]
    ) -> None:
        """After a RateLimited(30), no one sharing the key fetches for 30 s, then one does."""
        with time_machine.travel(START, tick=False) as traveller:
            limited = Fetcher(RateLimited(30))
            other = Fetcher("after")
            first = SharedToken(limited, make_store(), "rl")
            second = SharedToken(other, make_store(), "rl")
            with pytest.raises(RateLimited):
                first()
            with pytest.raises(RateLimited, match="'rl'") as raised:
                second()
            assert raised.value.retry_after == pytest.approx(30, abs=1)
            assert other.calls == 0
            shift(traveller, 20)
            with pytest.raises(RateLimited) as again:
                first()  # held back in this process without a look at the store
            assert again.value.retry_after == pytest.approx(10, abs=1)
            shift(traveller, 11)
            end_redis_hold_back(make_store(), "rl")
            assert second() == "after"
            assert limited.calls == 1

    def test_retry_after_must_be_a_duration(self) -> None:
        """RateLimited refuses a negative or non-numeric retry_after."""
        with pytest.raises(ValueError, match="retry_after"):
            RateLimited(-1)
        with pytest.raises(TypeError, match="retry_after"):
            RateLimited("30")  # type: ignore[arg-type]


# -- the stores --------------------------------------------------------------------------


class TestStores:
    def test_write_is_a_compare_and_set_on_the_version(
        self, make_store: Callable[[], Store]
    ) -> None:
        """A write lands only on the version it follows; an older or repeated one loses."""
        store = make_store()
        assert store.read("k") is None
        assert store.write("k", Record(Grant("one"), 1, 10.0))
        assert not store.write("k", Record(Grant("other"), 1, 11.0))
        assert store.write("k", Record(Grant("two", "r2", 99.5), 2, 12.0))
        assert make_store().read("k") == Record(Grant("two", "r2", 99.5), 2, 12.0)

    def test_one_lease_at_a_time(self, make_store: Callable[[], Store]) -> None:
        """While one holds a key's lease nobody else gets it; after release the next one does."""
        store, other = make_store(), make_store()
        lease = store.try_lease("k", 30)
        assert lease is not None
        assert other.try_lease("k", 30) is None
        assert other.try_lease("another-key", 30) is not None
        lease.release()
        lease.release()  # idempotent
        assert other.try_lease("k", 30) is not None

    def test_a_memory_lease_is_kept_by_its_live_holder_past_its_ttl(self) -> None:
        """A MemoryStore lease is held until released, as a live process holds a FileStore's."""
        store = MemoryStore()
        old = store.try_lease("k", 0.001)
        assert old is not None
        assert not threading.Event().wait(0.05)  # fifty ttls pass (real time)
        assert store.try_lease("k", 30) is None
        old.release()
        new = store.try_lease("k", 30)
        assert new is not None
        old.release()  # a second release frees nothing of the new holder's
        assert store.try_lease("k", 30) is None
        new.release()

    def test_hold_back_keeps_the_grant_and_a_write_ends_it(
        self, make_store: Callable[[], Store]
    ) -> None:
        """hold_back sets blocked_until only; the next successful write clears it."""
        store = make_store()
        with time_machine.travel(START, tick=False):
            store.hold_back("fresh", seconds=50.0)
            fresh = store.read("fresh")
            assert fresh is not None
            assert (fresh.grant, fresh.version) == (None, 0)
            assert fresh.blocked_until == pytest.approx(START + 50, abs=1)
            store.write("k", Record(Grant("one"), 1, 10.0))
            store.hold_back("k", seconds=100.0)
            held = store.read("k")
            assert held is not None
            assert (held.grant, held.version) == (Grant("one"), 1)
            assert held.blocked_until == pytest.approx(START + 100, abs=1)
            assert store.write("k", Record(Grant("two"), 2, 20.0))
            assert store.read("k") == Record(Grant("two"), 2, 20.0, 0.0)

    def test_redis_store_without_redis_py_says_what_to_install(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without redis-py, RedisStore raises an ImportError naming the extra to install."""
        monkeypatch.setitem(sys.modules, "redis", None)  # import redis now raises ImportError
        with pytest.raises(ImportError, match=r"token_refresh\[redis\]"):
            RedisStore(object())  # type: ignore[arg-type]

    def test_store_reprs(self, tmp_path: Path) -> None:
        """Stores say what they are, and nothing of what they hold."""
        memory = MemoryStore()
        memory.write("k", Record(Grant(SECRET), 1, 1.0))
        assert repr(memory) == "MemoryStore(keys=1)"
        assert repr(FileStore(tmp_path)) == f"FileStore({str(tmp_path)!r})"


@pytest.mark.timeout(20)
class TestSlowFetch:
    def test_a_fetch_slower_than_its_lease_is_still_stored(
        self, make_store: Callable[[], Store]
    ) -> None:
        """A fetch that outlives lease_ttl still stores its token, which the next caller reuses."""

        def slow_fetch() -> str:
            time.sleep(0.3)  # the token request takes three lease_ttl
            return SECRET

        token = SharedToken(slow_fetch, make_store(), "slow", lease_ttl=0.1)
        assert token() == SECRET
        join_fetch_threads()  # the token is delivered first, then stored
        record = make_store().read("slow")
        assert record is not None
        assert record.grant == Grant(SECRET)
        assert SharedToken(Fetcher("never"), make_store(), "slow")() == SECRET

    def test_a_late_fetch_loses_to_a_newer_one(
        self, make_store: Callable[[], Store], caplog: pytest.LogCaptureFixture
    ) -> None:
        """After the lease ran out a second holder fetches; the first one's late write loses."""
        caplog.set_level(logging.DEBUG, logger="token_refresh")
        gate = threading.Event()
        slow = Fetcher("slow-token", gate=gate)
        first = SharedToken(slow, make_store(), "race", lease_ttl=0.2)
        results: list[str | None] = []
        caller = ReraisingThread(lambda: results.append(first()))
        caller.start()
        assert slow.started.wait(10)
        second = SharedToken(Fetcher("fast-token"), make_store(), "race", lease_ttl=0.2)
        assert second() == "fast-token"  # waited out the lease, then fetched anyway
        wait_for_version(make_store(), "race", 1)  # stored after its delivery
        gate.set()
        caller.join()
        join_fetch_threads()
        assert results == ["slow-token"]  # its callers still get a good token
        record = make_store().read("race")
        assert record is not None
        assert record.grant == Grant("fast-token")
        assert "a newer token was stored meanwhile" in caplog.text


class TestFileStore:
    def test_files_are_private(self, tmp_path: Path) -> None:
        """The directory is made 0700 and every file 0600, whatever the umask."""
        old = os.umask(0)
        try:
            directory = tmp_path / "a" / "tokens"
            token = SharedToken(Fetcher(RateLimited(1)), FileStore(directory), "k")
            with pytest.raises(RateLimited):
                token()
            assert SharedToken(Fetcher(), FileStore(directory), "j")() == SECRET
        finally:
            os.umask(old)
        join_fetch_threads()  # j's token is stored after its delivery
        assert directory.stat().st_mode & 0o777 == 0o700
        names = sorted(path.name for path in directory.iterdir())
        assert names == sorted(
            [
                ".write.lock",
                *(hashed(key) + suffix for key in "jk" for suffix in (".json", ".lease")),
            ]
        )
        assert {(directory / name).stat().st_mode & 0o777 for name in names} == {0o600}

    def test_keys_are_hashed_into_file_names(self, tmp_path: Path) -> None:
        """Any key, slashes included, maps to one fixed-length file that names the key inside."""
        store = FileStore(tmp_path)
        assert store.write("a/../b", Record(Grant("t"), 1, 1.0))
        assert [path.name for path in tmp_path.glob("*.json")] == [f"{hashed('a/../b')}.json"]
        assert json.loads((tmp_path / f"{hashed('a/../b')}.json").read_text())["key"] == "a/../b"

    def test_a_corrupt_record_is_replaced(self, tmp_path: Path) -> None:
        """An unreadable record counts as none: the next fetch overwrites it."""
        (tmp_path / f"{hashed('k')}.json").write_text("{not json")
        assert SharedToken(Fetcher(), FileStore(tmp_path), "k")() == SECRET
        record = wait_for_version(FileStore(tmp_path), "k", 1)
        assert record is not None
        assert (record.grant, record.version) == (Grant(SECRET), 1)

    def test_readers_take_no_lock(self, tmp_path: Path) -> None:
        """A read goes through while a writer holds the write lock."""
        import fcntl

        store = FileStore(tmp_path)
        store.write("k", Record(Grant("t"), 1, 1.0))
        with open(tmp_path / ".write.lock", "rb") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            assert store.read("k") == Record(Grant("t"), 1, 1.0)

    def test_errors_name_the_key(self, tmp_path: Path) -> None:
        """A broken directory raises StoreUnavailable naming the key, never a token."""
        (tmp_path / f"{hashed('k')}.json").mkdir()  # reading the record fails
        token = SharedToken(Fetcher(), FileStore(tmp_path), "k")
        with pytest.raises(StoreUnavailable, match="for key 'k'") as raised:
            token()
        assert SECRET not in str(raised.value)
        (tmp_path / "file").write_text("")
        with pytest.raises(StoreUnavailable, match="FileStore"):
            FileStore(tmp_path / "file")

    def test_a_directory_others_may_write_is_refused(self, tmp_path: Path) -> None:
        """A directory anyone else can write to (to plant a token) is a PermissionError."""
        shared = tmp_path / "shared"
        shared.mkdir()
        shared.chmod(0o777)
        with pytest.raises(PermissionError, match="mode 0700"):
            FileStore(shared)
        shared.chmod(0o700)
        FileStore(shared)

    def test_lease_files_are_made_private(self, tmp_path: Path) -> None:
        """A lease file left with a wide mode is narrowed to 0600 when it is next locked."""
        lease = tmp_path / f"{hashed('k')}.lease"
        lease.write_text("")
        lease.chmod(0o666)
        SharedToken(Fetcher(), FileStore(tmp_path), "k")()
        assert stat.S_IMODE(lease.stat().st_mode) == 0o600

    def test_errors_never_quote_a_credential_like_session_id(self, tmp_path: Path) -> None:
        """A store error names the key with its session part fingerprinted, file names left out."""
        session = "sk-ant-si-SESSIONsecret0123456789"
        (tmp_path / f"{hashed('k/' + session)}.json").mkdir()  # reading its record fails
        token = SharedToken(Fetcher(), FileStore(tmp_path), "k", per_session=True)
        with session_context(session), pytest.raises(StoreUnavailable) as raised:
            token()
        assert "SESSIONsecret" not in str(raised.value)
        assert "k/sha256:" in str(raised.value)

    def test_a_failed_write_still_delivers(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """When the record cannot be written, the fetched token still reaches its callers."""
        store = FileStore(tmp_path)
        (tmp_path / ".write.lock").mkdir()  # the write lock cannot be opened
        token = SharedToken(Fetcher(), store, "k")
        assert token() == SECRET
        join_fetch_threads()  # the write follows the delivery
        assert "the token serves this process only" in caplog.text
        with pytest.raises(RateLimited):
            SharedToken(Fetcher(RateLimited(5)), store, "j")()
        assert "held back in this process only" in caplog.text
        assert SECRET not in caplog.text

    def test_a_temp_file_is_removed_when_the_write_fails(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A write that fails half-way leaves neither a record nor a temp file."""

        def fail(source: str, target: str) -> None:
            raise OSError("disk full")

        store = FileStore(tmp_path)
        monkeypatch.setattr(os, "replace", fail)
        with pytest.raises(StoreUnavailable, match="disk full"):
            store.write("k", Record(Grant("t"), 1, 1.0))
        assert sorted(p.name for p in tmp_path.iterdir()) == [".write.lock"]

    @pytest.mark.timeout(30)
    def test_eight_processes_of_four_threads_fetch_once(self, tmp_path: Path) -> None:
        """8 processes x 4 threads against an expired record make one token request."""
        directory, count = tmp_path / "tokens", tmp_path / "fetches"
        FileStore(directory).write("k", expired_record())
        spec = {"store": "file", "path": str(directory), "key": "k", "mode": "storm"}
        results = run_storm({**spec, "threads": 4, "count": str(count)}, processes=8)
        assert len(count.read_text().splitlines()) == 1
        assert len(results) == 32
        assert len(set(results)) == 1
        assert results[0] is not None
        assert results[0].startswith("token-from-")

    @pytest.mark.timeout(30)
    def test_a_killed_holder_frees_the_lease_at_once(self, tmp_path: Path) -> None:
        """A process killed mid-fetch (SIGKILL) holds nothing: the next caller fetches at once."""
        directory, count = tmp_path / "tokens", tmp_path / "fetches"
        spec = {"store": "file", "path": str(directory), "key": "k", "mode": "hold"}
        holder = spawn({**spec, "count": str(count)})
        try:
            expect_line(holder, "fetching")
            assert FileStore(directory).try_lease("k", 30) is None
        finally:
            kill(holder)
        began = time.monotonic()
        assert SharedToken(Fetcher(), FileStore(directory), "k", lease_ttl=30)() == SECRET
        assert time.monotonic() - began < 5  # not lease_ttl

    @pytest.mark.timeout(30)
    def test_a_forked_child_neither_frees_nor_keeps_its_parents_lease(self, tmp_path: Path) -> None:
        """A child forked while the lease is held cannot free it, and does not outlive it."""
        directory = tmp_path / "tokens"
        spec = {"store": "file", "path": str(directory), "key": "k", "mode": "fork-hold"}
        parent = spawn({**spec, "count": str(tmp_path / "fetches")})
        child = 0
        try:
            assert parent.stdout is not None
            lines = sorted([parent.stdout.readline(), parent.stdout.readline()])
            assert lines[0] == "child\n", lines
            child = int(lines[1].split()[1])
            assert FileStore(directory).try_lease("k", 30) is None
        finally:
            kill(parent)
        try:
            # The child lives on, but its copy of the fd was closed at fork.
            assert FileStore(directory).try_lease("k", 30) is not None
        finally:
            os.kill(child, signal.SIGKILL)

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
    @pytest.mark.timeout(30)
    def test_a_child_releasing_an_inherited_lease_leaves_it_held(self, tmp_path: Path) -> None:
        """Code in a forked child that releases an inherited lease does not unlock the parent's."""
        store = FileStore(tmp_path)
        lease = store.try_lease("k", 30)
        assert lease is not None
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            lease.release()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert FileStore(tmp_path).try_lease("k", 30) is None
        lease.release()
        assert FileStore(tmp_path).try_lease("k", 30) is not None


def run_storm(spec: dict[str, Any], processes: int) -> list[str | None]:
    """Start the processes, let them all call at once, and return every token they got."""
    launcher = spawn({**spec, "processes": processes})
    try:
        for _ in range(processes):
            expect_line(launcher, "ready")
        assert launcher.stdin is not None
        launcher.stdin.write("x" * processes)
        launcher.stdin.flush()
        results: list[str | None] = []
        assert launcher.stdout is not None
        for _ in range(processes):
            results += json.loads(launcher.stdout.readline())
        return results
    finally:
        kill(launcher)


@pytest.mark.timeout(40)
class TestRedis:
    def test_sixteen_processes_fetch_once(self, redis_server: RedisServer, tmp_path: Path) -> None:
        """16 processes against an expired record on a real Redis make one token request."""
        count = tmp_path / "fetches"
        RedisStore(redis_server.client()).write("k", expired_record())
        spec = {"store": "redis", "path": str(redis_server.socket), "key": "k", "mode": "storm"}
        results = run_storm({**spec, "threads": 1, "count": str(count)}, processes=16)
        assert len(count.read_text().splitlines()) == 1
        assert len(set(results)) == 1
        assert len(results) == 16

    def test_a_killed_holder_frees_the_lease_after_lease_ttl(
        self, redis_server: RedisServer, tmp_path: Path
    ) -> None:
        """A holder killed mid-fetch blocks the others for lease_ttl at most."""
        spec = {"store": "redis", "path": str(redis_server.socket), "key": "k", "mode": "hold"}
        holder = spawn({**spec, "count": str(tmp_path / "fetches"), "lease_ttl": 1.0})
        try:
            expect_line(holder, "fetching")
        finally:
            kill(holder)
        began = time.monotonic()
        token = SharedToken(Fetcher(), RedisStore(redis_server.client()), "k", lease_ttl=30)
        assert token() == SECRET
        assert time.monotonic() - began < 5

    def test_stopped_redis_fails_fast_naming_the_key(
        self, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Redis stopped mid-run: with the client's default retries a call raises within seconds."""
        caplog.set_level(logging.DEBUG, logger="token_refresh")
        fetch = Fetcher()
        token = SharedToken(fetch, RedisStore(redis_server.client()), "svc", max_age=0)
        assert token() == SECRET
        redis_server.stop()
        began = time.monotonic()
        with pytest.raises(StoreUnavailable, match="Redis failed for key 'svc'") as raised:
            token()
        assert time.monotonic() - began < 30 + 5  # lease_ttl plus a few seconds
        assert SECRET not in str(raised.value)
        assert SECRET not in caplog.text
        assert fetch.calls == 1

    def test_frozen_redis_is_bounded_by_fetch_timeout(self, redis_server: RedisServer) -> None:
        """A server that stops answering (SIGSTOP) costs a caller fetch_timeout, not a hang."""
        client = redis_server.client(socket_timeout=0.5)
        token = SharedToken(Fetcher(), RedisStore(client), "svc", max_age=0, fetch_timeout=1.0)
        assert token() == SECRET
        redis_server.freeze()
        try:
            began = time.monotonic()
            # Each try waits socket_timeout, and redis-py tries 11 times: fetch_timeout ends it.
            with pytest.raises(FetchTimeout, match="'svc'"):
                token()
            assert time.monotonic() - began < 3
        finally:
            redis_server.thaw()

    def test_redis_lost_during_a_fetch_still_delivers(
        self, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Redis lost during a fetch: the token is delivered; the write and release are logged."""
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        store = RedisStore(redis_server.client(retry=Retry(NoBackoff(), 0)))

        def fetch() -> str:
            redis_server.stop()
            return SECRET

        token = SharedToken(fetch, store, "svc")
        assert token() == SECRET
        join_fetch_threads()
        assert "the token serves this process only" in caplog.text
        assert "the lease expires by itself" in caplog.text
        assert SECRET not in caplog.text

    def test_records_and_leases_live_under_the_prefix(self, redis_server: RedisServer) -> None:
        """RedisStore keeps a key's record and lease under its prefix, in one hash slot."""
        client = redis_server.client(decode_responses=True)
        store = RedisStore(client, prefix="app:")
        lease = store.try_lease("k", 30)
        assert lease is not None
        store.write("k", Record(Grant("t"), 1, 1.0))
        assert sorted(client.keys("*")) == [
            f"app:{{{hashed('k')}}}",
            f"app:{{{hashed('k')}}}:lease",
        ]
        assert store.read("k") == Record(Grant("t"), 1, 1.0)
        assert repr(store) == "RedisStore(prefix='app:')"
        lease.release()
