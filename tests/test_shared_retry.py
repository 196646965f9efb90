"""SharedToken on a RetryPolicy: the last good token through an outage, one request per step."""

from __future__ import annotations

import functools
import logging
import math
import time
from pathlib import Path

import pytest
import time_machine
from test_shared import Fetcher, movable_monotonic, shift

from token_refresh import RetryPolicy, Scheduler, events, shared
from token_refresh._context import session_context
from token_refresh.oauth import OAuthError
from token_refresh.shared import (
    FileStore,
    Grant,
    MemoryStore,
    NoFreshToken,
    RateLimited,
    SharedToken,
    StoreUnavailable,
)
from token_refresh.testing import ManualClock

from conftest import START, ReraisingThread, make_jwt

pytestmark = pytest.mark.realclock  # a SharedToken fetches on a thread of its own

__all__ = ["movable_monotonic"]  # the autouse fixture that moves the stores' monotonic clock

POLICY = RetryPolicy(first_delay=10, cap=300, jitter=0)
JWT = make_jwt({"exp": START + 400})  # due for a refresh (min_ttl 300) at START + 100
DOWN = OAuthError("token endpoint unreachable")


class TestLastGoodToken:
    def test_served_through_an_outage_until_it_expires(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A failing fetch returns the stored token while it lives, then the failure."""
        with time_machine.travel(START, tick=False) as traveller:
            fetch = Fetcher(JWT, DOWN, DOWN, "fresh")
            token = SharedToken(fetch, key="api", min_ttl=300, retry_policy=POLICY)
            assert token() == JWT
            shift(traveller, 100)
            with caplog.at_level(logging.WARNING, "token_refresh.shared"):
                assert token() == JWT  # the fetch failed: the last good token
                assert token() == JWT  # held back: no request
            assert fetch.calls == 2
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1  # once per token, not per call
            assert "serving the last good one" in warnings[0]
            assert JWT not in warnings[0]
            shift(traveller, 10)
            assert token() == JWT
            assert fetch.calls == 3
            shift(traveller, 300)  # expired, and the endpoint answers again
            assert token() == "fresh"

    def test_an_expired_token_is_not_served(self) -> None:
        """Past its exp the last token is no use: the call gets the failure."""
        with time_machine.travel(START, tick=False) as traveller:
            fetch = Fetcher(JWT, DOWN)
            token = SharedToken(fetch, min_ttl=300, retry_policy=POLICY)
            token()
            shift(traveller, 401)
            with pytest.raises(OAuthError):
                token()

    def test_none_from_fetch_is_covered_too(self) -> None:
        """A fetch that returns None also gets the last good token back."""
        with time_machine.travel(START, tick=False) as traveller:
            token = SharedToken(Fetcher(JWT, None), min_ttl=300, retry_policy=POLICY)
            token()
            shift(traveller, 100)
            assert token() == JWT

    def test_without_the_policy_the_failure_comes_through(self) -> None:
        """The default: a failed fetch raises, whatever token was stored."""
        with time_machine.travel(START, tick=False) as traveller:
            token = SharedToken(Fetcher(JWT, DOWN), min_ttl=300)
            token()
            shift(traveller, 100)
            with pytest.raises(OAuthError):
                token()

    def test_an_opaque_token_of_unknown_lifetime_is_not_served(self) -> None:
        """A token with no exp and no expires_at may have expired: not served."""
        with time_machine.travel(START, tick=False) as traveller:
            token = SharedToken(Fetcher("opaque", DOWN), max_age=5, retry_policy=POLICY)
            assert token() == "opaque"
            shift(traveller, 6)
            with pytest.raises(OAuthError):
                token()

    def test_a_grants_expires_at_is_its_lifetime(self) -> None:
        """An opaque Grant with expires_at is served until then."""
        with time_machine.travel(START, tick=False) as traveller:
            grant = Grant("opaque", expires_at=START + 400)
            token = SharedToken(Fetcher(grant, DOWN), min_ttl=300, retry_policy=POLICY)
            token()
            shift(traveller, 150)
            assert token() == "opaque"

    def test_a_refused_token_is_not_served(self) -> None:
        """A token a server refused (reject) is never the fallback."""
        with time_machine.travel(START, tick=False):
            token = SharedToken(Fetcher(JWT, DOWN), min_ttl=300, retry_policy=POLICY)
            token()
            assert token.reject(JWT)
            with pytest.raises(OAuthError):
                token()

    def test_a_schedulers_refresh_gets_the_failure(self) -> None:
        """The Scheduler wants a new token: it sees the failure and backs off on its policy."""
        seen: list[events.Event] = []
        with time_machine.travel(START, tick=False) as traveller:
            token = SharedToken(Fetcher(JWT, DOWN), min_ttl=300, retry_policy=POLICY)
            token()
            shift(traveller, 100)
            clock = ManualClock(start=time.time())
            delivered: list[str] = []
            with Scheduler(
                token,
                lambda session_id, new: delivered.append(new),
                clock=clock,
                on_event=seen.append,
                retry_policy=POLICY,
            ) as sched:
                sched.schedule_from_expires_in("s", 1)
                clock.advance(30)
            assert delivered == []
            failed = [event for event in seen if isinstance(event, events.RefreshFailed)]
            assert [event.error_type for event in failed] == ["OAuthError"]
            assert token() == JWT  # any other caller still gets the last good token

    def test_per_session_outside_a_session_still_raises(self) -> None:
        """per_session=True called outside a session: the LookupError, no fallback."""
        with time_machine.travel(START, tick=False):
            token = SharedToken(Fetcher(JWT), per_session=True, retry_policy=POLICY)
            with session_context("s1"):
                assert token() == JWT
            with pytest.raises(LookupError):
                token()

    def test_a_reader_serves_until_expiry(self, tmp_path: Path) -> None:
        """SharedToken(None, store) on the policy returns a stored token within min_ttl."""
        with time_machine.travel(START, tick=False) as traveller:
            store = FileStore(tmp_path)
            SharedToken(Fetcher(JWT), store, min_ttl=300)()
            shared._finish_writes()  # the token reaches the store after the call returns
            shift(traveller, 200)
            with pytest.raises(NoFreshToken):
                SharedToken(None, store, min_ttl=300)()
            assert SharedToken(None, store, min_ttl=300, retry_policy=POLICY)() == JWT

    def test_a_failing_store_gives_the_failure(self) -> None:
        """When the store fails too, nothing can be served: the call raises."""

        class Broken(MemoryStore):
            def read(self, key: str) -> None:
                raise StoreUnavailable(f"store down for key {key!r}")

        reader = SharedToken(None, Broken(), retry_policy=POLICY)
        with pytest.raises(StoreUnavailable):
            reader()

    def test_retry_policy_must_be_a_policy(self) -> None:
        """retry_policy takes a RetryPolicy or None."""
        with pytest.raises(TypeError, match="retry_policy must be a RetryPolicy"):
            SharedToken(Fetcher(), retry_policy=300)  # type: ignore[arg-type]


def call(token: SharedToken, results: list[str | None]) -> None:
    results.append(token())


class TestSharedBackoff:
    def test_a_first_failure_holds_the_key_back(self) -> None:
        """With nothing stored, a failed fetch holds back first_delay: no request meanwhile."""
        with time_machine.travel(START, tick=False) as traveller:
            fetch = Fetcher(DOWN, "t")
            token = SharedToken(fetch, retry_policy=POLICY)
            with pytest.raises(OAuthError):
                token()
            shift(traveller, 9.9)
            with pytest.raises(RateLimited):
                token()
            assert fetch.calls == 1
            shift(traveller, 0.2)
            assert token() == "t"

    def test_an_interrupt_is_no_outage(self) -> None:
        """A fetch interrupted (a BaseException) holds nothing back: the next call fetches."""

        class Interrupted(BaseException):
            pass

        with time_machine.travel(START, tick=False):
            fetch = Fetcher(Interrupted(), "t")
            token = SharedToken(fetch, max_age=None, retry_policy=POLICY)  # no failure sharing
            with pytest.raises(Interrupted):
                token()
            assert token() == "t"
            assert fetch.calls == 2

    def test_processes_on_one_filestore_make_one_request_per_step(self, tmp_path: Path) -> None:
        """Eight SharedTokens (processes) on one FileStore: one request per growing step."""
        with time_machine.travel(START, tick=False) as traveller:
            fetch = Fetcher(JWT)
            fetch.default = DOWN
            workers = [
                SharedToken(fetch, FileStore(tmp_path), min_ttl=300, retry_policy=POLICY)
                for _ in range(8)
            ]
            assert workers[0]() == JWT
            shift(traveller, 100)  # due for a refresh, and the token endpoint is down
            holds: list[float] = []
            for _ in range(5):
                calls = fetch.calls
                results: list[str | None] = []
                threads = [ReraisingThread(functools.partial(call, w, results)) for w in workers]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                assert results == [JWT] * 8  # everyone keeps the last good token
                assert fetch.calls == calls + 1  # one request for all eight
                record = FileStore(tmp_path).read("default")
                assert record is not None
                holds.append(math.ceil(record.blocked_until - time.time()))  # ms have passed
                shift(traveller, holds[-1] - 1)
                assert [w() for w in workers] == [JWT] * 8
                assert fetch.calls == calls + 1  # nobody asks during the hold
                shift(traveller, 1)
            assert holds == [10, 10, 20, 40, 80]

    def test_a_store_that_cannot_hold_back_holds_this_process(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """hold_back failing is logged; this process still waits out the step."""

        class NoHolds(MemoryStore):
            def hold_back(self, key: str, *, seconds: float) -> None:
                raise StoreUnavailable(f"read-only store for key {key!r}")

        with time_machine.travel(START, tick=False):
            fetch = Fetcher(DOWN)
            token = SharedToken(fetch, NoHolds(), retry_policy=POLICY)
            with (
                caplog.at_level(logging.WARNING, "token_refresh.shared"),
                pytest.raises(OAuthError),
            ):
                token()
            with pytest.raises(RateLimited):
                token()
            assert fetch.calls == 1
        assert any("held back in this process only" in m for m in caplog.messages)
