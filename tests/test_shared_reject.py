"""SharedToken.reject(token): a refused token is replaced once, however many saw it refused."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import time_machine
from test_shared import (
    SECRET,
    Fetcher,
    MonotonicOffset,
    call_from_threads,
    join_fetch_threads,
    make_store,
    movable_monotonic,
    run_storm,
    wait_for_version,
)
from test_shared_faults import RotatingEndpoint

from token_refresh._context import session_context
from token_refresh.shared import (
    FileStore,
    Grant,
    MemoryStore,
    Record,
    RedisStore,
    SharedToken,
    Store,
)

from conftest import START, RedisServer, ReraisingThread

pytestmark = pytest.mark.realclock

__all__ = ["make_store", "movable_monotonic"]  # fixtures shared with test_shared.py

FOREVER = START + 10 * 365 * 86400.0  # a grant that expires long after these tests


class Counting:
    """A token request that returns a new opaque token, good for ever, on each call."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self) -> Grant:
        with self.lock:
            self.calls += 1
            return Grant(f"token-{self.calls}", expires_at=FOREVER)


def call_reject_call(token: SharedToken, refused: str, count: int) -> list[str | None]:
    """``count`` threads at once: each calls, rejects the refused token if it got it, calls."""

    def once() -> str | None:
        got = token()
        if got == refused:
            token.reject(refused)
            got = token()
        return got

    return call_from_threads(once, count)


class TestOneFetch:
    def test_thirty_two_threads_rejecting_one_token_make_one_fetch(
        self, make_store: Callable[[], Store]
    ) -> None:
        """32 threads see the token refused at once: one new fetch, and all get the new token."""
        fetch = Counting()
        token = SharedToken(fetch, make_store(), "k")
        assert token() == "token-1"
        join_fetch_threads()
        assert call_reject_call(token, "token-1", 32) == ["token-2"] * 32
        assert fetch.calls == 2

    @pytest.mark.timeout(30)
    def test_processes_rejecting_one_token_make_one_fetch(self, tmp_path: Path) -> None:
        """8 processes x 4 threads through FileStore see one token refused: one new fetch."""
        directory, count = tmp_path / "tokens", tmp_path / "fetches"
        FileStore(directory).write("k", Record(Grant("refused", expires_at=FOREVER), 1, START))
        spec = {"store": "file", "path": str(directory), "key": "k", "mode": "storm"}
        results = run_storm(
            {**spec, "threads": 4, "count": str(count), "refused": "refused"}, processes=8
        )
        assert len(count.read_text().splitlines()) == 1
        assert len(results) == 32
        assert len(set(results)) == 1
        assert results[0] is not None
        assert results[0].startswith("token-from-")

    @pytest.mark.timeout(40)
    def test_processes_on_redis_rejecting_one_token_make_one_fetch(
        self, redis_server: RedisServer, tmp_path: Path
    ) -> None:
        """8 processes x 2 threads through a real Redis see one token refused: one new fetch."""
        count = tmp_path / "fetches"
        RedisStore(redis_server.client()).write(
            "k", Record(Grant("refused", expires_at=FOREVER), 1, START)
        )
        spec = {"store": "redis", "path": str(redis_server.socket), "key": "k", "mode": "storm"}
        results = run_storm(
            {**spec, "threads": 2, "count": str(count), "refused": "refused"}, processes=8
        )
        assert len(count.read_text().splitlines()) == 1
        assert len(results) == 16
        assert len(set(results)) == 1
        assert "refused" not in results

    def test_another_process_that_saw_the_old_token_refused_takes_the_new_one(
        self, make_store: Callable[[], Store]
    ) -> None:
        """A sibling that rejects a token already replaced fetches nothing and gets the new one."""
        fetch = Counting()
        first, second = (SharedToken(fetch, make_store(), "k") for _ in range(2))
        assert first() == "token-1"
        join_fetch_threads()
        assert second() == "token-1"  # from the store, now in its own cache
        assert first.reject("token-1")
        assert first() == "token-2"
        join_fetch_threads()
        assert second() == "token-1"  # its cache: it has not been refused there yet
        assert not second.reject("token-1")  # a newer token is stored
        assert second() == "token-2"
        assert fetch.calls == 2

    def test_a_fetch_that_read_the_token_before_its_rejection_does_not_bring_it_back(
        self,
    ) -> None:
        """A flight that read the refused token just before reject() hands it over uncached."""
        gate, paused = threading.Event(), threading.Event()

        class PausingStore(MemoryStore):
            pause_next = True

            def read(self, key: str) -> Record | None:
                record = super().read(key)
                if self.pause_next:
                    self.pause_next = False
                    paused.set()
                    assert gate.wait(10)
                return record

        store = PausingStore()
        store.write("k", Record(Grant("refused", expires_at=FOREVER), 1, START))
        fetch = Counting()
        token = SharedToken(fetch, store, "k")
        late: list[str | None] = []
        caller = ReraisingThread(lambda: late.append(token()))
        caller.start()
        assert paused.wait(10)  # its flight has read the token that is about to be refused
        assert token.reject("refused")
        gate.set()
        caller.join()
        assert late == ["refused"]  # it was on its way before the rejection
        assert token() == "token-1"
        assert fetch.calls == 1

    def test_rejecting_an_unknown_token_does_nothing(self) -> None:
        """A token that is not the current one (a typo, an old one) changes nothing."""
        fetch = Counting()
        token = SharedToken(fetch)
        assert not token.reject("never-issued")  # nothing stored yet
        assert token() == "token-1"
        assert not token.reject("token-0")
        assert token() == "token-1"
        assert fetch.calls == 1


