"""Failing reproductions of the core's defects (issue 16), through the public API only.

Each test here pins one row of the issue: it fails on the core that issue
replaces and passes on a correct one. The scenarios that can deadlock a
process-wide lock (finalizers, signal handlers) run in a child interpreter,
so a hang there fails its test instead of the rest of the suite.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import json
import linecache
import logging
import math
import os
import select
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from datetime import timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import token_refresh
from token_refresh import Scheduler, events
from token_refresh.testing import ManualClock

from conftest import START, Recorder, make_jwt

LIBRARY = str(Path(token_refresh.__file__).parent)
TESTS = str(Path(__file__).parent)
SESSION = "sk-ant-si-" + make_jwt({"sub": "user", "exp": 1_900_000_000})
Backend = Literal["thread", "heap"]
BACKENDS: list[Backend] = ["thread", "heap"]
Tracer = Callable[[FrameType, str, Any], Any]


def in_library(frame: FrameType) -> bool:
    return frame.f_code.co_filename.startswith(LIBRARY)


def untouchable(frame: FrameType) -> bool:
    """A line event no signal can land on: a bare ``try:`` (a NOP) or a ``with`` line.

    The event for a ``with`` line also comes as its block exits, between the
    block's cleanup range and the ``__exit__`` call, where the interpreter
    checks for no signal; one raised there by a tracer leaves the lock held,
    which a real Ctrl-C cannot do (nor can it land on a NOP).
    """
    text = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
    return text == "try:" or text.startswith("with ")


def line_tracer(on_line: Callable[[], None]) -> Tracer:
    """A global trace function calling ``on_line`` at each line event inside token_refresh."""

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line" and not untouchable(frame):
            on_line()
        return local

    def global_(frame: FrameType, event: str, arg: Any) -> Any:
        return local if in_library(frame) else None

    return global_


def bounded(work: Callable[[], object], timeout: float, what: str) -> None:
    """Run ``work`` on a helper thread; fail (never hang) if it does not finish in ``timeout``."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as error:  # re-raised below
            errors.append(error)

    helper = threading.Thread(target=run, name=f"bounded-{what}", daemon=True)
    helper.start()
    helper.join(timeout)
    if helper.is_alive():
        raise AssertionError(f"{what} did not finish within {timeout}s")
    if errors:
        raise errors[0]


def library_threads(label: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"token-refresh-{label}"]


