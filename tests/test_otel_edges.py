"""Edges of token_refresh.otel and the events it reads, from a hostile pass: each failed once.

Read through the real OpenTelemetry SDK's InMemoryMetricReader, with
tests/test_otel.py's helper; ManualClock for time; Event handshakes (no
sleeps) for real threads.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import weakref
from collections.abc import Iterator

import pytest

from token_refresh import Scheduler, events
from token_refresh.shared import RateLimited, SharedToken
from token_refresh.testing import ManualClock

from conftest import START, Recorder, ReraisingThread, make_jwt

try:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from token_refresh import otel
except ImportError as error:  # pragma: no cover - the test extra installs it
    if os.environ.get("CI") == "true":
        raise
    pytest.skip(f"opentelemetry-sdk is not installed ({error})", allow_module_level=True)

from test_otel import LeaseWatchedStore, Metrics


@pytest.fixture
def meter() -> Iterator[Metrics]:
    found = Metrics()
    yield found
    found.close()


def _run(program: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


# -- counts that disagree with what happened ------------------------------------


class TestCounts:
    def test_attempts_start_again_at_1_for_a_refresh_after_a_reschedule(
        self, clock: ManualClock, recorder: Recorder, meter: Metrics
    ) -> None:
        """A user re-schedules a session whose refresh failed once (a new login brought a
        new token). The next refresh succeeds on its first get_access_token call, yet
        Refreshed.attempts says 2 and its RefreshStarted.attempt says 2: the failure count
        the scheduler keeps across schedule() leaks into the new refresh's attempt numbers.
        They should be 1: Refreshed.attempts is documented as "how many get_access_token
        calls it took", and an adapter built on these events counts a phantom retry."""
        recorder.tokens = [ValueError("down"), "fresh"]
        received: list[events.Event] = []
        scheduler = Scheduler(
            recorder.get_access_token,
            recorder.on_refresh,
            clock=clock,
            label="api",
            on_event=received.append,
        )
        otel.instrument(scheduler, meter.provider)
        scheduler.schedule("s1", make_jwt({"exp": START + 900}))  # due at +600
        clock.advance(600)  # attempt 1 fails; its retry would come at +660
        scheduler.schedule("s1", make_jwt({"exp": START + 2000}))  # new token: due at +1700
        clock.advance(1100)
        assert recorder.gets == [600.0, 1700.0]
        assert recorder.deliveries == [(1700.0, "s1", "fresh")]
        started = [e for e in received if isinstance(e, events.RefreshStarted)]
        assert [(e.attempt, e.trigger) for e in started] == [(1, "exp"), (1, "exp")]
        refreshed = [e for e in received if isinstance(e, events.Refreshed)]
        assert [e.attempts for e in refreshed] == [1]

    @pytest.mark.parametrize("how", ["cancel", "reschedule"])
    def test_a_refresh_ended_during_its_retry_wait_is_counted(
        self, clock: ManualClock, recorder: Recorder, meter: Metrics, how: str
    ) -> None:
        """A refresh fails its first attempt, and during the 60 s retry wait the session is
        cancelled (logout) or rescheduled (a new token came). That refresh has ended, and
        its failed get_access_token call is in token_refresh.fetches, but it is never
        counted in token_refresh.refreshes under any outcome: the page promises every
        refresh "is counted once, when it ends". An operator's refreshes-by-outcome (and
        failed/total ratios) silently miss every chain cut short this way; it should count
        once (as stale, say)."""
        recorder.tokens = [ValueError("down")]
        scheduler = Scheduler(recorder.get_access_token, recorder.on_refresh, clock=clock)
        otel.instrument(scheduler, meter.provider)
        scheduler.schedule("s1", make_jwt({"exp": START + 900}))
        clock.advance(600)  # attempt 1 fails
        assert meter.total("token_refresh.fetches", outcome="failed") == 1
        if how == "cancel":
            scheduler.cancel("s1")
            clock.advance(3600)
            expected = 1  # the refresh that was cut short
        else:
            scheduler.schedule("s1", make_jwt({"exp": START + 9000}))
            clock.advance(9000)  # the new refresh (and its follow-ups) deliver
            expected = 1 + len(recorder.deliveries)
        assert recorder.gets[0] == 600.0
        assert meter.total("token_refresh.refreshes") == expected

    @pytest.mark.realclock
    @pytest.mark.timeout(30)
    def test_retries_skipped_for_a_hung_call_are_not_fetches(
        self, meter: Metrics, sub_second_delays: None
    ) -> None:
        """get_access_token hangs past fetch_timeout and stays hung. Its retries are not
        called ("still runs from an earlier attempt; not called again"), yet each is
        counted in token_refresh.fetches as a timed_out get_access_token call lasting
        0 s. The user sees 3 fetches (and three 0 s durations) for one call their token
        server got: token_refresh.fetches should equal the get_access_token calls, 1."""
        release = threading.Event()
        gave_up = threading.Event()
        calls = 0

        def get_access_token() -> str:
            nonlocal calls
            calls += 1
            assert release.wait(20)  # hangs until the test ends
            return "late"

        def on_event(event: events.Event) -> None:
            if isinstance(event, events.GaveUp):
                gave_up.set()

        scheduler = Scheduler(
            get_access_token,
            lambda _s, _t: None,
            label="hung",
            fetch_timeout=0.2,
            retry_delay=0.05,
            on_event=on_event,
        )
        otel.instrument(scheduler, meter.provider)
        try:
            scheduler.schedule("s1", make_jwt({"exp": 1}))  # expired: refresh at once
            assert gave_up.wait(10)
            fetches = meter.total("token_refresh.fetches")
            durations = meter.count("token_refresh.fetch.duration")
        finally:
            release.set()
            scheduler.close(5)
        assert calls == 1
        assert (fetches, durations) == (1, 1)

    def test_a_stale_fetch_has_a_duration(self, clock: ManualClock, meter: Metrics) -> None:
        """A get_access_token call whose result is dropped as stale (the session was
        rescheduled while it ran) is counted in token_refresh.fetches but never recorded in
        token_refresh.fetch.duration, whose row on the page reads "as fetches: how long each
        call ran". The durations miss exactly the calls slow enough to be overtaken, and
        the histogram's count no longer matches the fetch counter."""
        scheduler: Scheduler

        def reschedule_meanwhile() -> str:
            scheduler.schedule("s1", make_jwt({"exp": START + 99_999}))
            return "late"

        scheduler = Scheduler(reschedule_meanwhile, lambda _s, _t: None, clock=clock)
        otel.instrument(scheduler, meter.provider)
        scheduler.schedule("s1", make_jwt({"exp": START + 900}))
        clock.advance(600)
        assert meter.total("token_refresh.fetches", outcome="stale") == 1
        assert meter.count("token_refresh.fetch.duration") == meter.total("token_refresh.fetches")