class TestInterval:
    def test_a_token_refused_for_ever_costs_one_fetch_per_interval(
        self, make_store: Callable[[], Store], caplog: pytest.LogCaptureFixture
    ) -> None:
        """A server refusing every token: one forced fetch per reject_interval, with a WARNING."""
        fetch = Counting()
        token = SharedToken(fetch, make_store(), "k", reject_interval=30)
        forced = []
        for _ in range(20):  # twenty requests, each answered 401
            got = token()
            assert got is not None
            join_fetch_threads()  # the request's round trip: the token is stored by now
            forced.append(token.reject(got))
        assert forced == [True] + [False] * 19
        assert fetch.calls == 2
        assert caplog.text.count("a server refused the token") == 1
        assert "token-" not in caplog.text
        end_redis_reject_interval(make_store(), "k")
        MonotonicOffset.seconds += 31
        got = token()
        assert got == "token-2"
        join_fetch_threads()
        assert token.reject(got)
        assert token() == "token-3"
        assert fetch.calls == 3
        assert caplog.text.count("a server refused the token") == 2

    def test_the_interval_is_shared_by_every_process(self, make_store: Callable[[], Store]) -> None:
        """After one process forced a fetch, another's rejection waits for the interval too."""
        fetch = Counting()
        first, second = (SharedToken(fetch, make_store(), "k") for _ in range(2))
        assert first() == "token-1"
        join_fetch_threads()
        assert first.reject("token-1")
        assert first() == "token-2"
        join_fetch_threads()
        assert second() == "token-2"
        assert not second.reject("token-2")  # within the interval of first's forced fetch
        assert second() == "token-2"
        assert fetch.calls == 2

    @pytest.mark.parametrize(
        ("interval", "error"), [(0.5, ValueError), (-1, ValueError), ("30", TypeError)]
    )
    def test_reject_interval_is_at_least_a_second(
        self, interval: Any, error: type[Exception]
    ) -> None:
        """reject_interval below 1 s, negative or not a number is refused."""
        with pytest.raises(error, match="reject_interval"):
            SharedToken(Fetcher(), reject_interval=interval)