def run_child(scenario: str, argument: str, timeout: float = 50.0) -> None:
    """Run ``scenario(argument)`` of this module in a child interpreter; fail on its failure."""
    code = (
        f"import sys; sys.path.insert(0, {TESTS!r}); import test_core_defects as m; "
        f"m.{scenario}({argument!r})"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as expired:
        raise AssertionError(f"{scenario}({argument!r}) hung: {expired.stdout!r}") from None
    assert done.returncode == 0, f"{scenario}({argument!r}): {done.stdout}{done.stderr[-3000:]}"


def child_watchdog(seconds: float, state: dict[str, object]) -> None:
    """In a child: exit 3 with ``state`` printed if the scenario has not ended in ``seconds``."""

    def watch() -> None:
        end = time.monotonic() + seconds
        tick = threading.Event()
        while time.monotonic() < end:  # a watchdog, not a wait for something to happen
            step_end = state.get("deadline")
            if isinstance(step_end, float) and time.monotonic() > step_end:
                break
            tick.wait(0.1)
        os.write(1, f"HUNG at {state}\n".encode())
        os._exit(3)

    threading.Thread(target=watch, name="child-watchdog", daemon=True).start()


# -- 1. A finalizer on a library thread -----------------------------------------------------


class Owner:
    """A daemon object that owns its scheduler and hands it its own bound methods."""

    def __init__(self, timers: Backend, label: str) -> None:
        self.delivered: list[str] = []
        self.scheduler = Scheduler(
            self.get_access_token,
            self.on_refresh,
            timers=timers,
            label=label,
        )

    def get_access_token(self) -> str:
        return "token"

    def on_refresh(self, session_id: str, token: str) -> None:
        self.delivered.append(session_id)


def finalizer_scenario(timers: Backend) -> None:
    """For each line n a library thread runs after an owner is dropped, collect there; then use."""
    state: dict[str, object] = {"n": 0}
    child_watchdog(40.0, state)
    main = threading.main_thread()
    n = 0
    while True:
        n += 1
        state["n"] = n
        label = f"owner{n}"
        holder = [Owner(timers, label)]
        owner = weakref.ref(holder[0])
        seen = 0
        armed = False

        def on_line() -> None:
            nonlocal seen
            if not armed or threading.current_thread() is main or owner() is None:  # noqa: B023 - called within the round
                return
            seen += 1
            if seen >= n:  # noqa: B023 - called within the round
                holder.clear()  # noqa: B023 - called within the round
                gc.collect()  # the finalizer runs here, on the library's thread

        gc.disable()
        threading.settrace(line_tracer(on_line))
        try:
            target = holder[0]
            target.scheduler.schedule_from_expires_in("s", 3600)
            armed = True
            target.scheduler.cancel("s")  # as Bridge.close_session does
            del target  # now only the holder keeps the owner alive
            # A cancelled session's timer thread ends; the heap's thread stays
            # parked until its scheduler is closed or collected: give it a moment.
            for thread in library_threads(label):
                thread.join(5.0 if timers == "thread" else 0.2)
        finally:
            threading.settrace(None)
            gc.enable()
        holder.clear()
        state["step"] = "gc.collect() on another thread"
        bounded(gc.collect, 5.0, f"gc.collect() after point {n}")
        assert owner() is None, f"point {n}: the dropped owner was never collected"
        state["step"] = "a new scheduler's schedule()"
        fresh = Scheduler(lambda: "t", lambda s, t: None, timers=timers, label=f"fresh{n}")
        bounded(lambda: fresh.schedule_from_expires_in("x", 3600), 5.0, f"schedule() after {n}")  # noqa: B023 - called within the round
        bounded(lambda: fresh.close(timeout=2), 5.0, f"close() after point {n}")  # noqa: B023 - called within the round
        probe = [Owner(timers, f"probe{n}")]
        collected = weakref.ref(probe[0])
        probe.clear()
        bounded(gc.collect, 5.0, f"a second gc.collect() after point {n}")
        assert collected() is None, (
            f"point {n}: gc.collect() no longer collects (a finalizer hangs)"
        )
        if seen < n:  # every point of this run has been tried
            print(f"ok: {n - 1} points")
            return


@pytest.mark.realclock
@pytest.mark.timeout(120)
@pytest.mark.parametrize("timers", BACKENDS)
class TestFinalizer:
    def test_dropped_owner_collected_on_a_library_thread(self, timers: Backend) -> None:
        """An owner dropped and collected on a library thread leaves later schedulers working."""
        run_child("finalizer_scenario", timers, timeout=60)


# -- 2. close() from a signal handler ---------------------------------------------------------


def signal_scenario(timers: Backend) -> None:
    """At each line of B's call, a 'handler' closes A and drops an idle scheduler, bounded."""
    state: dict[str, object] = {}
    child_watchdog(40.0, state)
    jwt = make_jwt({"exp": time.time() + 3600})
    operations: dict[str, Callable[[Scheduler], object]] = {
        "schedule": lambda b: b.schedule("b1", jwt),
        "schedule_from_expires_in": lambda b: b.schedule_from_expires_in("b1", 3600),
        "cancel": lambda b: b.cancel("b1"),
    }
    slow: list[str] = []
    for name, operation in operations.items():
        n = 0
        while True:
            n += 1
            state.update(operation=name, n=n, step="setup")
            a = Scheduler(lambda: "t", lambda s, t: None, timers=timers, label="a")
            a.schedule_from_expires_in("a1", 3600)
            b = Scheduler(lambda: "t", lambda s, t: None, timers=timers, label="b")
            if name == "cancel":  # else B's call arms its first timer
                b.schedule_from_expires_in("b1", 7200)
            idle = [Scheduler(lambda: "t", lambda s, t: None, timers=timers, label="idle")]
            idle[0].schedule_from_expires_in("i1", 3600)
            idle[0].cancel("i1")  # idle now, after it had a timer
            seen = 0
            handled = False

            def handler() -> None:
                nonlocal seen, handled
                seen += 1
                if handled or seen < n:  # noqa: B023 - called within the round
                    return
                handled = True
                sys.settrace(None)
                state["step"] = "A.close(timeout=0.5) in the handler"
                state["deadline"] = time.monotonic() + 5.0
                started = time.monotonic()
                a.close(timeout=0.5)  # noqa: B023 - called within the round
                closing = time.monotonic() - started
                state["step"] = "del idle; gc.collect() in the handler"
                started = time.monotonic()
                idle.clear()  # noqa: B023 - called within the round
                gc.collect()
                dropping = time.monotonic() - started
                state["deadline"] = None
                if closing > 1.5 or dropping > 1.0:
                    slow.append(f"{name} point {n}: close {closing:.2f}s, del {dropping:.2f}s")  # noqa: B023 - called within the round

            sys.settrace(line_tracer(handler))
            try:
                operation(b)
            finally:
                sys.settrace(None)
            state["step"] = "teardown"
            a.close(timeout=2)
            b.close(timeout=2)
            idle.clear()
            if not handled:
                break
    assert not slow, slow
    print("ok")


@pytest.mark.realclock
@pytest.mark.timeout(120)
@pytest.mark.parametrize("timers", BACKENDS)
class TestSignalHandler:
    def test_close_from_a_handler_returns_within_its_timeout(self, timers: Backend) -> None:
        """close(timeout) and del of an idle scheduler in a handler return whatever B is doing."""
        run_child("signal_scenario", timers, timeout=60)


# -- 3. KeyboardInterrupt anywhere in a public method ----------------------------------------


@contextlib.contextmanager
def tracing(on_line: Callable[[], None]) -> Iterator[None]:
    """Trace this thread's lines inside token_refresh; restore the previous tracer (coverage's)."""
    previous = sys.gettrace()
    sys.settrace(line_tracer(on_line))
    try:
        yield
    finally:
        sys.settrace(previous)


def interrupted(n: int, work: Callable[[], object]) -> bool:
    """Run ``work``, interrupted at its n-th line inside token_refresh; True if it was."""
    seen = 0

    def on_line() -> None:
        nonlocal seen
        seen += 1
        if seen == n:
            raise KeyboardInterrupt

    try:
        with tracing(on_line):
            work()
    except KeyboardInterrupt:
        assert seen >= n  # ours, not a real Ctrl-C
        return True
    return False


def jwt_in(clock: ManualClock | None, seconds: float) -> str:
    now = time.time() if clock is None else clock.time()
    return make_jwt({"exp": now + seconds})


OPERATIONS: dict[str, Callable[[Scheduler, ManualClock | None], object]] = {
    "schedule": lambda s, c: s.schedule("s", jwt_in(c, 3600)),
    "schedule (refresh at once)": lambda s, c: s.schedule("s", jwt_in(c, 10)),
    "schedule_from_expires_in": lambda s, c: s.schedule_from_expires_in("s", 3600),
    "cancel": lambda s, c: s.cancel("s"),
}


def consistency_problems(scheduler: Scheduler, clock: ManualClock, recorder: Recorder) -> str:
    """What is wrong after an interrupted call: phantoms, refreshes that never come, orphans."""
    listed = sorted(scheduler.sessions())
    phantoms = [s for s in listed if scheduler.next_refresh_at(s) is None]
    if phantoms:
        return f"phantom sessions (listed, no refresh armed): {phantoms}"
    if clock.pending > len(listed):
        return f"{clock.pending} timers armed for {len(listed)} sessions"
    for session in listed:
        due = scheduler.next_refresh_at(session)
        assert due is not None
        before = sum(d[1] == session for d in recorder.deliveries)
        clock.advance(max(0.0, due - clock.time()) + 0.001)
        if sum(d[1] == session for d in recorder.deliveries) == before:
            return f"session {session!r} was due at {due} and was not refreshed"
    scheduler.cancel_all()
    if clock.pending:
        return f"{clock.pending} timers armed after cancel_all()"
    calls = len(recorder.calls)
    clock.advance(10 * 86400)
    if len(recorder.calls) != calls:
        return f"calls after cancel_all(): {recorder.calls[calls:]}"
    return ""


class TestKeyboardInterrupt:
    @pytest.mark.parametrize("operation", list(OPERATIONS))
    def test_interrupt_anywhere_leaves_a_consistent_scheduler(self, operation: str) -> None:
        """A KeyboardInterrupt at any line of a call leaves no phantom, orphan or survivor."""
        failures: list[str] = []
        for n in range(1, 3000):
            clock = ManualClock(start=0.0)
            recorder = Calls(clock)
            scheduler = Scheduler(recorder.get_access_token, recorder.on_refresh, clock=clock)
            scheduler.schedule("s", jwt_in(clock, 7200))  # the session the call replaces
            scheduler.schedule_from_expires_in("t", 5000)  # a bystander
            gc.collect()  # the last round's scheduler is finalized now, not inside the call
            hit = interrupted(n, lambda: OPERATIONS[operation](scheduler, clock))  # noqa: B023 - called within the round
            found: list[str] = []
            try:  # on a helper thread: a lock the interrupt left held must not hang the suite
                bounded(
                    lambda: found.append(consistency_problems(scheduler, clock, recorder)),  # noqa: B023 - called within the round
                    5.0,
                    "the next calls (a lock left held?)",
                )
                bounded(scheduler.close, 5.0, "close()")
            except AssertionError as error:
                found.append(str(error))
            if found[0]:
                failures.append(f"interrupted at line {n}: {found[0]}")
            if not hit or sum("did not finish" in f for f in failures) >= 3:
                break
        assert not failures, f"{len(failures)} of {n - 1} points: " + "\n".join(failures[:10])

    @pytest.mark.realclock
    @pytest.mark.timeout(120)
    @pytest.mark.parametrize("operation", list(OPERATIONS))
    def test_interrupt_leaves_no_timer_thread_after_cancel_all(self, operation: str) -> None:
        """After an interrupted call, cancel_all() leaves no timer thread of the thread backend."""
        failures: list[str] = []
        for n in range(1, 3000):
            label = f"ki{n}"
            recorder = Recorder()
            scheduler = Scheduler(
                recorder.get_access_token, recorder.on_refresh, timers="thread", label=label
            )
            scheduler.schedule("s", jwt_in(None, 7200))
            gc.collect()  # the last round's scheduler is finalized now, not inside the call
            hit = interrupted(n, lambda: OPERATIONS[operation](scheduler, None))  # noqa: B023 - called within the round
            done: list[bool] = []
            try:
                bounded(lambda: done.append(scheduler.cancel_all(timeout=5)), 8.0, "cancel_all()")  # noqa: B023 - called within the round
            except AssertionError as error:
                failures.append(f"line {n}: {error} (a lock left held?)")
                break
            delivered = len(recorder.deliveries)
            for thread in library_threads(label):
                thread.join(2.0)
            alive = library_threads(label)
            if alive:
                failures.append(f"line {n}: {len(alive)} timer thread(s) outlive cancel_all()")
            try:
                bounded(lambda: scheduler.close(timeout=5), 8.0, "close()")  # noqa: B023 - called within the round
            except AssertionError as error:
                failures.append(f"line {n}: {error} (a lock left held?)")
                break
            if done[0] and len(recorder.deliveries) != delivered:
                failures.append(f"line {n}: on_refresh called after cancel_all() returned True")
            if not hit:
                break
        assert not failures, f"{len(failures)} of {n - 1} points: " + "\n".join(failures[:10])


# -- 4. fork() inside a callback ---------------------------------------------------------------


def fork_report(scheduler: Scheduler, seen: list[events.Event], log: io.StringIO) -> dict[str, Any]:
    """In the child: the scheduler's counters, events and log once the callback returned."""
    events_before, log_before = len(seen), len(log.getvalue())
    running: list[int] = []
    pause = threading.Event()
    for _ in range(100):  # about a second, to see the count settle (or go negative)
        running.append(scheduler.stats().running)
        if running[-1] < 0:
            break
        pause.wait(0.01)
    closed = scheduler.close(timeout=3)
    return {
        "running": sorted(set(running)),
        "last": scheduler.stats().running,
        "closed": closed,
        "events": [type(event).__name__ for event in seen[events_before:]],
        "log": log.getvalue()[log_before:],
    }


@pytest.mark.realclock
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("timers", BACKENDS)
@pytest.mark.parametrize("where", ["on_refresh", "get_access_token"])
class TestForkInsideACallback:
    def test_child_counters_events_and_log_stay_clean(self, where: str, timers: Backend) -> None:
        """A child forked inside a callback keeps running at 0 and logs no error or session id."""
        reader, writer = os.pipe()
        log = io.StringIO()
        handler = logging.StreamHandler(log)
        logger = logging.getLogger("token_refresh")
        level = logger.level
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)
        seen: list[events.Event] = []
        forked = threading.Event()
        child: list[int] = []

        def fork_here(scheduler: Scheduler) -> None:
            if child:
                return
            pid = os.fork()
            child.append(pid)
            if pid:
                forked.set()
                return

            def check() -> None:
                try:
                    report = fork_report(scheduler, seen, log)
                    os.write(writer, json.dumps(report).encode())
                finally:
                    os._exit(0)

            threading.Thread(target=check, daemon=True).start()  # the callback returns meanwhile

        def get_access_token() -> str:
            if where == "get_access_token":
                fork_here(scheduler)
            return "token"

        def on_refresh(session_id: str, token: str) -> None:
            if where == "on_refresh":
                fork_here(scheduler)

        scheduler = Scheduler(
            get_access_token,
            on_refresh,
            on_event=seen.append,
            timers=timers,
            label="forker",
        )
        try:
            scheduler.schedule(SESSION, jwt_in(None, 10))  # refreshes at once, on a worker
            assert forked.wait(10), "the callback never forked"
            ready, _, _ = select.select([reader], [], [], 15)
            report = json.loads(os.read(reader, 1 << 20)) if ready else None
        finally:
            if child and child[0]:
                if not ready:
                    os.kill(child[0], 9)
                os.waitpid(child[0], 0)
            os.close(reader)
            os.close(writer)
            logger.removeHandler(handler)
            logger.setLevel(level)
            scheduler.close(timeout=5)
        assert report is not None, "the child reported nothing within 15s"
        problems = [
            f"stats().running went to {min(report['running'])}" * (min(report["running"]) < 0),
            f"stats().running is {report['last']} at the end" * (report["last"] != 0),
            "a CallbackError event" * ("CallbackError" in report["events"]),
            "an 'on_refresh raised' log line" * ("on_refresh raised" in report["log"]),
            "the sk-ant-si- session id in the log" * ("sk-ant-si-" in report["log"]),
        ]
        assert not any(problems), f"{[p for p in problems if p]}: {report}"


