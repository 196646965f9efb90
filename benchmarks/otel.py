"""What token_refresh.otel costs per refresh: a scheduler bare, with on_event, and instrumented.

Side by side in one process, on a ManualClock, so that only the scheduler's
own work is timed (no threads, no sleeping): 2,000 sessions refreshed ten
times each, every mode run three times, the median printed in microseconds of
CPU per refresh. Needs the test extra (opentelemetry-sdk)::

    python benchmarks/otel.py
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import time
from collections.abc import Callable

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from token_refresh import Scheduler, events, otel
from token_refresh.testing import ManualClock

START = 1_800_000_000.0
MODES = ("bare", "on_event", "otel")


def unsigned_jwt(exp: float) -> str:
    payload = base64.urlsafe_b64encode(json.dumps({"exp": exp}).encode()).decode()
    return f"e30.{payload.rstrip('=')}.unsigned"


def per_refresh(mode: str, sessions: int, rounds: int) -> float:
    """Microseconds of CPU per refresh for one run of ``mode``."""
    clock = ManualClock(start=START)

    def ignore(_event: events.Event) -> None:
        pass

    on_event: Callable[[events.Event], None] | None = ignore if mode == "on_event" else None
    scheduler = Scheduler(
        lambda: unsigned_jwt(clock.time() + 3600),
        lambda _session, _token: None,
        clock=clock,
        on_event=on_event,
    )
    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    if mode == "otel":
        otel.instrument(scheduler, provider)
    for number in range(sessions):
        scheduler.schedule(f"s{number}", unsigned_jwt(START + 900))
    began = time.process_time()
    clock.advance(600 + 1800 * (rounds - 1))  # the first refresh, then the follow-ups
    spent = time.process_time() - began
    provider.shutdown()
    return spent / (sessions * rounds) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--smoke", action="store_true", help="a few hundred refreshes, once")
    args = parser.parse_args(argv)
    sessions, rounds, runs = (100, 3, 1) if args.smoke else (2000, 10, 3)
    figures = {
        mode: statistics.median(per_refresh(mode, sessions, rounds) for _ in range(runs))
        for mode in MODES
    }
    for mode in MODES:
        ratio = figures[mode] / figures["bare"]
        print(f"{mode:>9}: {figures[mode]:7.1f} µs of CPU per refresh ({ratio:.1f}x bare)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
