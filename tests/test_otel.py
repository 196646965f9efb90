"""token_refresh.otel against the real OpenTelemetry SDK, read through an InMemoryMetricReader.

Without opentelemetry-sdk (the test extra) these tests skip, and fail under
``CI=true``. The last class runs without OpenTelemetry at all.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from token_refresh import Scheduler, events
from token_refresh._stores import this_process
from token_refresh.shared import Lease, MemoryStore, Record, SharedToken, StoreUnavailable
from token_refresh.testing import ManualClock

from conftest import START, Recorder, make_jwt

try:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from token_refresh import otel
except ImportError as error:  # pragma: no cover - the test extra installs it
    if os.environ.get("CI") == "true":
        raise
    pytest.skip(f"opentelemetry-sdk is not installed ({error})", allow_module_level=True)


class Metrics:
    """One MeterProvider with an in-memory reader, and the points it has collected."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])

    def points(self) -> dict[str, list[tuple[dict[str, Any], Any]]]:
        """Instrument name -> [(attributes, point)] as of now."""
        data = self.reader.get_metrics_data()
        found: dict[str, list[tuple[dict[str, Any], Any]]] = {}
        if data is None:
            return found
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                assert scope.scope.name == "token_refresh"
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        attributes = dict(point.attributes or {})
                        found.setdefault(metric.name, []).append((attributes, point))
        return found

    def total(self, name: str, **attributes: Any) -> float:
        """A counter's (or gauge's) value summed over points whose attributes include these."""
        return sum(
            float(point.value)
            for attrs, point in self.points().get(name, [])
            if all(attrs.get(key) == value for key, value in _keys(attributes).items())
        )

    def count(self, name: str, **attributes: Any) -> int:
        """How many values a histogram recorded, over points whose attributes include these."""
        return self.histogram(name, **attributes)[0]

    def histogram(self, name: str, **attributes: Any) -> tuple[int, float, float, float]:
        """(count, sum, min, max) of a histogram's points whose attributes include these."""
        points = [
            point
            for attrs, point in self.points().get(name, [])
            if all(attrs.get(key) == value for key, value in _keys(attributes).items())
        ]
        if not points:
            return 0, 0.0, 0.0, 0.0
        return (
            sum(point.count for point in points),
            sum(point.sum for point in points),
            min(point.min for point in points),
            max(point.max for point in points),
        )

    def close(self) -> None:
        self.provider.shutdown()


class LeaseWatchedStore(MemoryStore):
    """A MemoryStore whose ``refused`` is set once a caller finds another's lease taken."""

    def __init__(self) -> None:
        super().__init__()
        self.refused = threading.Event()

    def try_lease(self, key: str, ttl: float) -> Lease | None:
        lease = super().try_lease(key, ttl)
        if lease is None:
            self.refused.set()
        return lease


def _keys(attributes: dict[str, Any]) -> dict[str, Any]:
    """outcome="x" -> {"token_refresh.outcome": "x"}; error_type -> error.type."""
    return {
        ("error.type" if key == "error_type" else f"token_refresh.{key}"): value
        for key, value in attributes.items()
    }


@pytest.fixture
def meter() -> Iterator[Metrics]:
    found = Metrics()
    yield found
    found.close()


def instrumented(
    clock: ManualClock, recorder: Recorder, meter: Metrics, **options: Any
) -> Scheduler:
    scheduler = Scheduler(
        recorder.get_access_token, recorder.on_refresh, clock=clock, label="api", **options
    )
    otel.instrument(scheduler, meter.provider)
    return scheduler