# -- 5. Durations that lie: a timedelta whose total_seconds() is NaN or infinite ---------------


class NaNDelta(timedelta):
    """A timedelta whose total_seconds() says NaN."""

    def total_seconds(self) -> float:
        return math.nan


class InfDelta(timedelta):
    """A timedelta whose total_seconds() says infinity."""

    def total_seconds(self) -> float:
        return math.inf


class NegInfDelta(timedelta):
    """A timedelta whose total_seconds() says minus infinity."""

    def total_seconds(self) -> float:
        return -math.inf


LIES = [NaNDelta, InfDelta, NegInfDelta]
START0 = 0.0


class Calls(Recorder):
    """A Recorder for a ManualClock that starts at 0: call times are the clock's own."""

    def _now(self) -> float | None:
        return None if self.clock is None else self.clock.time()


def manual(**options: Any) -> tuple[Scheduler, ManualClock, Recorder]:
    """A scheduler with ``options`` on a ManualClock that starts at 0, and its Recorder."""
    clock = ManualClock(start=START0)
    recorder = Calls(clock)
    scheduler = Scheduler(recorder.get_access_token, recorder.on_refresh, clock=clock, **options)
    return scheduler, clock, recorder


def refresh_buffer_acts(scheduler: Scheduler, clock: ManualClock, recorder: Recorder) -> None:
    scheduler.schedule("s", jwt_in(clock, 3600))
    assert scheduler.refresh_buffer == 100.0
    assert scheduler.next_refresh_at("s") == 3500.0