class TestRotation:
    def test_a_rotating_grant_keeps_its_refresh_token_through_a_rejection(
        self, make_store: Callable[[], Store]
    ) -> None:
        """The fetch after a rejection spends the refused grant's refresh token, once."""
        endpoint = RotatingEndpoint()
        token = SharedToken(endpoint.refresh, make_store(), "grant", rotating=True)
        other = SharedToken(endpoint.refresh, make_store(), "grant", rotating=True)
        assert token() == "A1"
        join_fetch_threads()
        assert token.reject("A1")
        assert other() == "A2"  # another process fetches, from the refused grant's R1
        join_fetch_threads()
        assert token() == "A2"
        assert endpoint.presented == ["R0", "R1"]
        record = make_store().read("grant")
        assert record is not None
        assert record.grant is not None
        assert (record.grant, record.refused) == (Grant("A2", "R2", record.grant.expires_at), False)


class TestStores:
    def test_reject_marks_only_the_version_it_read(self, make_store: Callable[[], Store]) -> None:
        """Store.reject is a compare-and-set on the version; a marked record is not marked again."""
        store = make_store()
        assert not store.reject("k", 0, interval=30)  # no record
        assert store.write("k", Record(Grant("t"), 1, 1.0))
        assert not store.reject("k", 2, interval=30)
        assert store.reject("k", 1, interval=30)
        assert store.read("k") == Record(Grant("t"), 1, 1.0, refused=True)
        assert not store.reject("k", 1, interval=0.001)  # marked already
        assert store.write("k", Record(Grant("u"), 2, 2.0))
        assert store.read("k") == Record(Grant("u"), 2, 2.0)  # a new token is not refused
        assert not store.reject("k", 2, interval=30)  # within the first mark's interval

    def test_a_file_stores_unreadable_mark_counts_as_none(self, tmp_path: Path) -> None:
        """A broken .reject file does not block a rejection for ever."""
        from token_refresh._stores import hashed

        store = FileStore(tmp_path)
        store.write("k", Record(Grant("t"), 1, 1.0))
        (tmp_path / f"{hashed('k')}.reject").write_text("{")
        assert store.reject("k", 1, interval=30)

    def test_a_refused_flag_that_is_not_a_bool_is_unreadable(self, tmp_path: Path) -> None:
        """A record whose refused field is not true or false reads as none."""
        from token_refresh._stores import hashed

        (tmp_path / f"{hashed('k')}.json").write_text(
            '{"version": 1, "fetched_at": 0, "refused": "yes", "grant": ["t", null, null]}'
        )
        assert FileStore(tmp_path).read("k") is None
        with pytest.raises(TypeError, match="refused"):
            Record(None, refused="yes")  # type: ignore[arg-type]


class TestSessions:
    def test_per_session_rejects_the_current_sessions_token(self) -> None:
        """With per_session=True, reject() drops the calling session's token only."""
        fetch = Counting()
        token = SharedToken(fetch, per_session=True)
        with session_context("alice"):
            alice = token()
        with session_context("bob"):
            bob = token()
        with session_context("alice"):
            assert alice is not None
            assert token.reject(alice)
            assert token() == "token-3"
        with session_context("bob"):
            assert token() == bob


def end_redis_reject_interval(store: Store, key: str) -> None:
    """Redis counts reject_interval on its own clock, which the test cannot move: end it there."""
    if isinstance(store, RedisStore):
        store._client.delete(store._name(key, ":reject"))


@pytest.mark.timeout(30)
def test_a_redis_rejection_interval_is_a_key_redis_expires(redis_server: RedisServer) -> None:
    """RedisStore keeps the last forced fetch as a key with a PX expiry of reject_interval."""
    client = redis_server.client()
    store = RedisStore(client)
    token = SharedToken(Counting(), store, "k", reject_interval=45)
    assert token() == "token-1"
    wait_for_version(store, "k", 1)
    assert token.reject("token-1")
    assert 44_000 < client.pttl(store._name("k", ":reject")) <= 45_000


def test_no_token_in_the_warning(caplog: pytest.LogCaptureFixture) -> None:
    """The WARNING names the key, never the refused token."""
    caplog.set_level(logging.DEBUG, logger="token_refresh")
    token = SharedToken(Fetcher(), key="api")
    assert token() == SECRET
    assert token.reject(SECRET)
    assert "[shared:api] a server refused the token" in caplog.text
    assert SECRET not in caplog.text
    with time_machine.travel(START):
        assert time.time() >= START
