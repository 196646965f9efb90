"""SharedToken in an operator's bad week: stores that restart, fill up, freeze or lie (issue 17).

Each test is one row of the attack: the store is real (a redis-server of the
test's own, a real directory), and a token endpoint that rotates refresh
tokens records each one presented, so a token spent twice shows.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import logging
import os
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
    join_fetch_threads,
    kill,
    make_store,
    movable_monotonic,
    shift,
    spawn,
    wait_for_version,
)

from token_refresh import _stores, shared
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

from conftest import START, RedisServer, ReraisingThread

pytestmark = pytest.mark.realclock

__all__ = ["make_store", "movable_monotonic"]  # fixtures shared with test_shared.py

HOUR = 3600.0


class RotatingEndpoint:
    """A token endpoint that rotates refresh tokens and records every one presented to it."""

    def __init__(self) -> None:
        self.valid = "R0"
        self.issued = 0
        self.presented: list[str] = []
        self.lock = threading.Lock()

    def refresh(self, previous: Grant | None) -> Grant:
        refresh_token = "R0" if previous is None else previous.refresh_token
        assert refresh_token is not None
        with self.lock:
            self.presented.append(refresh_token)
            if refresh_token != self.valid:
                raise InvalidGrant("invalid_grant")
            self.issued += 1
            self.valid = f"R{self.issued}"
            return Grant(f"A{self.issued}", self.valid, expires_at=time.time() + HOUR)

    def spent_twice(self) -> list[str]:
        return sorted({token for token in self.presented if self.presented.count(token) > 1})


def worker(endpoint: RotatingEndpoint, store: Store) -> SharedToken:
    """One worker process's SharedToken: its own cache, the shared store."""
    return SharedToken(endpoint.refresh, store, "grant", rotating=True, invalid_grant_wait=0.05)


def next_round(traveller: time_machine.Traveller) -> None:
    """Move past the last grant's expiry, so that the next call fetches."""
    shift(traveller, HOUR)