def retry_delay_acts(scheduler: Scheduler, clock: ManualClock, recorder: Recorder) -> None:
    recorder.tokens = [None]
    scheduler.schedule_from_expires_in("s", 0)  # the floor: 30 s
    clock.advance(30)
    assert scheduler.next_refresh_at("s") == 130.0


def follow_up_interval_acts(scheduler: Scheduler, clock: ManualClock, recorder: Recorder) -> None:
    scheduler.schedule_from_expires_in("s", 0)
    clock.advance(30)
    assert recorder.deliveries
    assert scheduler.next_refresh_at("s") == 130.0


def expires_in_floor_acts(scheduler: Scheduler, clock: ManualClock, recorder: Recorder) -> None:
    scheduler.schedule_from_expires_in("s", 0)
    assert scheduler.next_refresh_at("s") == 100.0


def jitter_acts(scheduler: Scheduler, clock: ManualClock, recorder: Recorder) -> None:
    scheduler.schedule_from_expires_in("s", 3600)
    assert scheduler.next_refresh_at("s") == 3300.0


def fetch_timeout_acts(scheduler: Scheduler, clock: ManualClock, recorder: Recorder) -> None:
    scheduler.schedule_from_expires_in("s", 0)
    clock.advance(30)
    assert [d[1] for d in recorder.deliveries] == ["s"]
    assert scheduler.next_refresh_at("s") == 1830.0


