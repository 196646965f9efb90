"""The driver's edges: interrupted calls, bounded waits in signal handlers, alarms, the reaper."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from token_refresh import Scheduler, _runtime, events
from token_refresh._machine import Machine
from token_refresh._report import Reporter
from token_refresh._runtime import HeapTimers, ThreadTimers, _Reaper, _watcher, reaper
from token_refresh._workers import OurThread
from token_refresh.testing import ManualClock, ManualRuntime

from conftest import START, Recorder, make_jwt

WAIT = 10.0


class TestInterrupted:
    def test_an_interrupt_while_committing_a_reschedule_keeps_the_old_refresh(
        self,
        clock: ManualClock,
        recorder: Recorder,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """KeyboardInterrupt before a reschedule is stored leaves the old refresh armed, on time."""
        sched = Scheduler(recorder.get_access_token, recorder.on_refresh, clock=clock)
        sched.schedule_from_expires_in("s1", 600)  # due at 300
        original = Machine.commit

        def interrupted(machine: Machine, step: object) -> None:
            monkeypatch.setattr(Machine, "commit", original)
            raise KeyboardInterrupt

        monkeypatch.setattr(Machine, "commit", interrupted)
        with pytest.raises(KeyboardInterrupt):
            sched.schedule_from_expires_in("s1", 3600)  # would be due at 3300
        assert sched.next_refresh_at("s1") == START + 300
        assert clock.pending == 1
        clock.advance(300)
        assert recorder.deliveries == [(300.0, "s1", "access-token")]

    def test_an_interrupt_while_committing_a_new_session_leaves_no_timer(
        self, clock: ManualClock, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A new session interrupted before it is stored is not listed, and its timer is gone."""
        sched = Scheduler(recorder.get_access_token, recorder.on_refresh, clock=clock)

        def interrupted(machine: Machine, step: object) -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr(Machine, "commit", interrupted)
        with pytest.raises(KeyboardInterrupt):
            sched.schedule_from_expires_in("s1", 600)
        assert sched.sessions() == frozenset()
        assert clock.pending == 0

    def test_an_interrupt_before_an_immediate_refresh_starts_leaves_it_for_now(
        self, clock: ManualClock, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A refresh due at once that an interrupt kept from starting is armed for now instead."""
        sched = Scheduler(
            recorder.get_access_token, recorder.on_refresh, clock=clock, on_event=lambda e: None
        )
        original = Reporter.report

        def interrupted(reporter: Reporter, outcome: str, *args: Any) -> None:
            if outcome == "scheduled_now":
                monkeypatch.setattr(Reporter, "report", original)
                raise KeyboardInterrupt
            original(reporter, outcome, *args)

        monkeypatch.setattr(Reporter, "report", interrupted)
        with pytest.raises(KeyboardInterrupt):
            sched.schedule("s1", make_jwt({"exp": START + 10}))  # within the buffer: at once
        assert recorder.gets == []
        assert sched.next_refresh_at("s1") == START
        clock.advance(0)
        assert recorder.deliveries == [(0.0, "s1", "access-token")]


@pytest.fixture
def held() -> Iterator[list[Scheduler]]:
    """Schedulers whose lock the test holds, as a signal handler's interrupted frame would."""
    schedulers: list[Scheduler] = []
    yield schedulers
    for sched in schedulers:
        assert sched.close(timeout=WAIT)


@pytest.mark.realclock
@pytest.mark.timeout(30)
class TestFromASignalHandler:
    """A handler runs on the main thread, perhaps while that thread holds the scheduler's lock."""

    def _holding(self, held: list[Scheduler]) -> Scheduler:
        sched = Scheduler(lambda: "t", lambda s, t: None, label="signal")
        sched.schedule_from_expires_in("s1", 3600)
        held.append(sched)
        return sched

    @pytest.mark.parametrize("call", ["cancel", "cancel_all", "close"])
    def test_a_wait_for_the_lock_is_bounded_and_the_work_done_after(
        self, held: list[Scheduler], call: str
    ) -> None:
        """Called while its own lock is held, it returns False in time; the work happens later."""
        sched = self._holding(held)
        with sched._lock:
            began = time.monotonic()
            if call == "cancel":
                result = sched.cancel("s1", timeout=0.2)
            else:
                result = getattr(sched, call)(timeout=0.2)
            took = time.monotonic() - began
        assert result is False
        assert took < 5
        done = threading.Event()
        reaper.later(done.set)  # after the work left to the reaper's thread, in order
        assert done.wait(WAIT)
        assert sched.sessions() == frozenset()


class TestAlarms:
    @pytest.mark.realclock
    def test_a_cancelled_alarm_ignores_set_on_every_backend(self) -> None:
        """Setting an alarm after cancel() arms nothing, on all three runtimes."""
        fired: list[object] = []
        clock = ManualClock(start=START)
        heap = HeapTimers("token-refresh-edge")
        threads = ThreadTimers("token-refresh-edge")
        alarms = [
            ManualRuntime(clock).alarm(fired.append),
            heap.alarm(fired.append),
            threads.alarm(fired.append),
        ]
        for alarm in alarms:
            alarm.set(3600, time.time() + 3600, "armed")
            alarm.cancel()
            alarm.cancel()  # twice is harmless
            alarm.set(0, time.time(), "late")
        clock.advance(1)
        for thread in heap.stop() + threads.stop():
            thread.join(WAIT)
        assert fired == []
        assert clock.pending == 0

    @pytest.mark.realclock
    def test_a_stopped_heap_starts_no_thread_again(self) -> None:
        """Setting an alarm of a heap already stopped (its scheduler closed) starts nothing."""
        heap = HeapTimers("token-refresh-stopped")
        assert heap.stop() == []
        fired: list[object] = []
        heap.alarm(fired.append).set(0, time.time(), "late")
        assert heap.stop() == []
        assert fired == []

    def test_a_sweep_spares_alarms_never_set_and_those_kept(self) -> None:
        """sweep() cancels the alarms that were set and are not kept, and nothing else."""
        clock = ManualClock(start=START)
        runtime = ManualRuntime(clock)
        fired: list[object] = []
        fresh, kept, left = (runtime.alarm(fired.append) for _ in range(3))
        kept.set(1, START + 1, "kept")
        left.set(1, START + 1, "left")
        runtime.sweep([kept])
        fresh.set(1, START + 1, "fresh")  # never set before the sweep: still usable
        clock.advance(1)
        assert sorted(map(str, fired)) == ["fresh", "kept"]

    @pytest.mark.realclock
    def test_an_alarm_registers_itself_when_the_watcher_is_busy(self) -> None:
        """A caller never waits for the clock watcher's lock; the timer's thread registers then."""
        threads = ThreadTimers("token-refresh-busy")
        heap = HeapTimers("token-refresh-busy")
        fired, heap_fired = threading.Event(), threading.Event()
        try:
            with _watcher._lock:  # busy, as if another thread were registering
                # Neither call waits for the lock (else this test would hang here).
                alarm = threads.alarm(lambda payload: fired.set())
                alarm.set(0, time.time(), None)
                heap.alarm(lambda payload: heap_fired.set()).set(0, time.time(), None)
                later = heap.alarm(lambda payload: None)
                later.set(3600, time.time() + 3600, None)  # keeps the heap, so it stays watched
                assert threads._watched is False  # the caller could not register it
            # Each thread registers before it fires anything.
            assert fired.wait(WAIT)
            assert heap_fired.wait(WAIT)
            assert threads in set(_watcher._watched)
            assert heap in set(_watcher._watched)
            alarm.cancel()
        finally:
            for thread in heap.stop() + threads.stop():
                thread.join(WAIT)

    @pytest.mark.realclock
    def test_a_refused_watchdog_thread_leaves_the_call_unbounded(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """If no thread can watch a fetch for its timeout, the fetch still runs and delivers."""
        delivered = threading.Event()
        sched = Scheduler(lambda: "t", lambda s, t: delivered.set(), fetch_timeout=30)
        start = threading.Thread.start

        def refuse_the_watchdog(thread: threading.Thread) -> None:
            if thread.name.endswith("-watchdog"):
                raise RuntimeError("can't start new thread")
            start(thread)

        monkeypatch.setattr(threading.Thread, "start", refuse_the_watchdog)
        try:
            sched.schedule("s1", make_jwt({"exp": time.time() - 1}))  # refreshed at once
            assert delivered.wait(WAIT)
        finally:
            monkeypatch.undo()
            assert sched.close(timeout=WAIT)


def _refuse(*args: object) -> None:
    raise RuntimeError("can't start new thread")


class TestReporter:
    def test_a_failing_clock_cannot_break_the_flow(self, caplog: pytest.LogCaptureFixture) -> None:
        """An event that cannot be built is logged by type, and nothing raises."""

        def broken_clock() -> float:
            raise OSError("clock")

        seen: list[events.Event] = []
        reporter = Reporter("edge", broken_clock, seen.append)
        caplog.set_level(logging.ERROR, logger="token_refresh")
        reporter.report("cancelled", "s1", {}, _nothing_held)
        assert seen == []
        assert "on_event raised OSError" in caplog.text


def _nothing_held() -> _Nothing:
    return _Nothing()


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        return None


@pytest.mark.realclock
@pytest.mark.timeout(30)
class TestReaper:
    def test_it_runs_work_logs_failures_by_type_and_ends_when_nothing_is_open(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Work put from anywhere runs on its thread; a failure is logged by type; then it ends."""
        reaper = _Reaper()
        open_ = [True]
        done = threading.Event()

        def failing() -> None:
            raise ValueError("sk-ant-si-secret")

        reaper.ensure(lambda: open_[0])
        thread = reaper._thread
        assert thread is not None
        reaper.ensure(lambda: open_[0])  # running: no second thread
        assert reaper._thread is thread
        reaper.later(failing)
        reaper.later(done.set)
        assert done.wait(WAIT)
        open_[0] = False
        reaper.later(done.clear)  # two at once: the first look sees more to do
        reaper.wake()
        thread.join(WAIT)
        assert not thread.is_alive()
        assert not done.is_set()
        assert "internal error in a timer or worker thread: ValueError" in caplog.text
        assert "sk-ant-si-" not in caplog.text

    def test_a_thread_replaced_meanwhile_is_left_in_place(self) -> None:
        """An ending thread clears only its own place: a newer one started meanwhile stays."""
        reaper = _Reaper()
        reaper.ensure(lambda: False)
        thread = reaper._thread
        assert thread is not None
        newer = threading.Thread(target=lambda: None)
        reaper._thread = newer
        reaper.wake()
        reaper.wake()  # more to do at its last look: it goes on, leaving the newer in place
        thread.join(WAIT)
        assert reaper._thread is newer

    def test_a_thread_ended_by_an_error_is_replaced_at_the_next_ensure(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A bug that ends its thread is logged by type; the next ensure() starts another."""
        reaper = _Reaper()
        calls = [0]

        def live() -> bool:
            calls[0] += 1
            raise RuntimeError("a bug, sk-ant-si-secret")

        reaper.ensure(live)
        thread = reaper._thread
        assert thread is not None
        reaper.wake()
        thread.join(WAIT)
        assert not thread.is_alive()
        assert calls[0] == 1
        assert "internal error in a timer or worker thread: RuntimeError" in caplog.text
        assert "sk-ant-si-" not in caplog.text
        reaper.ensure(lambda: False)
        started: threading.Thread | None = reaper._thread
        assert started is not None
        assert started is not thread
        assert started.is_alive()
        reaper.wake()
        started.join(WAIT)

    def test_a_thread_the_os_refuses_is_tried_again(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """ensure() raises while the OS refuses a thread, and starts one once it allows it."""
        reaper = _Reaper()

        def refused(self: threading.Thread) -> None:
            raise RuntimeError("can't start new thread")

        with monkeypatch.context() as patch:
            patch.setattr(threading.Thread, "start", refused)
            with pytest.raises(RuntimeError, match="can't start new thread"):
                reaper.ensure(lambda: False)
        reaper.ensure(lambda: False)
        thread: threading.Thread | None = reaper._thread
        assert thread is not None
        assert thread.is_alive()
        reaper.wake()
        thread.join(WAIT)

    def test_a_start_interrupted_after_the_thread_began_keeps_that_thread(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A signal handler raising inside Thread.start() (the OS had started the thread):
        the next ensure() sees it running and starts no second one, which nothing would
        ever wake to end."""
        reaper = _Reaper()
        started: list[threading.Thread] = []

        class Interrupted(OurThread):
            def start(self) -> None:
                super().start()
                started.append(self)
                if len(started) == 1:
                    raise KeyboardInterrupt

        open_ = [True]
        monkeypatch.setattr(_runtime, "OurThread", Interrupted)
        with pytest.raises(KeyboardInterrupt):
            reaper.ensure(lambda: open_[0])
        reaper.ensure(lambda: open_[0])
        assert len(started) == 1
        assert reaper._thread is started[0]
        open_[0] = False
        reaper.wake()
        started[0].join(WAIT)
        assert not started[0].is_alive()

    def test_a_thread_started_during_the_last_look_leaves_the_queue_to_it(self) -> None:
        """A scheduler made while the thread takes its last look before ending starts a
        second thread; the first ends, so one is left, and it ends with the last scheduler."""
        reaper = _Reaper()
        open_ = [True]
        at_last_look, go_on = threading.Event(), threading.Event()
        first: list[threading.Thread] = []

        def live() -> bool:
            ours = threading.current_thread() in first and not at_last_look.is_set()
            if ours and not open_[0] and reaper._thread is None:  # the place cleared: last look
                at_last_look.set()
                assert go_on.wait(WAIT)
                return True  # the scheduler made meanwhile is open
            return open_[0]

        reaper.ensure(live)
        assert reaper._thread is not None
        first.append(reaper._thread)
        open_[0] = False
        reaper.wake()
        assert at_last_look.wait(WAIT)
        open_[0] = True
        reaper.ensure(live)  # the place is free: a second thread
        second = reaper._thread
        assert second is not None
        assert second is not first[0]
        go_on.set()
        first[0].join(WAIT)
        assert not first[0].is_alive()
        assert reaper._thread is second
        open_[0] = False
        reaper.wake()
        second.join(WAIT)
        assert not second.is_alive()

    def test_a_close_left_to_it_runs_though_the_last_other_scheduler_closes_meanwhile(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """close() from a signal handler that interrupted the scheduler's own lock hands
        the work over while the scheduler still counts as open: the thread cannot end
        between the two, even when another scheduler's close() wakes it right then."""
        a = Scheduler(lambda: "t", lambda s, t: None, label="left-a")
        b = Scheduler(lambda: "t", lambda s, t: None, label="left-b")
        a.schedule_from_expires_in("s", 3600)
        b.schedule_from_expires_in("s", 3600)
        thread = reaper._thread
        assert thread is not None
        shut = threading.Event()

        def shut_and_say() -> None:
            Scheduler._shut(a)
            shut.set()

        monkeypatch.setattr(a, "_shut", shut_and_say)
        handed = reaper.later

        def later_after_a_switch(work: Any) -> None:
            if work is shut_and_say:
                b.close(WAIT)  # another thread closes the last other scheduler...
                thread.join(1.0)  # ...and the reaper's thread ends, if it may
            handed(work)

        monkeypatch.setattr(reaper, "later", later_after_a_switch)
        try:
            with a._lock:  # the frame the signal handler interrupted holds it
                assert a.close(timeout=0.1) is False
            monkeypatch.setattr(reaper, "later", handed)
            assert shut.wait(WAIT), "close() left to the reaper never ran"
            assert a.sessions() == frozenset()
        finally:  # on failure, a new scheduler's thread runs what was left
            other = Scheduler(lambda: "t", lambda s, t: None, label="left-c")
            other.schedule_from_expires_in("s", 3600)
            other.close(WAIT)


class TestWatcherRegistration:
    def test_an_alarm_added_while_the_last_one_ends_is_watched_again(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """If an alarm comes while the last one's thread leaves the watcher, it registers again."""
        threads = ThreadTimers("token-refresh-race")
        threads._live, threads._watched = 1, True
        original = _watcher.discard

        def discard_while_an_alarm_comes(watched: Any) -> None:
            original(watched)
            threads._live += 1  # as ThreadTimers.add() on a caller's thread, meanwhile

        monkeypatch.setattr(_watcher, "discard", discard_while_an_alarm_comes)
        threads.finished()
        assert threads._watched is True
        assert threads in set(_watcher._watched)
        monkeypatch.undo()
        threads.finished()  # the one that came ends too
        assert threads not in set(_watcher._watched)