class FlakyStore:
    """A store whose next write raises StoreUnavailable once ``fail_next_write()`` is called."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.failing = False

    def fail_next_write(self) -> None:
        self.failing = True

    def read(self, key: str) -> Record | None:
        return self.inner.read(key)

    def try_lease(self, key: str, ttl: float) -> _stores.Lease | None:
        return self.inner.try_lease(key, ttl)

    def write(self, key: str, record: Record, *, expect: int | None = None) -> bool:
        if self.failing:
            self.failing = False
            raise StoreUnavailable(f"disk full for key {key!r}")
        return self.inner.write(key, record, expect=expect)

    def hold_back(self, key: str, *, seconds: float) -> None:
        self.inner.hold_back(key, seconds=seconds)

    def reject(self, key: str, version: int, *, interval: float) -> bool:
        return self.inner.reject(key, version, interval=interval)


# -- writes that converge ----------------------------------------------------------------


class TestConvergence:
    @pytest.mark.parametrize("loss", ["restart", "flushall"])
    def test_redis_that_forgets_takes_the_next_write_and_no_refresh_token_is_spent_twice(
        self, redis_server: RedisServer, loss: str
    ) -> None:
        """After a Redis restart or FLUSHALL the store holds a record again and workers agree."""
        endpoint = RotatingEndpoint()
        a = worker(endpoint, RedisStore(redis_server.client()))
        b = worker(endpoint, RedisStore(redis_server.client()))
        with time_machine.travel(START, tick=False) as traveller:
            assert a() == "A1"
            join_fetch_threads()
            next_round(traveller)
            assert b() == "A2"  # b holds the newest grant, the store has it too
            join_fetch_threads()
            if loss == "restart":
                redis_server.stop()
                redis_server.start()  # no persistence: empty
            else:
                redis_server.client().flushall()
            next_round(traveller)
            assert b() == "A3"  # spends R2, its own cached grant, and stores the result
            join_fetch_threads()
            record = RedisStore(redis_server.client()).read("grant")
            assert record is not None
            assert record.grant is not None
            assert record.grant.refresh_token == "R3"
            next_round(traveller)
            assert a() == "A4"  # a's cache is older than the store's new record
            join_fetch_threads()
            next_round(traveller)
            assert b() == "A5"
        assert endpoint.presented == ["R0", "R1", "R2", "R3", "R4"]

    def test_a_deleted_record_file_is_written_again_and_workers_share_one_fetch(
        self, tmp_path: Path
    ) -> None:
        """Four workers fetch once per round, before and after the record file is deleted."""
        fetches = Fetcher()
        workers = [
            SharedToken(fetches, FileStore(tmp_path), "k", max_age=1.0, min_ttl=0) for _ in range(4)
        ]
        with time_machine.travel(START, tick=False) as traveller:
            for round_ in range(4):
                if round_ == 2:
                    (tmp_path / f"{hashed('k')}.json").unlink()  # a tmp cleaner, an operator
                before = fetches.calls
                for each in workers:
                    assert each() == SECRET
                    join_fetch_threads()
                assert fetches.calls - before == 1, round_
                shift(traveller, 2)

    def test_a_store_that_went_back_in_time_takes_the_next_write(self, tmp_path: Path) -> None:
        """A store restored to an older record (a lagging replica) converges at the next write."""
        endpoint = RotatingEndpoint()
        a, b = (worker(endpoint, FileStore(tmp_path)) for _ in range(2))
        path = tmp_path / f"{hashed('grant')}.json"
        with time_machine.travel(START, tick=False) as traveller:
            assert a() == "A1"
            join_fetch_threads()
            old = path.read_bytes()  # version 1, refresh token R1
            for caller, expected in ((b, "A2"), (a, "A3")):
                next_round(traveller)
                assert caller() == expected
                join_fetch_threads()
            path.write_bytes(old)  # the store is back at version 1
            next_round(traveller)
            assert a() == "A4"  # a knows version 3 and its refresh token R3
            join_fetch_threads()
            next_round(traveller)
            assert b() == "A5"
            join_fetch_threads()
        assert endpoint.spent_twice() == []
        record = FileStore(tmp_path).read("grant")
        assert record is not None
        assert record.version == 5

    def test_a_failed_write_is_followed_by_one_that_lands(
        self, make_store: Callable[[], Store], caplog: pytest.LogCaptureFixture
    ) -> None:
        """One write fails (a full disk): the next fetch stores again and every worker agrees."""
        endpoint = RotatingEndpoint()
        flaky = FlakyStore(make_store())
        a, b = worker(endpoint, flaky), worker(endpoint, make_store())
        with time_machine.travel(START, tick=False) as traveller:
            assert a() == "A1"
            join_fetch_threads()
            flaky.fail_next_write()
            next_round(traveller)
            assert a() == "A2"  # delivered, not stored
            join_fetch_threads()
            assert "the token serves this process only" in caplog.text
            next_round(traveller)
            assert a() == "A3"  # spends R2, which only a knows, and stores the result
            join_fetch_threads()
            next_round(traveller)
            assert b() == "A4"
            join_fetch_threads()
        assert endpoint.presented == ["R0", "R1", "R2", "R3"]
        record = make_store().read("grant")
        assert record is not None
        assert (record.version, record.grant) == (4, Grant("A4", "R4", START + 4 * HOUR))


# -- deliver first, then store -------------------------------------------------------------


@pytest.mark.timeout(30)
class TestDeliverFirst:
    def test_a_frozen_redis_does_not_hold_back_a_fetched_token(
        self, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Redis frozen right after the fetch: the caller has its token at once, the write fails."""
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        store = RedisStore(redis_server.client(socket_timeout=2, retry=Retry(NoBackoff(), 0)))

        def fetch() -> str:
            redis_server.freeze()
            return SECRET

        token = SharedToken(fetch, store, "svc", fetch_timeout=10)
        try:
            began = time.monotonic()
            assert token() == SECRET
            assert time.monotonic() - began < 1.5  # not the socket_timeout of the write
            join_fetch_threads()
        finally:
            redis_server.thaw()
        assert "the token serves this process only" in caplog.text

    def test_a_writer_stopped_holding_the_write_lock_delays_no_token(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A process stopped while it holds .write.lock: tokens are delivered, writes give up."""
        store = FileStore(tmp_path, lock_timeout=0.2)
        fetches = Fetcher()
        with open(tmp_path / ".write.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the stopped writer's lock
            for round_ in range(3):
                began = time.monotonic()
                assert SharedToken(fetches, store, f"k{round_}")() == SECRET
                assert time.monotonic() - began < 1
            join_fetch_threads()
        assert fetches.calls == 3
        assert caplog.text.count("held the write lock past lock_timeout") == 3

    def test_lock_timeout_must_be_a_duration(self, tmp_path: Path) -> None:
        """FileStore refuses a negative or non-numeric lock_timeout."""
        with pytest.raises(ValueError, match="lock_timeout"):
            FileStore(tmp_path, lock_timeout=-1)
        with pytest.raises(TypeError, match="lock_timeout"):
            FileStore(tmp_path, lock_timeout="5")  # type: ignore[arg-type]

    def test_exit_waits_for_a_delivered_tokens_write(self) -> None:
        """The at-exit hook waits for a write still running after its token was delivered."""
        gate = threading.Event()

        class SlowStore(MemoryStore):
            def write(self, key: str, record: Record, *, expect: int | None = None) -> bool:
                assert gate.wait(10)
                return super().write(key, record, expect=expect)

        store = SlowStore()
        assert SharedToken(Fetcher(), store, "k")() == SECRET
        finisher = ReraisingThread(shared._finish_writes)
        finisher.start()
        assert not threading.Event().wait(0.1)  # real time passes; the write still waits
        assert finisher.is_alive()
        gate.set()
        finisher.join()
        assert store.read("k") is not None

    def test_a_write_blocked_at_exit_is_waited_for(self, tmp_path: Path) -> None:
        """A process that exits right after its call still stores the token it fetched."""
        import subprocess
        import sys

        script = (
            "import time\n"
            "from token_refresh.shared import FileStore, SharedToken\n"
            "class Slow(FileStore):\n"
            "    def write(self, key, record, *, expect=None):\n"
            "        time.sleep(0.3)\n"
            "        return super().write(key, record, expect=expect)\n"
            f"print(SharedToken(lambda: 'stored-at-exit', Slow({str(tmp_path)!r}), 'k')())\n"
        )
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert done.stdout == "stored-at-exit\n", done.stderr
        record = FileStore(tmp_path).read("k")
        assert record is not None
        assert record.grant == Grant("stored-at-exit")


# -- records are validated -------------------------------------------------------------------


class TestMalformedRecords:
    @pytest.mark.parametrize("expires_at", ["3600", "2026-12-06T15:00:00Z", [1], True])
    def test_a_malformed_record_is_replaced_by_the_next_fetch(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture, expires_at: object
    ) -> None:
        """A record whose expires_at is no number is unreadable: logged once, then replaced."""
        record = {"version": 3, "fetched_at": START, "grant": ["bad", None, expires_at]}
        (tmp_path / f"{hashed('k')}.json").write_text(json.dumps(record))
        fetches = Fetcher()
        for _ in range(2):
            assert SharedToken(fetches, FileStore(tmp_path), "k", max_age=None)() == SECRET
            join_fetch_threads()
        assert fetches.calls == 2
        assert caplog.text.count("the stored record is unreadable") == 1
        stored = FileStore(tmp_path).read("k")
        assert stored is not None
        assert stored.grant == Grant(SECRET)

    @pytest.mark.parametrize(
        "text",
        [
            b"[1, 2]",
            b"\xff\xfe",
            b'{"version": true, "fetched_at": 0, "grant": null}',
            b'{"version": 1, "fetched_at": "0", "grant": null}',
            b'{"version": 1, "fetched_at": 0, "grant": ["a", "b"]}',
            b'{"version": -1, "fetched_at": 0, "grant": null}',
            b'{"version": 1, "fetched_at": 1e999, "grant": null}',
        ],
    )
    def test_any_malformed_file_reads_as_no_record(self, tmp_path: Path, text: bytes) -> None:
        """Whatever a record file holds, a read gives a Record or None, never an exception."""
        (tmp_path / f"{hashed('k')}.json").write_bytes(text)
        assert FileStore(tmp_path).read("k") is None

    def test_a_malformed_redis_record_keeps_its_version_for_the_next_write(
        self, redis_server: RedisServer
    ) -> None:
        """In Redis the next write compares against the hash's version even if its record is bad."""
        client = redis_server.client()
        store = RedisStore(client)
        client.hset(store._name("k"), mapping={"version": "7", "record": '{"grant": [1]}'})
        assert store.read("k") == Record(None, 7)
        fetches = Fetcher()
        assert SharedToken(fetches, store, "k")() == SECRET
        record = wait_for_version(store, "k", 8)
        assert record.grant == Grant(SECRET)
        client.hset(store._name("j"), mapping={"version": "x", "record": "{"})
        assert store.read("j") is None
        client.hset(store._name("i"), "record", "{")  # and no version at all
        assert store.read("i") is None

    def test_many_unreadable_records_are_each_logged_once(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The memory of what was logged is bounded; a record broken anew is logged anew."""
        monkeypatch.setattr(_stores, "_reported", {("x", str(n)) for n in range(1025)})
        path = tmp_path / f"{hashed('k')}.json"
        store = FileStore(tmp_path)
        for text in ("{", "{", "[", "{"):
            path.write_text(text)
            assert store.read("k") is None
        assert caplog.text.count("the stored record is unreadable") == 2
        assert len(_stores._reported) == 2

    def test_grants_and_records_are_checked_where_they_are_built(self) -> None:
        """Grant and Record refuse fields of the wrong type with the field's name."""
        with pytest.raises(TypeError, match=r"Grant\.expires_at"):
            Grant("t", expires_at="3600")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"Grant\.expires_at"):
            Grant("t", expires_at=float("nan"))
        bad: list[tuple[dict[str, Any], type[Exception], str]] = [
            ({"grant": "t"}, TypeError, "Record.grant"),
            ({"grant": None, "version": 1.0}, TypeError, "Record.version"),
            ({"grant": None, "version": -1}, ValueError, "Record.version"),
            ({"grant": None, "fetched_at": "0"}, TypeError, "Record.fetched_at"),
            ({"grant": None, "blocked_until": float("inf")}, ValueError, "Record.blocked_until"),
            ({"grant": None, "writer": 1}, TypeError, "Record.writer"),
        ]
        for fields, error, name in bad:
            with pytest.raises(error, match=name):
                Record(**fields)


# -- hashed keys ---------------------------------------------------------------------------


class TestHashedKeys:
    SESSION = "sk-ant-si-" + "S" * 290  # a 300-character credential-like session id

    def test_a_long_credential_like_session_id_works_and_never_reaches_a_file_name(
        self, tmp_path: Path
    ) -> None:
        """per_session with a 300-character session id: one short file name, no credential text."""
        from token_refresh._context import session_context

        token = SharedToken(Fetcher(), FileStore(tmp_path), "k", per_session=True)
        with session_context(self.SESSION):
            assert token() == SECRET
        join_fetch_threads()
        names = sorted(path.name for path in tmp_path.iterdir())
        assert all(len(name) <= 40 and "sk-ant" not in name for name in names), names
        stored = json.loads((tmp_path / f"{hashed('k/' + self.SESSION)}.json").read_text())
        assert stored["key"].startswith("k/sha256:")
        assert "SSSS" not in json.dumps({k: v for k, v in stored.items() if k != "grant"})

    def test_redis_keys_hold_no_credential_like_text(self, redis_server: RedisServer) -> None:
        """Redis keys are hashed too; the record names its key, the session fingerprinted."""
        from token_refresh._context import session_context

        client = redis_server.client(decode_responses=True)
        token = SharedToken(Fetcher(), RedisStore(client), "k", per_session=True)
        with session_context(self.SESSION):
            assert token() == SECRET
        join_fetch_threads()
        keys = client.keys("*")
        assert keys
        assert all("sk-ant" not in key and len(key) < 64 for key in keys), keys
        (record_key,) = [key for key in keys if not key.endswith(":lease")]
        assert json.loads(client.hget(record_key, "record"))["key"].startswith("k/sha256:")

    def test_a_record_from_0_2_is_migrated_once(self, tmp_path: Path) -> None:
        """A 0.2 file named after its key is read once, its refresh token spent, then removed."""
        old = {"version": 9, "fetched_at": START, "blocked_until": 0, "grant": ["A0", "R0", 0]}
        legacy = tmp_path / "a%2Fb.json"
        legacy.write_text(json.dumps(old))
        store = FileStore(tmp_path)
        assert store.read("a/b") == Record(Grant("A0", "R0", 0), 0, START)
        endpoint = RotatingEndpoint()
        assert SharedToken(endpoint.refresh, store, "a/b", rotating=True)() == "A1"
        wait_for_version(store, "a/b", 1)
        assert not legacy.exists()
        assert endpoint.presented == ["R0"]
        (tmp_path / "k.json").write_text("{")
        assert store.read("k") is None  # an unreadable 0.2 record is none
        assert store.read("x" * 300) is None  # a name 0.2 could not have written

    def test_a_redis_record_from_0_2_is_migrated_once(self, redis_server: RedisServer) -> None:
        """A 0.2 hash named after its key is read once, its refresh token spent, then deleted."""
        client = redis_server.client()
        old = {"version": 9, "fetched_at": START, "blocked_until": 0, "grant": ["A0", "R0", 0]}
        client.hset("token_refresh:{a/b}", mapping={"version": 9, "record": json.dumps(old)})
        store = RedisStore(client)
        assert store.read("a/b") == Record(Grant("A0", "R0", 0), 0, START)
        endpoint = RotatingEndpoint()
        assert SharedToken(endpoint.refresh, store, "a/b", rotating=True)() == "A1"
        wait_for_version(store, "a/b", 1)
        # The write deletes the 0.2 hash just after it stores the new record (and
        # after the token reached its caller): let that write end.
        for thread in threading.enumerate():
            if thread.name == "token-refresh-shared":
                thread.join(10)
        assert not client.exists("token_refresh:{a/b}")
        assert endpoint.presented == ["R0"]
        client.hset("token_refresh:{k}", "version", 1)
        assert store.read("k") is None  # a 0.2 hash without a record is none


# -- one rule for leases -----------------------------------------------------------------------


@pytest.mark.timeout(20)
class TestLeases:
    @pytest.mark.parametrize("shared_store", [True, False])
    def test_a_rotating_refresh_token_is_spent_once_past_lease_ttl_in_one_process(
        self, shared_store: bool
    ) -> None:
        """store=None or a shared MemoryStore: a fetch slower than lease_ttl is not doubled."""
        endpoint = RotatingEndpoint()
        gate = threading.Event()

        def refresh(previous: Grant | None) -> Grant:
            assert gate.wait(10)
            return endpoint.refresh(previous)

        options: dict[str, Any] = {"rotating": True, "lease_ttl": 0.05, "fetch_timeout": 0.2}
        store = MemoryStore() if shared_store else None
        first = SharedToken(refresh, store, "k", **options)
        second = SharedToken(refresh, store, "k", **options) if shared_store else first
        with pytest.raises(FetchTimeout):
            first()  # its fetch still runs, under the lease
        with pytest.raises(FetchTimeout):
            second()  # four lease_ttls (real time): a new fetch waits for the live holder
        gate.set()
        join_fetch_threads()
        assert second() == "A1"
        assert endpoint.presented == ["R0"]

    @pytest.mark.timeout(30)
    def test_a_fork_while_the_lease_is_taken_leaves_the_child_without_it(
        self, tmp_path: Path
    ) -> None:
        """A fork between open() and flock() of the lease: the holder's death still frees it."""
        directory = tmp_path / "tokens"
        spec = {"store": "file", "path": str(directory), "key": "k", "mode": "fork-in-flock"}
        holder = spawn({**spec, "count": str(tmp_path / "fetches")})
        child = 0
        try:
            assert holder.stdout is not None
            lines = sorted(holder.stdout.readline() for _ in range(3))
            assert lines[0] == "child\n", lines
            assert lines[2] == "locked\n", lines
            child = int(lines[1].split()[1])
            assert FileStore(directory).try_lease("k", 30) is None
        finally:
            kill(holder)
        try:
            assert FileStore(directory).try_lease("k", 30) is not None
        finally:
            os.kill(child, 9)


# -- time in the store is the store's -----------------------------------------------------------


class TestStoreTime:
    @pytest.mark.parametrize("skew", [120.0, -120.0])
    def test_a_skewed_hosts_retry_after_holds_back_for_its_own_length(
        self, make_store: Callable[[], Store], skew: float
    ) -> None:
        """A host 120 s off stores a 5 s Retry-After: the others wait 5 s, not 125 s or none."""
        with time_machine.travel(START + skew, tick=False), pytest.raises(RateLimited):
            SharedToken(Fetcher(RateLimited(5)), make_store(), "k")()
        other = Fetcher()
        with time_machine.travel(START, tick=False), pytest.raises(RateLimited) as held:
            SharedToken(other, make_store(), "k")()
        assert held.value.retry_after == pytest.approx(5, abs=1)
        assert other.calls == 0

    def test_a_backward_clock_step_does_not_stretch_a_shared_failure(self) -> None:
        """A failure is shared for max_age of monotonic time, whatever the wall clock does."""
        fetches = Fetcher(ConnectionError("down"))
        token = SharedToken(fetches, max_age=5)
        with time_machine.travel(START, tick=False) as traveller:
            with pytest.raises(ConnectionError):
                token()
            traveller.shift(-180)  # the wall clock steps back
            MonotonicOffset.seconds += 6
            assert token() == SECRET
        assert fetches.calls == 2

    def test_a_backward_clock_step_does_not_stretch_a_hold_back(self) -> None:
        """A 429's hold-back in this process ends after retry_after, even if the clock stepped."""
        fetches = Fetcher(RateLimited(5))
        token = SharedToken(fetches)
        with time_machine.travel(START, tick=False) as traveller:
            with pytest.raises(RateLimited):
                token()
            traveller.shift(-180)
            MonotonicOffset.seconds += 6
            assert token() == SECRET

    def test_a_record_from_the_future_is_not_young(self) -> None:
        """An opaque token fetched 'in the future' (a host ahead) is not reused as young."""
        store = MemoryStore()
        store.write("k", Record(Grant("ahead"), 1, START + 120))
        with time_machine.travel(START, tick=False):
            assert SharedToken(Fetcher(), store, "k")() == SECRET

    def test_a_redis_hold_back_is_a_key_redis_expires(self, redis_server: RedisServer) -> None:
        """RedisStore keeps a hold-back as its own key with a PX expiry, ended by a write."""
        client = redis_server.client()
        store = RedisStore(client)
        store.hold_back("k", seconds=30)
        assert 29_000 < client.pttl(store._name("k", ":hold")) <= 30_000
        assert store.write("k", Record(Grant("t"), 1, 1.0))
        assert client.pttl(store._name("k", ":hold")) == -2
        client.set(store._name("j", ":hold"), "1")  # without an expiry: not one of ours
        assert store.read("j") is None

    def test_a_write_ends_a_hold_back_whatever_its_blocked_until(
        self, make_store: Callable[[], Store]
    ) -> None:
        """Store.write stores no hold-back of its own: only hold_back() makes one."""
        store = make_store()
        assert store.write("k", Record(Grant("t"), 1, 1.0, blocked_until=time.time() + 60))
        assert store.read("k") == Record(Grant("t"), 1, 1.0)

    def test_a_redis_client_without_a_socket_timeout_is_warned_about(
        self, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        """RedisStore says when its client could wait for ever on a frozen server."""
        RedisStore(redis_server.client())
        assert "socket_timeout" not in caplog.text
        RedisStore(redis_server.client(socket_timeout=None))
        assert "socket_timeout=None" in caplog.text

    def test_a_file_hold_back_from_another_boot_is_over(self, tmp_path: Path) -> None:
        """A FileStore hold-back whose deadline is further away than its length is over."""
        store = FileStore(tmp_path)
        store.write("k", Record(Grant("t"), 1, 1.0))
        path = tmp_path / f"{hashed('k')}.json"
        for hold in ([_stores._monotonic() + 1000, 30], "x", [1, "y"], [1]):
            data = json.loads(path.read_text())
            path.write_text(json.dumps({**data, "hold": hold}))
            record = store.read("k")
            assert record is not None
            assert record.blocked_until == 0


# -- each caller its own exception --------------------------------------------------------------


@pytest.mark.timeout(20)
class TestOwnExceptions:
    def test_callers_sharing_a_failure_get_their_own_exceptions(self) -> None:
        """X and Y share one failed fetch: each gets its own exception, chained to the cause."""
        gate = threading.Event()
        fetches = Fetcher(ValueError("endpoint down"), gate=gate)
        token = SharedToken(fetches)
        caught: dict[str, BaseException] = {}
        ready = threading.Barrier(3)

        def call(name: str) -> None:
            try:
                raise KeyError(f"tenant-{name} private data")
            except KeyError:
                ready.wait(10)
                try:
                    token()
                except ValueError as error:
                    caught[name] = error

        callers = [ReraisingThread(functools.partial(call, name)) for name in "XY"]
        for each in callers:
            each.start()
        ready.wait(10)
        assert fetches.started.wait(10)
        gate.set()
        for each in callers:
            each.join()
        x, y = caught["X"], caught["Y"]
        assert x is not y
        assert str(x) == str(y) == "endpoint down"
        assert x.__cause__ is y.__cause__
        assert isinstance(x.__cause__, ValueError)
        assert "tenant-X" not in repr(y.__context__)
        assert "tenant-Y" not in repr(x.__context__)
        assert fetches.calls == 1

    def test_an_exception_that_cannot_be_copied_is_shared(self) -> None:
        """A class that cannot be made without its __init__ reaches every caller as it is."""

        class Stubborn(Exception):
            def __new__(cls, *args: object) -> Stubborn:
                if not args:
                    raise TypeError("needs a reason")
                return super().__new__(cls, *args)

            def __init__(self) -> None:
                super().__init__()

        error = Stubborn.__new__(Stubborn, "reason")
        error.args = ()
        token = SharedToken(Fetcher(error))
        with pytest.raises(Stubborn) as first:
            token()
        with pytest.raises(Stubborn) as second:
            token()
        assert first.value is second.value is error

    def test_an_observer_interrupted_by_ctrl_c_lets_it_through(self) -> None:
        """A KeyboardInterrupt inside a metrics observer is not swallowed."""

        def observe(kind: str, value: float, attributes: dict[str, str]) -> None:
            raise KeyboardInterrupt

        token = SharedToken(Fetcher())
        token._observers = (observe,)
        with pytest.raises(KeyboardInterrupt):
            token()

    def test_an_observer_that_fails_breaks_no_call(self, caplog: pytest.LogCaptureFixture) -> None:
        """An observer raising an Exception is logged and the call goes on."""

        def observe(kind: str, value: float, attributes: dict[str, str]) -> None:
            raise RuntimeError("backend down")

        token = SharedToken(Fetcher())
        token._observers = (observe,)
        assert token() == SECRET
        assert "metrics observer raised RuntimeError" in caplog.text


# -- Redis ACLs ---------------------------------------------------------------------------------


class TestRedisAcl:
    def _user(self, redis_server: RedisServer, commands: list[str]) -> Any:
        admin = redis_server.client()
        rules = ["on", ">pw", "~token_refresh:*", "-@all", *(f"+{c}" for c in commands)]
        admin.acl_setuser("limited", reset=True)
        admin.execute_command("ACL", "SETUSER", "limited", *rules)
        return redis_server.client(username="limited", password="pw")

    def test_the_documented_commands_are_enough(self, redis_server: RedisServer) -> None:
        """An ACL user with REDIS_COMMANDS on the prefix fetches, stores, leases and holds back."""
        store = RedisStore(self._user(redis_server, list(_stores.REDIS_COMMANDS)))
        assert SharedToken(Fetcher(), store, "k")() == SECRET
        wait_for_version(store, "k", 1)
        store.hold_back("j", seconds=5)
        with pytest.raises(RateLimited):
            SharedToken(Fetcher(), store, "j")()

    def test_a_missing_command_is_a_clear_error(
        self, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Without EVALSHA the write fails with StoreUnavailable naming what the ACL must allow."""
        allowed = [c for c in _stores.REDIS_COMMANDS if c != "evalsha"]
        store = RedisStore(self._user(redis_server, allowed))
        with pytest.raises(StoreUnavailable, match="needs these commands") as raised:
            store.write("k", Record(Grant("t"), 1, 1.0))
        assert "evalsha" in str(raised.value)
        caplog.set_level(logging.WARNING)
        assert SharedToken(Fetcher(), store, "k")() == SECRET  # delivered all the same
        join_fetch_threads()
        assert "needs these commands" in caplog.text


def test_enospc_on_a_file_write_is_store_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk during a FileStore write is a StoreUnavailable naming the key."""

    def full(source: str, target: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), target)

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(StoreUnavailable, match="for key 'k'"):
        FileStore(tmp_path).write("k", Record(Grant("t"), 1, 1.0))