#: Each duration option, the seconds the lying timedelta really holds, and how it must act.
OPTIONS: dict[str, tuple[float, Callable[[Scheduler, ManualClock, Recorder], None]]] = {
    "refresh_buffer": (100, refresh_buffer_acts),
    "retry_delay": (100, retry_delay_acts),
    "follow_up_interval": (100, follow_up_interval_acts),
    "expires_in_floor": (100, expires_in_floor_acts),
    "jitter": (0, jitter_acts),
    "fetch_timeout": (10, fetch_timeout_acts),
}


class TestDurationsThatLie:
    @pytest.mark.parametrize("lie", LIES, ids=lambda lie: lie.__name__)
    @pytest.mark.parametrize("option", list(OPTIONS))
    def test_an_option_is_refused_or_read_for_its_real_value(
        self, option: str, lie: type[timedelta]
    ) -> None:
        """A timedelta subclass whose total_seconds() lies is refused, or read for what it holds."""
        seconds, acts = OPTIONS[option]
        try:
            scheduler, clock, recorder = manual(**{option: lie(seconds=seconds)})
        except ValueError:
            return  # refused: fine
        acts(scheduler, clock, recorder)
        scheduler.close()

    @pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
    @pytest.mark.parametrize("option", [o for o in OPTIONS if o != "fetch_timeout"])
    def test_an_option_that_is_not_finite_is_refused(self, option: str, value: float) -> None:
        """A NaN or infinite duration option is refused with ValueError."""
        with pytest.raises(ValueError, match=r"finite|negative|range"):
            manual(**{option: value})

    @pytest.mark.parametrize(
        "value",
        [
            NaNDelta(seconds=1000),
            InfDelta(seconds=1000),
            NegInfDelta(seconds=1000),
            math.nan,
            math.inf,
            -math.inf,
        ],
    )
    def test_expires_in_is_refused_or_read_and_nothing_is_lost(self, value: object) -> None:
        """A lying or non-finite expires_in is refused with ValueError and the old timer stays."""
        scheduler, clock, recorder = manual()
        scheduler.schedule_from_expires_in("s", 3600)
        try:
            scheduler.schedule_from_expires_in("s", value)  # type: ignore[arg-type]
        except ValueError:
            assert scheduler.sessions() == {"s"}
            assert scheduler.next_refresh_at("s") == 3300.0, "the rejected call lost the timer"
            clock.advance(3300)
            assert [d[:2] for d in recorder.deliveries] == [(3300.0, "s")]
            return
        assert isinstance(value, timedelta), "a non-finite float was accepted"
        assert scheduler.next_refresh_at("s") == 700.0  # the 1000 s the timedelta holds

    @pytest.mark.realclock
    @pytest.mark.parametrize("lie", LIES, ids=lambda lie: lie.__name__)
    @pytest.mark.parametrize("method", ["cancel", "cancel_all", "close"])
    def test_a_wait_is_refused_or_bounded_by_its_real_value(
        self, method: str, lie: type[timedelta]
    ) -> None:
        """A wait given a lying timedelta is refused, or lasts only as long as it really holds."""
        entered, release = threading.Event(), threading.Event()

        def on_refresh(session_id: str, token: str) -> None:
            entered.set()
            release.wait(10)

        scheduler = Scheduler(lambda: "token", on_refresh, label="lying-wait")
        try:
            scheduler.schedule("s", jwt_in(None, 10))  # on_refresh runs at once, and blocks
            assert entered.wait(10)
            timeout = lie(seconds=0.2)
            call: dict[str, Callable[[], bool]] = {
                "cancel": lambda: scheduler.cancel("s", timeout=timeout),
                "cancel_all": lambda: scheduler.cancel_all(timeout=timeout),
                "close": lambda: scheduler.close(timeout=timeout),
            }
            result: list[bool] = []

            def wait() -> None:
                try:
                    result.append(call[method]())
                except ValueError:
                    result.append(False)  # refused: fine

            bounded(wait, 3.0, f"{method}(timeout={lie.__name__}(seconds=0.2))")
            assert result == [False]  # on_refresh still runs
        finally:
            release.set()
            scheduler.close(timeout=5)