class TestRefreshesAndFetches:
    def test_one_success_counts_once(
        self, clock: ManualClock, recorder: Recorder, meter: Metrics
    ) -> None:
        fresh = make_jwt({"exp": START + 600 + 3600})
        recorder.tokens = [fresh]
        scheduler = instrumented(clock, recorder, meter)
        scheduler.schedule("s1", make_jwt({"exp": START + 900}))
        clock.advance(600)
        assert recorder.deliveries == [(600.0, "s1", fresh)]
        assert meter.total("token_refresh.refreshes") == 1
        assert meter.total("token_refresh.refreshes", outcome="delivered", trigger="exp") == 1
        assert meter.total("token_refresh.fetches") == 1
        assert meter.total("token_refresh.fetches", outcome="ok") == 1
        # error.type only on failures
        for attrs, _ in meter.points()["token_refresh.refreshes"]:
            assert "error.type" not in attrs
        assert meter.histogram("token_refresh.lateness")[:2] == (1, 0.0)
        # the new JWT has an hour left at delivery
        assert meter.histogram("token_refresh.token.remaining") == (1, 3600.0, 3600.0, 3600.0)
        assert meter.total("token_refresh.give_ups") == 0

    def test_one_failure_counts_once(
        self, clock: ManualClock, recorder: Recorder, meter: Metrics
    ) -> None:
        """A refresh whose three attempts fail is one failed refresh, three fetches, one give-up."""
        recorder.tokens = [ValueError("down")] * 3
        scheduler = instrumented(clock, recorder, meter)
        scheduler.schedule("s1", make_jwt({"exp": START + 900}))
        clock.advance(600 + 60 + 60)
        assert recorder.gets == [600.0, 660.0, 720.0]
        assert scheduler.sessions() == frozenset()
        assert meter.total("token_refresh.refreshes") == 1
        assert (
            meter.total("token_refresh.refreshes", outcome="failed", error_type="ValueError") == 1
        )
        assert meter.total("token_refresh.fetches", outcome="failed", error_type="ValueError") == 3
        assert meter.total("token_refresh.give_ups", reason="failures") == 1
        # the retries' lateness is recorded under their own trigger
        assert meter.histogram("token_refresh.lateness", trigger="retry")[0] == 2
        assert meter.histogram("token_refresh.lateness", trigger="exp")[0] == 1

    def test_three_attempts_are_one_refresh_and_three_fetches(
        self, clock: ManualClock, recorder: Recorder, meter: Metrics
    ) -> None:
        recorder.tokens = [ValueError("down"), None, "third-time-lucky"]
        scheduler = instrumented(clock, recorder, meter)
        scheduler.schedule_from_expires_in("s1", 900)
        clock.advance(600 + 60 + 60)
        assert recorder.deliveries == [(720.0, "s1", "third-time-lucky")]
        assert meter.total("token_refresh.refreshes") == 1
        # the refresh keeps the trigger of its first attempt, not "retry"
        assert (
            meter.total("token_refresh.refreshes", outcome="delivered", trigger="expires_in") == 1
        )
        assert meter.total("token_refresh.fetches") == 3
        assert meter.total("token_refresh.fetches", outcome="ok") == 1
        assert meter.total("token_refresh.fetches", error_type="ValueError") == 1
        assert meter.total("token_refresh.fetches", error_type="no_token") == 1
        assert meter.total("token_refresh.give_ups") == 0
        # an opaque token: no remaining lifetime to record
        assert meter.histogram("token_refresh.token.remaining")[0] == 0

    def test_a_result_for_a_rescheduled_session_counts_as_stale(
        self, clock: ManualClock, meter: Metrics
    ) -> None:
        scheduler: Scheduler

        def reschedule_meanwhile() -> str:
            scheduler.schedule("s1", make_jwt({"exp": START + 99_999}))
            return "late"

        delivered: list[str] = []
        scheduler = Scheduler(
            reschedule_meanwhile, lambda _s, token: delivered.append(token), clock=clock
        )
        otel.instrument(scheduler, meter.provider)
        scheduler.schedule("s1", make_jwt({"exp": START + 900}))
        clock.advance(600)
        assert delivered == []
        assert meter.total("token_refresh.refreshes", outcome="stale", trigger="exp") == 1
        assert meter.total("token_refresh.fetches", outcome="stale") == 1
        assert meter.total("token_refresh.refreshes", outcome="delivered") == 0

    def test_the_follow_up_is_its_own_refresh(
        self, clock: ManualClock, recorder: Recorder, meter: Metrics
    ) -> None:
        scheduler = instrumented(clock, recorder, meter)
        scheduler.schedule("s1", make_jwt({"exp": START + 900}))
        clock.advance(600 + 1800)
        assert len(recorder.deliveries) == 2
        assert meter.total("token_refresh.refreshes", trigger="exp") == 1
        assert meter.total("token_refresh.refreshes", trigger="follow_up") == 1

    def test_callback_errors_are_counted_by_type(self, clock: ManualClock, meter: Metrics) -> None:
        def broken(_session: str, _token: str) -> None:
            raise KeyError("nope")

        scheduler = Scheduler(lambda: "t", broken, clock=clock, label="api")
        otel.instrument(scheduler, meter.provider)
        scheduler.schedule("s1", make_jwt({"exp": START}))
        assert meter.total("token_refresh.callback.errors", error_type="KeyError") == 1
        # the refresh itself was delivered
        assert meter.total("token_refresh.refreshes", outcome="delivered") == 1