# -- the global MeterProvider ------------------------------------------------------

_PROGRAM_HEAD = """
import base64, json
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from token_refresh import Scheduler
from token_refresh.otel import instrument
from token_refresh.testing import ManualClock

def jwt(payload):
    part = lambda data: base64.urlsafe_b64encode(data).decode().rstrip("=")
    return part(b'{"alg":"none"}') + "." + part(json.dumps(payload).encode()) + ".c2ln"

def totals(reader, name):
    found = {}
    for resource in reader.get_metrics_data().resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    for point in metric.data.data_points:
                        label = point.attributes["token_refresh.label"]
                        found[label] = found.get(label, 0) + point.value
    return found

clock = ManualClock(start=1_800_000_000)
reader = InMemoryMetricReader()
"""


class TestGlobalProvider:
    def test_instrument_before_and_after_set_meter_provider_counts_once(self) -> None:
        """guides/metrics.md shows `instrument(scheduler)` on the global provider, and later,
        for Prometheus, `metrics.set_meter_provider(...)` then `instrument(scheduler)`. A
        user who does both (a library instruments at start-up, the application sets its
        SDK later) gets every refresh counted twice: the first handle records through the
        API's proxy provider, which now forwards to the SDK, and the second records on the
        SDK directly. The page promises "Calling instrument() again ... nothing is counted
        twice"; one refresh should be 1, not 2."""
        out = _run(
            _PROGRAM_HEAD
            + """
scheduler = Scheduler(lambda: "t", lambda s, t: None, clock=clock, label="api")
instrument(scheduler)  # before the application has set its MeterProvider
metrics.set_meter_provider(MeterProvider(metric_readers=[reader], shutdown_on_exit=False))
instrument(scheduler)  # as the page's Prometheus section does
scheduler.schedule("s1", jwt({"exp": 1_800_000_000}))  # expired: one refresh now
print(totals(reader, "token_refresh.refreshes"))
"""
        )
        assert out.strip() == "{'api': 1}"

    def test_a_scheduler_instrumented_after_set_meter_provider_has_its_gauges(self) -> None:
        """One scheduler is instrumented before the application sets its global
        MeterProvider, another after. The second's token_refresh.sessions (and pending,
        running, stuck) never appear: both instrument() calls create the same observable
        instruments on the one SDK, which keeps the first's callbacks and drops the
        second's (with a 'created already' warning). Its sessions gauge should read 1."""
        out = _run(
            _PROGRAM_HEAD
            + """
early = Scheduler(lambda: "t", lambda s, t: None, clock=clock, label="early")
instrument(early)  # the proxy provider: the application has not set its SDK yet
metrics.set_meter_provider(MeterProvider(metric_readers=[reader], shutdown_on_exit=False))
late = Scheduler(lambda: "t", lambda s, t: None, clock=clock, label="late")
instrument(late)
early.schedule("s1", jwt({"exp": 1_800_000_900}))
late.schedule("s1", jwt({"exp": 1_800_000_900}))
print(sorted(totals(reader, "token_refresh.sessions").items()))
"""
        )
        assert out.strip() == "[('early', 1), ('late', 1)]"