# -- 6. Any real number of seconds ------------------------------------------------------------


def real_numbers() -> list[object]:
    values: list[object] = [Fraction(3600), Decimal("3600")]
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy is in the test extra's environment
        return values
    return [*values, numpy.float64(3600)]


class TestRealNumbers:
    @pytest.mark.parametrize("expires_in", real_numbers(), ids=lambda v: type(v).__name__)
    def test_expires_in_takes_any_real_number(self, expires_in: object) -> None:
        """schedule_from_expires_in takes a Fraction, Decimal or numpy float and fires on time."""
        scheduler, clock, recorder = manual()
        scheduler.schedule_from_expires_in("s", expires_in)  # type: ignore[arg-type]
        assert scheduler.next_refresh_at("s") == 3300.0
        clock.advance(3299.999)
        assert recorder.gets == []
        clock.advance(0.001)
        assert recorder.gets == [3300.0]


# -- 7. Events' repr() --------------------------------------------------------------------------


def event_classes() -> list[type[events.Event]]:
    return [
        value
        for value in vars(events).values()
        if isinstance(value, type) and issubclass(value, events.Event)
    ]


def an_event(kind: type[events.Event], session_id: str) -> events.Event:
    samples: dict[str, Any] = {
        "session_id": session_id,
        "label": "test",
        "time": START,
        "due": START,
        "delay": 1.0,
        "reason": "exp",
        "token_fingerprint": "sha256:0123",
        "attempt": 1,
        "max_attempts": 3,
        "error_type": "ValueError",
        "failures": 3,
        "timeout": 60.0,
    }
    fields = {f.name for f in dataclasses.fields(kind)}
    return kind(**{name: value for name, value in samples.items() if name in fields})