class TestLateness:
    def test_a_suspend_shows_as_lateness(
        self, clock: ManualClock, recorder: Recorder, meter: Metrics
    ) -> None:
        scheduler = instrumented(clock, recorder, meter)
        scheduler.schedule("s1", make_jwt({"exp": START + 900}))  # due at +600
        clock.advance(100)
        clock.suspend(3600)  # asleep from +100 to +3700
        clock.advance(0)
        assert recorder.gets == [3700.0]
        count, total, _, _ = meter.histogram("token_refresh.lateness", trigger="resume")
        assert (count, total) == (1, 3100.0)
        assert meter.total("token_refresh.refreshes", trigger="resume") == 1

    def test_on_time_refreshes_are_not_late(
        self, clock: ManualClock, recorder: Recorder, meter: Metrics
    ) -> None:
        scheduler = instrumented(clock, recorder, meter)
        for index in range(5):
            scheduler.schedule(f"s{index}", make_jwt({"exp": START + 900 + index}))
        clock.advance(700)
        assert meter.histogram("token_refresh.lateness") == (5, 0.0, 0.0, 0.0)

    def test_a_step_back_does_not_count_as_lateness(
        self, clock: ManualClock, recorder: Recorder, meter: Metrics
    ) -> None:
        scheduler = instrumented(clock, recorder, meter)
        scheduler.schedule("s1", make_jwt({"exp": START + 900}))
        clock.step(-3600)  # NTP steps the wall clock back an hour; the monotonic deadline holds
        clock.advance(600)
        assert len(recorder.gets) == 1
        assert meter.histogram("token_refresh.lateness", trigger="exp") == (1, 0.0, 0.0, 0.0)


class TestGauges:
    def test_sessions_pending_running_and_stuck_come_from_stats(
        self, clock: ManualClock, recorder: Recorder, meter: Metrics
    ) -> None:
        scheduler = instrumented(clock, recorder, meter)
        for index in range(3):
            scheduler.schedule(f"s{index}", make_jwt({"exp": START + 900}))
        assert meter.total("token_refresh.sessions", label="api") == 3
        assert meter.total("token_refresh.pending", label="api") == 3
        assert meter.total("token_refresh.running", label="api") == 0
        assert meter.total("token_refresh.stuck", label="api") == 0
        scheduler.cancel("s0")
        assert meter.total("token_refresh.sessions", label="api") == 2

    def test_schedulers_with_one_label_are_summed(
        self, clock: ManualClock, recorder: Recorder, meter: Metrics
    ) -> None:
        first = instrumented(clock, recorder, meter)
        second = instrumented(clock, recorder, meter)
        other = Scheduler(
            recorder.get_access_token, recorder.on_refresh, clock=clock, label="billing"
        )
        otel.instrument(other, meter.provider)
        first.schedule("a", make_jwt({"exp": START + 900}))
        second.schedule("b", make_jwt({"exp": START + 900}))
        other.schedule("c", make_jwt({"exp": START + 900}))
        assert meter.total("token_refresh.sessions", label="api") == 2
        assert meter.total("token_refresh.sessions", label="billing") == 1

    def test_uninstrument_stops_recording(
        self, clock: ManualClock, recorder: Recorder, meter: Metrics
    ) -> None:
        scheduler = instrumented(clock, recorder, meter)
        handle = otel.instrument(scheduler, meter.provider)
        assert otel.instrument(scheduler, meter.provider) is handle  # nothing counted twice
        scheduler.schedule("s1", make_jwt({"exp": START}))
        assert meter.total("token_refresh.refreshes") == 1
        handle.uninstrument()
        handle.uninstrument()  # idempotent
        scheduler.schedule("s2", make_jwt({"exp": START}))
        assert len(recorder.deliveries) == 2
        assert meter.total("token_refresh.refreshes") == 1
        assert "token_refresh.sessions" not in meter.points()

    def test_the_gauges_leave_a_collected_scheduler_alone(
        self, clock: ManualClock, recorder: Recorder, meter: Metrics
    ) -> None:
        scheduler = instrumented(clock, recorder, meter)
        scheduler.schedule("s1", make_jwt({"exp": START + 900}))
        assert meter.total("token_refresh.sessions") == 1
        scheduler.close()
        del scheduler
        import gc

        gc.collect()
        assert meter.total("token_refresh.sessions") == 0