# -- memory ------------------------------------------------------------------------


class TestMemory:
    def test_instrument_does_not_keep_a_meter_provider_alive(self, clock: ManualClock) -> None:
        """instrument(scheduler, provider) stores the provider in a module-level dict for
        the life of the process. After the scheduler is closed and gone and the provider
        shut down and dropped, the provider, its readers and all its aggregated points stay
        in memory: a test suite (or a service) that builds a MeterProvider per test, tenant
        or reload grows without bound. The provider should be collectable."""
        provider = MeterProvider(metric_readers=[InMemoryMetricReader()], shutdown_on_exit=False)
        probe = weakref.ref(provider)
        scheduler = Scheduler(lambda: "t", lambda _s, _t: None, clock=clock)
        otel.instrument(scheduler, provider)
        scheduler.schedule("s1", make_jwt({"exp": START}))
        scheduler.close()
        provider.shutdown()
        del scheduler, provider
        gc.collect()
        assert probe() is None


# -- SharedToken -------------------------------------------------------------------


class TestSharedToken:
    @pytest.mark.timeout(30)
    def test_a_lease_wait_that_ends_in_a_rate_limit_is_recorded(self, meter: Metrics) -> None:
        """Two processes share a store (two SharedTokens on one MemoryStore stand for
        them). One holds the lease and its token server answers 429; the other waited on
        that lease, then fails with RateLimited. Its wait is never recorded in
        token_refresh.shared.lease.wait ("how long a fetch waited on another holder's
        lease"): waits that end badly, the ones an operator most wants to see, are
        missing. It should record one wait."""
        fetching = threading.Event()
        store = LeaseWatchedStore()

        def limited_fetch() -> str:
            fetching.set()
            assert store.refused.wait(10)  # the waiter found the holder's lease taken
            raise RateLimited(30)

        holder = SharedToken(limited_fetch, store)
        waiter = SharedToken(lambda: pytest.fail("the waiter never fetches"), store)
        otel.instrument(waiter, meter.provider)
        outcomes: list[str] = []

        def call(token: SharedToken) -> None:
            try:
                token()
            except RateLimited:
                outcomes.append("RateLimited")

        first = ReraisingThread(lambda: call(holder), name="holder")
        first.start()
        assert fetching.wait(10)  # the holder has the lease
        second = ReraisingThread(lambda: call(waiter), name="waiter")
        second.start()
        first.join(20)
        second.join(20)
        assert outcomes == ["RateLimited", "RateLimited"]
        assert meter.total("token_refresh.shared.calls") == 1  # the waiter's, failed
        assert meter.count("token_refresh.shared.lease.wait") == 1
