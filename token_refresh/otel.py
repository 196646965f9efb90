"""OpenTelemetry metrics for a Scheduler or a SharedToken: ``instrument(it)``.

Needs the ``token_refresh[otel]`` extra (``opentelemetry-api`` only); the
application's SDK and exporter decide where the figures go. Every instrument
is named ``token_refresh.*``. Attributes are few and bounded: the scheduler's
label, an outcome, a trigger, ``error.type`` on failures only. No attribute
ever holds a session id, a key or token material.

A *refresh* is one due refresh and its retries: counted once, when it ends
(``delivered``; ``failed`` when no retry follows; ``stale`` when its result
came too late; ``abandoned`` when a cancel or reschedule dropped its retry).
A *fetch* is one ``get_access_token`` call: three attempts of one refresh
are one refresh and three fetches. For a SharedToken a fetch is one call of its
``fetch``, so refreshes per shared fetch shows how well calls coalesce.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any

try:
    from opentelemetry import metrics
except ImportError as error:  # pragma: no cover - tests/test_otel.py runs it in a subprocess
    raise ImportError(
        'token_refresh.otel needs OpenTelemetry: pip install "token_refresh[otel]"'
    ) from error

from . import __version__, events
from ._scheduler import Scheduler
from .shared import SharedToken

__all__ = [
    "DURATION_BUCKETS",
    "LATENESS_BUCKETS",
    "LIFETIME_BUCKETS",
    "Instrumentation",
    "instrument",
]

#: Bucket boundaries (seconds) for ``token_refresh.lateness``: milliseconds on a
#: calm machine, up to the hour a laptop may sleep through a refresh.
LATENESS_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)
#: Bucket boundaries (seconds) for the fetch and lease-wait durations, up to the
#: default ``fetch_timeout`` (60).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Bucket boundaries (seconds) for ``token_refresh.token.remaining``: what a
#: delivered JWT has left, from under a minute to a day.
LIFETIME_BUCKETS = (0.0, 60.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 43200.0, 86400.0)

_LABEL = "token_refresh.label"
_OUTCOME = "token_refresh.outcome"
_TRIGGER = "token_refresh.trigger"
_SERVED_BY = "token_refresh.served_by"
_ERROR = "error.type"  # OpenTelemetry's own attribute, on failures only
_STORE = "token_refresh.store"


class _Meters:
    """The instruments of one MeterProvider, shared by everything instrumented on it."""

    def __init__(self, provider: metrics.MeterProvider) -> None:
        # Holds no reference to the provider: _meters is keyed by it, weakly.
        meter = provider.get_meter("token_refresh", __version__)
        self.schedulers: weakref.WeakSet[Scheduler] = weakref.WeakSet()
        self.refreshes = meter.create_counter(
            "token_refresh.refreshes",
            unit="{refresh}",
            description="Refreshes that ended: delivered, failed, stale or abandoned",
        )
        self.fetches = meter.create_counter(
            "token_refresh.fetches",
            unit="{fetch}",
            description="get_access_token calls, by outcome: ok, failed, timed_out or stale",
        )
        self.fetch_duration = meter.create_histogram(
            "token_refresh.fetch.duration",
            unit="s",
            description="How long get_access_token ran (fetch_timeout for a call that hung)",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.lateness = meter.create_histogram(
            "token_refresh.lateness",
            unit="s",
            description="How long after its due time a refresh attempt started",
            explicit_bucket_boundaries_advisory=LATENESS_BUCKETS,
        )
        self.remaining = meter.create_histogram(
            "token_refresh.token.remaining",
            unit="s",
            description="Lifetime left in each delivered JWT when it was delivered",
            explicit_bucket_boundaries_advisory=LIFETIME_BUCKETS,
        )
        self.give_ups = meter.create_counter(
            "token_refresh.give_ups",
            unit="{chain}",
            description="Refresh chains that stopped: failures in a row, or no timer thread",
        )
        self.callback_errors = meter.create_counter(
            "token_refresh.callback.errors",
            unit="{error}",
            description="on_refresh calls that raised",
        )
        self.clock_skew = meter.create_gauge(
            "token_refresh.clock_skew",
            unit="s",
            description="The token server's clock minus this host's, as last learned "
            "(0: within the threshold)",
        )
        for name, unit, description in (
            ("sessions", "{session}", "Sessions with a live refresh chain"),
            ("pending", "{timer}", "Sessions with a refresh timer armed"),
            ("running", "{call}", "get_access_token and on_refresh calls in progress"),
            ("stuck", "{call}", "get_access_token calls past fetch_timeout, still running"),
        ):
            meter.create_observable_up_down_counter(
                f"token_refresh.{name}",
                callbacks=[self._gauge(name)],
                unit=unit,
                description=description,
            )
        self.shared_calls = meter.create_counter(
            "token_refresh.shared.calls",
            unit="{call}",
            description="SharedToken calls, by who fetched the token they returned",
        )
        self.shared_fetches = meter.create_counter(
            "token_refresh.shared.fetches",
            unit="{fetch}",
            description="Calls of a SharedToken's fetch: the requests the token server saw",
        )
        self.shared_fetch_duration = meter.create_histogram(
            "token_refresh.shared.fetch.duration",
            unit="s",
            description="How long a SharedToken's fetch ran",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.lease_wait = meter.create_histogram(
            "token_refresh.shared.lease.wait",
            unit="s",
            description="How long a fetch waited on another holder's lease",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.store_errors = meter.create_counter(
            "token_refresh.shared.store.errors",
            unit="{error}",
            description="Store operations that failed (StoreUnavailable), by operation",
        )
        self.rejections = meter.create_counter(
            "token_refresh.shared.rejections",
            unit="{rejection}",
            description="Tokens a server refused that forced a new fetch (SharedToken.reject)",
        )

    def _gauge(
        self, field: str
    ) -> Callable[[metrics.CallbackOptions], Iterable[metrics.Observation]]:
        """An observable's callback: the field of stats(), summed per label. Runs only when read."""

        def observe(options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
            totals: dict[str, int] = {}
            for scheduler in list(self.schedulers):
                totals[scheduler.label] = totals.get(scheduler.label, 0) + getattr(
                    scheduler.stats(), field
                )
            return [metrics.Observation(value, {_LABEL: label}) for label, value in totals.items()]

        return observe

    # -- a Scheduler's events -------------------------------------------------

    def scheduler_observer(self) -> Callable[[events.Event], None]:
        def observe(event: events.Event) -> None:
            label = {_LABEL: event.label}
            if isinstance(event, events.RefreshStarted):
                self.lateness.record(event.lateness, {**label, _TRIGGER: event.trigger})
            elif isinstance(event, events.Refreshed):
                delivered = {**label, _OUTCOME: "delivered", _TRIGGER: event.trigger}
                if event.served_by is not None:
                    delivered[_SERVED_BY] = event.served_by
                self.refreshes.add(1, delivered)
                self._fetched(label, "ok", None, event.fetch_duration)
                if event.expires_at is not None:
                    self.remaining.record(max(0.0, event.expires_at - event.time), label)
            elif isinstance(event, events.RefreshFailed):
                error = event.error_type or "no_token"
                if event.called:  # else an earlier call still hangs: none was made
                    outcome = "timed_out" if isinstance(event, events.RefreshTimedOut) else "failed"
                    self._fetched(label, outcome, error, event.fetch_duration)
                if event.final:
                    failed = {**label, _OUTCOME: "failed", _TRIGGER: event.trigger, _ERROR: error}
                    self.refreshes.add(1, failed)
            elif isinstance(event, events.StaleDropped):
                self.refreshes.add(1, {**label, _OUTCOME: "stale", _TRIGGER: event.trigger})
                self._fetched(label, "stale", None, event.fetch_duration)
            elif isinstance(event, events.RetryDropped):
                self.refreshes.add(1, {**label, _OUTCOME: "abandoned", _TRIGGER: event.trigger})
            elif isinstance(event, events.GaveUp):
                reason = (
                    "no_timer"
                    if event.reason == "no timer"
                    else "terminal"
                    if event.reason.startswith("terminal")
                    else "failures"
                )
                self.give_ups.add(1, {**label, "token_refresh.reason": reason})
            elif isinstance(event, events.CallbackError):
                self.callback_errors.add(1, {**label, _ERROR: event.error_type})
            elif isinstance(event, events.ClockSkew):
                self.clock_skew.set(event.skew, label)

        return observe

    def _fetched(
        self, label: dict[str, str], outcome: str, error: str | None, duration: float
    ) -> None:
        attributes = {**label, _OUTCOME: outcome}
        if error is not None:
            attributes[_ERROR] = error
        self.fetches.add(1, attributes)
        self.fetch_duration.record(duration, attributes)

    # -- a SharedToken's reports ----------------------------------------------

    def shared_observer(self, store: str) -> Callable[[str, float, dict[str, str]], None]:
        base = {_STORE: store}

        def observe(kind: str, value: float, attributes: dict[str, str]) -> None:
            merged = {**base, **attributes}
            if kind == "call":
                self.shared_calls.add(1, merged)
            elif kind == "fetch":
                self.shared_fetches.add(1, merged)
                self.shared_fetch_duration.record(value, merged)
            elif kind == "lease_wait":
                self.lease_wait.record(value, merged)
            elif kind == "reject":
                self.rejections.add(1, merged)
            elif kind == "clock_skew":
                self.clock_skew.set(value, merged)
            else:  # "store_error"
                self.store_errors.add(1, merged)

        return observe


# The instruments of each MeterProvider, weakly keyed: a provider dropped by
# its application is collected. The global provider (meter_provider=None) has
# one set for good: before the application sets its SDK it is OpenTelemetry's
# proxy, which forwards to the SDK once it is set.
_meters: weakref.WeakKeyDictionary[metrics.MeterProvider, _Meters] = weakref.WeakKeyDictionary()
_global: _Meters | None = None
_lock = threading.Lock()


class Instrumentation:
    """Metrics switched on for one Scheduler or SharedToken, until :meth:`uninstrument`."""

    def __init__(self, target: Scheduler | SharedToken, meters: _Meters) -> None:
        self._target: weakref.ReferenceType[Any] = weakref.ref(target)
        self._meters = meters
        self._observer: Any
        if isinstance(target, Scheduler):
            self._observer = meters.scheduler_observer()
            meters.schedulers.add(target)
        else:
            self._observer = meters.shared_observer(_store_name(target))
        target._observers = (*target._observers, self._observer)

    def __repr__(self) -> str:
        return f"Instrumentation({self._target()!r})"

    def uninstrument(self) -> None:
        """Stop recording for this target; figures already recorded stay with the SDK."""
        with _lock:
            target = self._target()
            if target is None:
                return
            target._observers = tuple(o for o in target._observers if o is not self._observer)
            self._meters.schedulers.discard(target)
            handles = _instrumented.get(target, [])
            if self in handles:
                handles.remove(self)


_instrumented: weakref.WeakKeyDictionary[Any, list[Instrumentation]] = weakref.WeakKeyDictionary()


def instrument(
    target: Scheduler | SharedToken, meter_provider: metrics.MeterProvider | None = None
) -> Instrumentation:
    """Record ``target``'s metrics on ``meter_provider`` (None: the global one).

    Calling it again for the same target and provider returns the same
    :class:`Instrumentation`: nothing is counted twice, also when the
    application sets its global provider between the calls. Instruments whose
    values come from :meth:`~token_refresh.Scheduler.stats`
    (``token_refresh.sessions``, ``pending``, ``running``, ``stuck``) cost
    nothing until a reader collects.
    """
    if not isinstance(target, (Scheduler, SharedToken)):
        raise TypeError(
            f"instrument() takes a Scheduler or a SharedToken, not {type(target).__name__}"
        )
    with _lock:
        meters = _meters_for(meter_provider)
        handles = _instrumented.setdefault(target, [])
        for handle in handles:
            if handle._meters is meters:
                return handle
        handle = Instrumentation(target, meters)
        handles.append(handle)
        return handle


def _meters_for(provider: metrics.MeterProvider | None) -> _Meters:
    """The instruments on ``provider`` (lock held), made at its first use."""
    global _global
    current = metrics.get_meter_provider()
    if provider is None or provider is current:
        if _global is None:  # the provider may have been given by name before
            _global = _meters.get(current) or _Meters(current)
        return _global
    meters = _meters.get(provider)
    if meters is None:
        meters = _meters[provider] = _Meters(provider)
    return meters


def _after_fork_in_child() -> None:  # pragma: no cover - runs in forked children
    global _lock
    _lock = threading.Lock()  # a thread of the parent may have held it


if hasattr(os, "register_at_fork"):  # pragma: no branch - not on Windows
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _store_name(token: SharedToken) -> str:
    """The store's kind, for the ``token_refresh.store`` attribute: memory, file, redis."""
    name = type(token._store).__name__
    return name.removesuffix("Store").lower() or name
