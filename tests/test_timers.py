"""The timer backends on their own, and jitter."""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import pytest

from token_refresh import Scheduler
from token_refresh import _runtime as runtime
from token_refresh._runtime import HeapTimers, ThreadTimers, Timer, Workers
from token_refresh.testing import ManualClock

from conftest import START, Recorder, make_jwt

WAIT = 10.0


def call_later(timers: HeapTimers, delay: float, callback: Callable[[], None]) -> Timer:
    """Arm and start a timer, as the scheduler does in two steps around its lock."""
    timer = timers.arm(delay, callback)
    timers.start()
    return timer


@pytest.mark.realclock
@pytest.mark.timeout(30)
class TestHeapTimers:
    def test_fires_in_deadline_order(self) -> None:
        """Timers armed out of order fire in deadline order, on one thread."""
        timers = HeapTimers("token-refresh-heap-test")
        fired: list[tuple[str, str]] = []
        done = threading.Event()

        def record(name: str) -> None:
            fired.append((name, threading.current_thread().name))
            if len(fired) == 3:
                done.set()

        call_later(timers, 0.06, lambda: record("third"))
        call_later(timers, 0.02, lambda: record("first"))
        call_later(timers, 0.04, lambda: record("second"))
        assert done.wait(WAIT)
        assert [name for name, _ in fired] == ["first", "second", "third"]
        assert {thread for _, thread in fired} == {"token-refresh-heap-test"}
        for thread in timers.stop():
            thread.join(WAIT)
            assert not thread.is_alive()

    def test_cancelled_timers_never_fire_and_are_compacted(self) -> None:
        """Cancelled timers are skipped, and a heap mostly of cancelled ones is rebuilt."""
        timers = HeapTimers("token-refresh-heap-test")
        fired = threading.Event()
        handles = [call_later(timers, 0.5, fired.set) for _ in range(200)]
        for handle in handles:
            handle.cancel()
            handle.cancel()  # twice is harmless
        assert len(timers._heap) < 200  # rebuilt once more than half was dead
        sentinel = threading.Event()
        call_later(timers, 1.0, sentinel.set)  # after the cancelled ones would have fired
        assert sentinel.wait(WAIT)
        assert not fired.is_set()
        timers.stop()

    def test_a_failing_callback_does_not_stop_the_thread(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """An exception from a callback is logged and later timers still fire."""
        timers = HeapTimers("token-refresh-heap-test")
        later = threading.Event()

        def broken() -> None:
            raise RuntimeError("bug")

        call_later(timers, 0.0, broken)
        call_later(timers, 0.02, later.set)
        assert later.wait(WAIT)
        assert "internal error in a timer or worker thread" in caplog.text
        timers.stop()

    def test_sweep_cancels_each_set_alarm_but_those_kept(self) -> None:
        """sweep() cancels an alarm set for a session nobody lists any more (an interrupted
        call can leave one); the alarms it keeps, and one not set yet, still fire."""
        timers = HeapTimers("token-refresh-heap-test")
        fired: list[object] = []
        last = threading.Event()

        def record(payload: object) -> None:
            fired.append(payload)
            if payload == "set after the sweep":
                last.set()

        left, kept, fresh = timers.alarm(record), timers.alarm(record), timers.alarm(record)
        left.set(0.5, math.inf, "left behind")  # due first: it would fire before the others
        kept.set(0.6, math.inf, "kept")
        timers.sweep([kept])
        fresh.set(0.7, math.inf, "set after the sweep")  # made before the sweep, set after
        assert last.wait(WAIT)
        assert fired == ["kept", "set after the sweep"]
        left.set(0.0, math.inf, "set again")  # a cancelled alarm stays cancelled
        for thread in timers.stop():
            thread.join(WAIT)
        assert fired == ["kept", "set after the sweep"]

    def test_stop_before_any_timer_has_no_thread(self) -> None:
        """The thread starts with the first timer, so stopping an unused backend joins nothing."""
        assert HeapTimers("token-refresh-heap-test").stop() == []

    def test_hundred_thousand_sessions_on_a_few_threads(self) -> None:
        """100,000 pending sessions are held by the heap backend with at most 4 threads."""
        before = threading.active_count()
        sched = Scheduler(lambda: "t", lambda s, t: None, timers="heap", label="many")
        for n in range(100_000):
            sched.schedule_from_expires_in(f"s{n}", 3600)
        assert sched.stats().pending == 100_000
        assert threading.active_count() - before <= 4
        started = time.monotonic()
        assert sched.close(timeout=10)
        assert time.monotonic() - started < 5


class TestTimerBackendOption:
    def test_unknown_backend_is_refused(self) -> None:
        """timers= takes "thread" or "heap"."""
        with pytest.raises(ValueError, match="timers must be 'thread' or 'heap'"):
            Scheduler(lambda: "t", lambda s, t: None, timers="wheel")  # type: ignore[arg-type]

    @pytest.mark.realclock
    @pytest.mark.timeout(30)
    def test_refused_thread_keeps_the_old_timer(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """When the OS refuses the heap thread, schedule() raises and nothing is armed."""

        def refuse(self: threading.Thread) -> None:
            raise RuntimeError("can't start new thread")

        sched = Scheduler(lambda: "t", lambda s, t: None, timers="heap")
        with monkeypatch.context() as patch:
            patch.setattr(threading.Thread, "start", refuse)
            with pytest.raises(RuntimeError, match="cannot arm a refresh timer for session 's1'"):
                sched.schedule_from_expires_in("s1", 3600)
        assert sched.next_refresh_at("s1") is None
        sched.schedule_from_expires_in("s1", 3600)
        assert sched.next_refresh_at("s1") is not None
        assert sched.close(timeout=10)


class TestJitter:
    def test_off_by_default(self, scheduler: Scheduler, clock: ManualClock) -> None:
        """Without jitter, the seed's timings are exact."""
        scheduler.schedule_from_expires_in("s1", 3600)
        assert scheduler.next_refresh_at("s1") == START + 3300

    def test_moves_refreshes_earlier_never_later(
        self, clock: ManualClock, recorder: Recorder
    ) -> None:
        """Each refresh lands up to jitter seconds early, spread out, never late."""
        sched = Scheduler(
            recorder.get_access_token,
            recorder.on_refresh,
            clock=clock,
            jitter=timedelta(minutes=2),
            rng=random.Random(7),
        )
        for n in range(200):
            sched.schedule(f"s{n}", make_jwt({"exp": START + 3600}))
        due = [sched.next_refresh_at(f"s{n}") for n in range(200)]
        offsets = [START + 3300 - d for d in due if d is not None]
        assert len(offsets) == 200
        assert all(0 <= offset <= 120 for offset in offsets)
        assert len({round(offset) for offset in offsets}) > 60  # spread over the window
        clock.advance(3300)
        assert len(recorder.gets) == 200
        follow_ups = [sched.next_refresh_at(f"s{n}") for n in range(200)]
        assert len({f for f in follow_ups if f is not None}) > 100  # follow-ups jittered too

    def test_is_deterministic_with_a_seeded_rng(self, clock: ManualClock) -> None:
        """The same seed gives the same schedule."""

        def schedule_with(seed: int) -> float | None:
            sched = Scheduler(
                lambda: "t", lambda s, t: None, clock=clock, jitter=60, rng=random.Random(seed)
            )
            sched.schedule_from_expires_in("s1", 3600)
            return sched.next_refresh_at("s1")

        assert schedule_with(1) == schedule_with(1)
        assert schedule_with(1) != schedule_with(2)

    def test_never_more_than_half_the_delay(self, clock: ManualClock) -> None:
        """A jitter larger than the delay moves a refresh by at most half of it."""
        sched = Scheduler(lambda: "t", lambda s, t: None, clock=clock, jitter=3600)
        for n in range(100):
            sched.schedule_from_expires_in(f"s{n}", 0)  # the 30-second floor
            due = sched.next_refresh_at(f"s{n}")
            assert due is not None
            assert START + 15 <= due <= START + 30

    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"jitter": -1}, ValueError, "jitter must not be negative"),
            ({"jitter": "1m"}, TypeError, "jitter must be a number"),
            ({"rng": 42}, TypeError, "rng must be a random.Random"),
        ],
    )
    def test_bad_options(
        self, kwargs: dict[str, object], error: type[Exception], match: str
    ) -> None:
        """Bad jitter options are refused at construction."""
        with pytest.raises(error, match=match):
            Scheduler(lambda: "t", lambda s, t: None, **kwargs)  # type: ignore[arg-type]