class TestNothingSecretInAttributes:
    def test_no_session_id_token_or_fingerprint_in_any_attribute(
        self, clock: ManualClock, meter: Metrics
    ) -> None:
        # Session ids that are credentials themselves, tokens that are JWTs, a
        # SharedToken with per-session keys: every instrument gets points.
        secret_ids = [make_jwt({"sub": f"user-{n}"}) for n in range(3)] + ["sk-ant-si-xyz"]
        minted: list[str] = []

        def fetch() -> str:
            token = make_jwt({"exp": START + 7200, "jti": f"secret-{len(minted)}"})
            minted.append(token)
            return token

        shared = SharedToken(fetch, per_session=True, key="tenant")
        fail_next = [True]

        def get_access_token() -> str | None:
            if fail_next[0]:
                fail_next[0] = False
                raise RuntimeError(minted[0] if minted else "secret in the message")
            return shared()

        seen: list[str] = []
        scheduler = Scheduler(
            get_access_token,
            lambda _s, token: seen.append(token),
            clock=clock,
            label="api",
        )
        otel.instrument(scheduler, meter.provider)
        otel.instrument(shared, meter.provider)
        for session_id in secret_ids:
            scheduler.schedule(session_id, make_jwt({"exp": START + 900}))
        clock.advance(600 + 60)
        assert len(seen) == len(secret_ids)
        points = meter.points()
        assert {"token_refresh.refreshes", "token_refresh.shared.calls"} <= points.keys()
        forbidden = [*secret_ids, *minted, *seen, "tenant", "user-", "secret", "sha256:"]
        for name, entries in points.items():
            for attrs, _ in entries:
                for key, value in attrs.items():
                    for text in (key, str(value)):
                        assert not any(bad in text for bad in forbidden), (name, key, value)
                assert set(attrs) <= {
                    "token_refresh.label",
                    "token_refresh.outcome",
                    "token_refresh.trigger",
                    "token_refresh.served_by",
                    "token_refresh.reason",
                    "token_refresh.store",
                    "token_refresh.operation",
                    "error.type",
                }, name