class TestEventRepr:
    @pytest.mark.parametrize("kind", event_classes(), ids=lambda kind: kind.__name__)
    def test_repr_fingerprints_a_credential_like_session_id(self, kind: type[events.Event]) -> None:
        """An event's repr() shows a fingerprint of a credential-like session id, never the id."""
        event = an_event(kind, SESSION)
        text = repr(event)
        assert kind.__name__ in text
        assert SESSION not in text, text
        assert "sk-ant-si-" not in text, text
        assert event.session_id == SESSION  # the field itself is the id


# -- 8. ManualClock is exact ------------------------------------------------------------------


class TestManualClockArithmetic:
    @pytest.mark.parametrize("parts", [3, 7, 10])
    def test_advancing_by_fractions_of_a_second_reaches_the_second(self, parts: int) -> None:
        """``parts`` calls of advance(1/parts) fire a timer armed for 1.0 second."""
        clock = ManualClock(start=0.0)
        fired: list[float] = []
        clock.call_later(1.0, lambda: fired.append(clock.monotonic()))
        for _ in range(parts):
            clock.advance(1 / parts)
        assert fired, f"{parts} x advance(1/{parts}) did not reach 1.0"


# -- 9. Exact delays at a realistic epoch ----------------------------------------------------


class TestEpoch:
    def test_a_refresh_due_now_fires_at_a_realistic_epoch(self) -> None:
        """The issue's row: at start=1.8e9 the refresh next_refresh_at promised comes then."""
        clock = ManualClock(start=1_800_000_000.0)
        recorder = Recorder(clock)
        scheduler = Scheduler(
            recorder.get_access_token, recorder.on_refresh, clock=clock, refresh_buffer=1800
        )
        clock.advance(83.099)
        scheduler.schedule("s", make_jwt({"exp": 1_800_000_000 + 2690}))
        assert scheduler.next_refresh_at("s") == 1_800_000_000.0 + 890
        clock.advance(806.901)
        assert clock.time() == 1_800_000_000.0 + 890
        assert len(recorder.gets) == 1, "next_refresh_at() said now, and nothing fired"