@pytest.mark.realclock
@pytest.mark.timeout(120)
class TestMemory:
    @pytest.mark.parametrize(("timers", "cycles"), [("heap", 100_000), ("thread", 10_000)])
    def test_flat_over_schedule_cancel_cycles(self, timers: str, cycles: int) -> None:
        """Distinct session ids scheduled and cancelled leave no memory behind."""
        import gc
        import tracemalloc

        label = f"memory-{timers}"
        sched = Scheduler(lambda: "t", lambda s, t: None, timers=timers, label=label)  # type: ignore[arg-type]

        def churn(prefix: str, count: int) -> None:
            for n in range(count):
                session = f"{prefix}-{n}"
                sched.schedule_from_expires_in(session, 3600)
                sched.cancel(session)
            # A cancelled Timer thread ends a moment later, on a loaded machine
            # much later: wait for them, or their objects count as growth. (The
            # heap backend's one thread lives until close().)
            for thread in threading.enumerate():
                if thread.name == f"token-refresh-{label}" and timers == "thread":
                    thread.join(30)

        churn("warm-up", 2_000)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            churn("measured", cycles)
            gc.collect()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        # Coverage's thread tracing keeps a tracer for every thread it saw: not ours.
        ours = [tracemalloc.Filter(False, "*/coverage/*")]
        grown = sum(
            stat.size_diff
            for stat in after.filter_traces(ours).compare_to(before.filter_traces(ours), "filename")
        )
        assert grown < 64 * 1024, f"grew {grown} bytes over {cycles} cycles"
        assert sched.stats().sessions == 0
        assert sched.close(timeout=30)

    def test_a_refresh_leaves_nothing_behind_on_its_timer_thread(self) -> None:
        """On the thread backend, each session's timer thread lives on after it fires; firing
        leaves no object of its own there. (A threading.local touched on each of them left a
        dict and a weakref per session: in a storm of 10,000, the garbage collector's young
        generations ran 5 times as often.)"""
        import gc

        sessions = 200
        delivered: set[str] = set()
        every = threading.Event()

        def on_refresh(session_id: str, token: str) -> None:
            delivered.add(session_id)
            if len(delivered) == sessions:
                every.set()

        # No fetch_timeout: a fetch's watch waits (cancelled) for the watchdog's next look,
        # up to 50 ms after the last refresh; this test counts what the timer threads keep.
        sched = Scheduler(
            lambda: "t", on_refresh, timers="thread", label="memory-fired", fetch_timeout=None
        )
        try:
            # Due in about a second: every timer thread is started and parked first.
            exp = time.time() + sched.refresh_buffer + 1.0
            for n in range(sessions):
                sched.schedule(f"s{n}", make_jwt({"exp": exp}))
            gc.collect()
            before = len(gc.get_objects())
            assert every.wait(30), f"{len(delivered)} of {sessions} delivered"
            assert sched.stats().sessions == sessions  # each re-armed for its follow-up
            gc.collect()
            grown = len(gc.get_objects()) - before
        finally:
            assert sched.close(timeout=30)
        assert grown < sessions / 2, f"{grown} objects more after {sessions} refreshes"