class TestSharedToken:
    def test_concurrent_callers_share_one_fetch(self, meter: Metrics) -> None:
        release = threading.Event()
        started = threading.Event()
        calls = 0

        def fetch() -> str:
            nonlocal calls
            calls += 1
            started.set()
            assert release.wait(10)
            return make_jwt({"exp": 4_000_000_000})

        shared = SharedToken(fetch)
        otel.instrument(shared, meter.provider)
        results: list[str | None] = []
        first = threading.Thread(target=lambda: results.append(shared()))
        first.start()
        assert started.wait(10)
        joiners = [threading.Thread(target=lambda: results.append(shared())) for _ in range(4)]
        for thread in joiners:
            thread.start()
        release.set()
        for thread in [first, *joiners]:
            thread.join(10)
        assert len(results) == 5
        assert calls == 1
        assert meter.total("token_refresh.shared.fetches") == 1
        assert meter.histogram("token_refresh.shared.fetch.duration")[0] == 1
        assert meter.total("token_refresh.shared.calls", served_by="fetch", store="memory") == 1
        assert meter.total("token_refresh.shared.calls", served_by="thread") == 4
        shared()  # from the cache, fetched by this process
        assert meter.total("token_refresh.shared.calls", served_by="thread") == 5

    @pytest.mark.parametrize(
        ("writer", "served_by"),
        [
            ("elsewhere.example:4242:0a1b2c3d", "host"),
            (f"{socket.gethostname()}:{os.getpid() + 1}:0a1b2c3d", "process"),
            # a restarted container: same host name and pid, another process
            (f"{socket.gethostname()}:{os.getpid()}:0a1b2c3d", "process"),
            (this_process(), "thread"),
            ("", "unknown"),
        ],
    )
    def test_a_stored_token_says_who_fetched_it(
        self, meter: Metrics, writer: str, served_by: str
    ) -> None:
        from token_refresh.shared import Grant

        store = MemoryStore()
        assert store.write(
            "default", Record(Grant(make_jwt({"exp": 4_000_000_000})), 1, 0.0, writer=writer)
        )
        shared = SharedToken(lambda: pytest.fail("the stored token is good"), store)
        otel.instrument(shared, meter.provider)
        assert shared() is not None
        assert meter.total("token_refresh.shared.calls", served_by=served_by) == 1
        assert meter.total("token_refresh.shared.fetches") == 0

    def test_scheduler_refreshes_say_who_served_them(
        self, clock: ManualClock, meter: Metrics
    ) -> None:
        fetches = 0

        def fetch() -> str:
            nonlocal fetches
            fetches += 1
            return make_jwt({"exp": START + 7200})

        shared = SharedToken(fetch)
        received: list[events.Event] = []
        scheduler = Scheduler(
            shared, lambda _s, _t: None, clock=clock, label="api", on_event=received.append
        )
        otel.instrument(scheduler, meter.provider)
        otel.instrument(shared, meter.provider)
        for index in range(3):
            scheduler.schedule(f"s{index}", make_jwt({"exp": START + 900}))
        clock.advance(600)
        assert fetches == 1
        served = [e.served_by for e in received if isinstance(e, events.Refreshed)]
        assert served == ["fetch", "thread", "thread"]
        assert meter.total("token_refresh.refreshes", outcome="delivered") == 3
        assert meter.total("token_refresh.refreshes", served_by="fetch") == 1
        assert meter.total("token_refresh.shared.fetches") == 1  # three refreshes per fetch

    def test_lease_waits_and_store_errors(self, meter: Metrics) -> None:
        store = LeaseWatchedStore()
        holding = threading.Event()
        release = threading.Event()

        def slow_fetch() -> str:
            holding.set()
            assert release.wait(10)
            return make_jwt({"exp": 4_000_000_000})

        # Two SharedTokens on one store stand for two processes sharing it.
        holder = SharedToken(slow_fetch, store)
        waiter = SharedToken(lambda: pytest.fail("the holder's token is used"), store)
        otel.instrument(waiter, meter.provider)
        first = threading.Thread(target=holder)
        first.start()
        assert holding.wait(10)
        second = threading.Thread(target=waiter)
        second.start()
        assert store.refused.wait(10)
        release.set()
        first.join(10)
        second.join(10)
        count, waited, _, _ = meter.histogram("token_refresh.shared.lease.wait")
        assert count == 1
        assert waited > 0

        class Down(MemoryStore):
            def read(self, key: str) -> Record | None:
                raise StoreUnavailable("down")

        broken = SharedToken(lambda: "t", Down())
        otel.instrument(broken, meter.provider)
        with pytest.raises(StoreUnavailable):
            broken()
        assert meter.total("token_refresh.shared.store.errors", operation="read", store="down") == 1
        assert meter.total("token_refresh.shared.calls", error_type="StoreUnavailable") == 1

    def test_a_rejection_that_forces_a_fetch_is_counted(self, meter: Metrics) -> None:
        """token_refresh.shared.rejections counts forced fetches, not every reject() call."""
        shared = SharedToken(lambda: "opaque")
        otel.instrument(shared, meter.provider)
        assert shared() == "opaque"
        assert shared.reject("opaque")
        assert not shared.reject("opaque")  # marked already
        assert meter.total("token_refresh.shared.rejections", store="memory") == 1