Step = tuple[str, int, int]
steps = st.lists(
    st.one_of(
        # exps around now + refresh_buffer: refreshes due within the next minute, or at once
        st.tuples(st.just("jwt"), st.integers(0, 2), st.integers(1799, 1809)),
        st.tuples(st.just("expires_in"), st.integers(0, 2), st.integers(0, 4000)),
        st.tuples(st.just("cancel"), st.integers(0, 2), st.just(0)),
        st.tuples(st.just("advance"), st.just(0), st.integers(0, 2_000)),
        # to a whole second (where a refresh for an integer exp falls due), then k more seconds
        st.tuples(st.just("advance_to_second"), st.just(0), st.integers(0, 10)),
        st.tuples(st.just("fail_next"), st.just(0), st.just(0)),
    ),
    max_size=30,
)


def play(start: float, scenario: list[Step]) -> list[tuple[object, ...]]:
    """Play integer-millisecond steps from ``start``; the calls made, at millisecond offsets."""
    clock = ManualClock(start=start)
    calls: list[tuple[object, ...]] = []
    serial = iter(range(1_000_000))
    failing = [False]
    now_ms = 0  # the steps' own count of time: integer milliseconds since start

    def get_access_token() -> str | None:
        calls.append(("get", round((clock.time() - start) * 1000)))
        if failing[0]:
            failing[0] = False
            return None
        return f"token-{next(serial)}"

    def on_refresh(session_id: str, token: str) -> None:
        calls.append(("deliver", round((clock.time() - start) * 1000), session_id, token))

    scheduler = Scheduler(get_access_token, on_refresh, clock=clock, refresh_buffer=1800)
    for number, (kind, session, amount) in enumerate(scenario):
        calls.append(("step", number))  # a call that comes late lands after the next step
        sid = f"s{session}"
        if kind == "jwt":
            exp = int(start) + now_ms // 1000 + amount + 1  # an integer exp, never 0
            scheduler.schedule(sid, make_jwt({"exp": exp}))
        elif kind == "expires_in":
            scheduler.schedule_from_expires_in(sid, amount)
        elif kind == "cancel":
            scheduler.cancel(sid)
        elif kind in ("advance", "advance_to_second"):
            if kind == "advance_to_second":
                amount = -now_ms % 1000 + amount * 1000
            clock.advance(amount / 1000)
            now_ms += amount
        else:
            failing[0] = True
    scheduler.close()
    return calls


class TestEpochMetamorphic:
    @settings(
        max_examples=300,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(steps)
    @example([("advance", 0, 83_099), ("jwt", 0, 2606), ("advance_to_second", 0, 806)])  # the row
    def test_the_same_steps_make_the_same_calls_at_any_epoch(self, scenario: list[Step]) -> None:
        """Integer-millisecond steps make the same calls at the same offsets at 0 and at 1.8e9."""
        assert play(0.0, scenario) == play(1_800_000_000.0, scenario)