@pytest.mark.realclock
@pytest.mark.timeout(30)
class TestRuntimeEdges:
    def test_a_cancelled_alarm_is_never_set_again(self) -> None:
        """A cancelled alarm ignores set() and its thread ends."""
        timers = ThreadTimers("token-refresh-edge")
        fired = threading.Event()
        alarm = timers.alarm(lambda payload: fired.set())
        alarm.cancel()
        alarm.set(0, time.time(), None)
        for thread in timers.stop():
            thread.join(WAIT)
            assert not thread.is_alive()
        assert not fired.is_set()

    def test_a_fired_alarm_parks_until_set_again(self) -> None:
        """After firing, an alarm's thread waits to be set again, and fires again when it is."""
        timers = ThreadTimers("token-refresh-edge")
        fired: list[object] = []
        first, second = threading.Event(), threading.Event()

        def callback(payload: object) -> None:
            fired.append(payload)
            (first if len(fired) == 1 else second).set()

        alarm = timers.alarm(callback)
        assert isinstance(alarm, runtime._SessionAlarm)
        alarm.set(0, time.time(), "first")
        assert first.wait(WAIT)
        assert not second.is_set()  # parked, not fired again
        alarm.set(0, time.time(), "second")
        assert second.wait(WAIT)
        for thread in timers.stop():
            thread.join(WAIT)
        assert fired == ["first", "second"]

    def test_a_failing_timer_callback_is_logged(self, caplog: pytest.LogCaptureFixture) -> None:
        """A bug in a timer callback is logged by type, not raised into the thread."""
        timers = ThreadTimers("token-refresh-edge")
        done = threading.Event()

        def broken(payload: object) -> None:
            done.set()
            raise RuntimeError("bug sk-ant-si-secret")

        timers.alarm(broken).set(0, time.time(), None)
        assert done.wait(WAIT)
        for thread in timers.stop():
            thread.join(WAIT)
        assert "internal error in a timer or worker thread: RuntimeError" in caplog.text
        assert "sk-ant-si-" not in caplog.text

    def test_refused_heap_thread_raises_from_the_first_set(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The heap's thread starts with its first entry: if the OS refuses it, set() raises."""
        timers = HeapTimers("token-refresh-edge")
        alarm = timers.alarm(lambda payload: None)
        with monkeypatch.context() as patch:
            patch.setattr(threading.Thread, "start", _refuse)
            with pytest.raises(RuntimeError):
                alarm.set(60, time.time() + 60, None)
        assert timers.stop() == []

    def test_workers_survive_a_refused_thread_and_a_failing_job(
        self, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Work queued while the OS refuses threads runs later; a failing job is logged."""
        pool = Workers("token-refresh-edge", max_workers=1, max_stuck=1)
        ran = threading.Event()
        with monkeypatch.context() as patch:
            patch.setattr(threading.Thread, "start", _refuse)
            assert pool.submit(lambda: None)  # queued; no worker could start
        assert pool.abandon(threading.current_thread())  # not one of its workers: nothing to do

        def broken() -> None:
            raise RuntimeError("bug")

        assert pool.submit(broken)
        assert pool.submit(ran.set)
        assert ran.wait(WAIT)
        for thread in pool.close():
            thread.join(WAIT)
        assert "internal error in a timer or worker thread" in caplog.text
        assert not pool.submit(ran.set)


def _refuse(self: threading.Thread) -> None:
    raise RuntimeError("can't start new thread")