class TestClockSkew:
    def test_a_schedulers_skew_is_a_gauge(
        self, clock: ManualClock, recorder: Recorder, meter: Metrics
    ) -> None:
        """token_refresh.clock_skew: the server's clock minus ours, per label; 0 once it ends."""
        scheduler = instrumented(clock, recorder, meter)
        ahead = make_jwt({"iat": START + 900, "exp": START + 1500})
        scheduler.schedule("s", ahead)
        assert meter.total("token_refresh.clock_skew", label="api") == 900
        recorder.default = make_jwt({"iat": START + 300, "exp": START + 900})
        clock.advance(300)  # a fresh token, issued by a clock now in step with ours
        assert meter.total("token_refresh.clock_skew", label="api") == 0
        scheduler.close()

    def test_a_shared_tokens_skew_is_a_gauge(self, meter: Metrics) -> None:
        """A SharedToken's fetch 15 minutes behind: the gauge says -900, by store."""

        def fetch() -> str:
            now = time.time()
            return make_jwt({"iat": now - 900, "exp": now - 300})

        shared = SharedToken(fetch)
        otel.instrument(shared, meter.provider)
        shared()
        value = meter.total("token_refresh.clock_skew", store="memory")
        assert -902 < value < -898


class TestFaults:
    def test_a_failing_metrics_backend_breaks_no_refresh(
        self, clock: ManualClock, recorder: Recorder, caplog: pytest.LogCaptureFixture
    ) -> None:
        class Broken:
            def __getattr__(self, name: str) -> Any:
                def create(*_args: Any, **_kwargs: Any) -> Broken:
                    return self

                if name in ("add", "record"):

                    def fail(*_args: Any, **_kwargs: Any) -> None:
                        raise MemoryError("the exporter fell over")

                    return fail
                return create

        scheduler = Scheduler(recorder.get_access_token, recorder.on_refresh, clock=clock)
        otel.instrument(scheduler, Broken())  # type: ignore[arg-type]
        scheduler.schedule("s1", make_jwt({"exp": START + 900}))
        clock.advance(600)
        assert len(recorder.deliveries) == 1
        assert scheduler.next_refresh_at("s1") == START + 600 + 1800
        assert "metrics observer raised MemoryError" in caplog.text

    def test_a_failing_metrics_backend_breaks_no_shared_call(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        class Broken:
            def __getattr__(self, name: str) -> Any:
                if name in ("add", "record"):

                    def fail(*_args: Any, **_kwargs: Any) -> None:
                        raise RuntimeError("the exporter fell over")

                    return fail
                return lambda *_args, **_kwargs: self

        shared = SharedToken(lambda: "opaque-token")
        otel.instrument(shared, Broken())  # type: ignore[arg-type]
        assert shared() == "opaque-token"
        assert "metrics observer raised RuntimeError" in caplog.text

    def test_the_handle_outlives_its_target_quietly(self, meter: Metrics) -> None:
        shared = SharedToken(lambda: "opaque-token", key="billing")
        handle = otel.instrument(shared, meter.provider)
        assert (
            repr(handle) == "Instrumentation(SharedToken(key='billing', store=MemoryStore(keys=0)))"
        )
        del shared
        import gc

        gc.collect()
        assert repr(handle) == "Instrumentation(None)"
        handle.uninstrument()  # nothing left to detach

    def test_instrument_refuses_other_objects(self, meter: Metrics) -> None:
        with pytest.raises(TypeError, match="Scheduler or a SharedToken"):
            otel.instrument(object(), meter.provider)  # type: ignore[arg-type]

    def test_the_global_provider_is_the_default(self, clock: ManualClock) -> None:
        scheduler = Scheduler(lambda: "t", lambda _s, _t: None, clock=clock)
        other = Scheduler(lambda: "t", lambda _s, _t: None, clock=clock)
        handle = otel.instrument(scheduler)
        assert otel.instrument(other)._meters is handle._meters  # one set of instruments
        scheduler.schedule("s1", make_jwt({"exp": START}))  # a no-op provider: runs unchanged
        handle.uninstrument()

    def test_two_providers_each_get_every_figure(
        self, clock: ManualClock, recorder: Recorder, meter: Metrics
    ) -> None:
        second = Metrics()
        try:
            scheduler = instrumented(clock, recorder, meter)
            assert otel.instrument(scheduler, second.provider) is not otel.instrument(
                scheduler, meter.provider
            )
            scheduler.schedule("s1", make_jwt({"exp": START}))
            assert meter.total("token_refresh.refreshes") == 1
            assert second.total("token_refresh.refreshes") == 1
        finally:
            second.close()

    @pytest.mark.realclock
    @pytest.mark.timeout(20)
    @pytest.mark.usefixtures("timer_backend")
    def test_real_timers_and_a_timed_out_fetch(self, meter: Metrics) -> None:
        release = threading.Event()
        timed_out = threading.Event()
        delivered = threading.Event()
        calls = 0

        def get_access_token() -> str:
            nonlocal calls
            calls += 1
            if calls == 1:
                assert release.wait(10)  # hangs past fetch_timeout
            return "fresh"

        def on_event(event: events.Event) -> None:
            if isinstance(event, events.RefreshTimedOut):
                timed_out.set()

        scheduler = Scheduler(
            get_access_token,
            lambda _s, _t: delivered.set(),
            label="real",
            fetch_timeout=0.2,
            retry_delay=2,  # time enough for the hung call to return, on a busy machine
            on_event=on_event,
        )
        otel.instrument(scheduler, meter.provider)
        try:
            scheduler.schedule("s1", make_jwt({"exp": 1}))  # expired: refresh at once
            assert timed_out.wait(10)
            assert meter.total("token_refresh.stuck", label="real") == 1
            assert meter.total("token_refresh.fetches", outcome="timed_out") == 1
            count, seconds, _, _ = meter.histogram(
                "token_refresh.fetch.duration", outcome="timed_out"
            )
            assert (count, seconds) == (1, 0.2)
            release.set()  # the hung call returns; the retry, 2 s on, calls again
            assert delivered.wait(10)
        finally:
            release.set()
            scheduler.close(5)
        assert meter.total("token_refresh.refreshes", outcome="delivered") == 1
        assert meter.total("token_refresh.refreshes") == 1
        assert meter.total("token_refresh.stuck", label="real") == 0
        assert meter.histogram("token_refresh.lateness", trigger="retry")[0] == 1


class TestPrometheus:
    def test_the_alerts_use_the_names_the_exporter_produces(self, clock: ManualClock) -> None:
        """guides/metrics.md's PromQL names, as OpenTelemetry's Prometheus exporter writes them."""
        prometheus = pytest.importorskip("opentelemetry.exporter.prometheus")
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry()
        reader = prometheus.PrometheusMetricReader()
        registry.register(reader._collector)
        provider = MeterProvider(metric_readers=[reader])
        try:
            scheduler = Scheduler(lambda: None, lambda _s, _t: None, clock=clock, label="api")
            otel.instrument(scheduler, provider)
            scheduler.schedule("s1", make_jwt({"exp": START + 900}))
            scheduler.schedule("s2", make_jwt({"exp": START + 9000}))
            clock.advance(600 + 120)  # s1 gives up after three attempts
            text = generate_latest(registry).decode()
        finally:
            provider.shutdown()
        page = (Path(__file__).parent.parent / "docs" / "guides" / "metrics.md").read_text()
        for name in (
            "token_refresh_give_ups_total",
            "token_refresh_lateness_seconds_bucket",
            "token_refresh_stuck",
            "token_refresh_fetches_total",
        ):
            assert name in page, name
            assert f"\n{name}{{" in text, name
        assert 'token_refresh_label="api"' in text
        assert "token_refresh_sessions{" in text


class TestWithoutOpenTelemetry:
    def test_the_library_imports_and_runs_without_it(self) -> None:
        program = """
import sys
sys.modules["opentelemetry"] = None  # as if not installed
import token_refresh, token_refresh.shared, token_refresh.events
from token_refresh import Scheduler
from token_refresh.testing import ManualClock
clock = ManualClock(start=1_800_000_000)
seen = []
with Scheduler(lambda: "t", lambda s, t: seen.append(t), clock=clock) as scheduler:
    scheduler.schedule_from_expires_in("s", 400)
    clock.advance(100)
assert seen == ["t"], seen
try:
    import token_refresh.otel
except ImportError as error:
    print(error)
else:
    raise SystemExit("token_refresh.otel imported without OpenTelemetry")
"""
        result = subprocess.run(
            [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert 'pip install "token_refresh[otel]"' in result.stdout

    def test_importing_the_library_does_not_import_opentelemetry(self) -> None:
        program = (
            "import sys, token_refresh, token_refresh.shared, token_refresh.testing; "
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
        )
        result = subprocess.run(
            [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "[]"
