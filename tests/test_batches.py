"""The heap backend's storm path: batches, the stall hand-over, and the watchdog."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable

import pytest

from token_refresh import Scheduler, _workers
from token_refresh._runtime import HeapTimers, Watchdog, Workers

from conftest import make_jwt

WAIT = 10.0

pytestmark = [pytest.mark.realclock, pytest.mark.timeout(30)]


def _due_together(
    heap: HeapTimers, pool: Workers, job: Callable[[int], None], count: int
) -> threading.Event:
    """Arm ``count`` timers due now, each submitting ``job(n)``, and start the heap; the
    first waits for the returned gate, so every timer is due by the time it goes on."""
    gate = threading.Event()

    def fire(n: int) -> None:
        if n == 0:
            assert gate.wait(WAIT)
        pool.submit(lambda: job(n))

    for n in range(count):
        heap.arm(0.0, functools.partial(fire, n))
    heap.start()
    return gate


class TestBatches:
    def test_a_hung_refresh_does_not_hold_up_the_rest_of_its_batch(self) -> None:
        """Sessions due together go to the workers as one batch; one hung fetch keeps no other
        from being delivered (the batch goes to another worker after a short bound)."""
        release, first_in = threading.Event(), threading.Event()
        delivered: set[str] = set()
        all_others = threading.Event()
        sessions = [f"s{i:02}" for i in range(40)]

        def get_access_token() -> str:
            from token_refresh import current_session_id

            if current_session_id() == "s00":
                first_in.set()
                assert release.wait(WAIT)
            return "tok"

        def on_refresh(session_id: str, token: str) -> None:
            delivered.add(session_id)
            if delivered >= set(sessions[1:]):
                all_others.set()

        sched = Scheduler(
            get_access_token, on_refresh, timers="heap", refresh_buffer=0, max_workers=2
        )
        try:
            exp = int(time.time()) + 2  # every session due at the same instant
            for session_id in sessions:  # s00 first: the first of its batch
                sched.schedule(session_id, make_jwt({"exp": exp}))
            assert first_in.wait(WAIT)
            assert all_others.wait(WAIT), f"{len(delivered)} of 39 delivered"
            assert "s00" not in delivered  # still hung
            release.set()
        finally:
            release.set()
            assert sched.close(timeout=WAIT)

    def test_due_timers_are_handed_over_in_one_batch(self) -> None:
        """What the callbacks of timers due together submit reaches one worker as one job."""
        pool = Workers("token-refresh-batch-test", max_workers=4, max_stuck=1)
        heap = HeapTimers("token-refresh-batch-test", workers=pool)
        ran: list[str] = []
        done = threading.Event()
        gate = threading.Event()

        def job(n: int) -> None:
            ran.append(threading.current_thread().name)
            if n == 9:
                done.set()

        def fire(n: int) -> None:
            assert gate.wait(WAIT)
            pool.submit(lambda: job(n))

        try:
            for n in range(10):
                heap.arm(0.0, functools.partial(fire, n))
            gate.set()
            heap.start()
            assert done.wait(WAIT)
            assert len(ran) == 10
            assert len(set(ran)) == 1  # drained by one worker, no hand-off between jobs
        finally:
            for thread in heap.stop() + pool.close():
                thread.join(WAIT)

    def test_a_stuck_job_hands_the_rest_of_its_batch_to_another_worker(self) -> None:
        """A batch whose worker is stuck in one job is drained by another worker meanwhile."""
        dog = Watchdog("token-refresh-batch-test-watchdog")
        pool = Workers("token-refresh-batch-test", max_workers=2, max_stuck=1, watchdog=dog)
        heap = HeapTimers("token-refresh-batch-test", workers=pool)
        release, rest = threading.Event(), threading.Event()
        workers: dict[int, str] = {}

        def job(n: int) -> None:
            workers[n] = threading.current_thread().name
            if n == 0:
                assert release.wait(WAIT)
            elif len(workers) == 10:
                rest.set()

        try:
            _due_together(heap, pool, job, 10).set()
            assert rest.wait(WAIT)  # jobs 1-9 ran while job 0 was stuck
            assert not release.is_set()
        finally:
            release.set()
            for thread in heap.stop() + pool.close() + dog.stop():
                thread.join(WAIT)

    def test_a_worker_back_from_a_stalled_job_leaves_the_rest_to_the_one_that_joined(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Once a stuck job returns, its worker stops draining while another drains: two
        drainers would contend for every lock, and beside a CPU-bound thread a storm with
        one slow token request fell behind for good."""
        # Long enough that the joined worker, waiting a moment in job 1, never looks stuck.
        monkeypatch.setattr(_workers, "_STALLED", 0.3)
        dog = Watchdog("token-refresh-batch-test-watchdog")
        pool = Workers("token-refresh-batch-test", max_workers=2, max_stuck=1, watchdog=dog)
        heap = HeapTimers("token-refresh-batch-test", workers=pool)
        release, joined_in, back = (threading.Event() for _ in range(3))
        rest = threading.Event()
        workers: dict[int, int] = {}  # job -> the thread that ran it
        after_back: dict[int, int] = {}

        def job(n: int) -> None:
            me = threading.get_ident()
            workers[n] = me
            if back.is_set():
                after_back[n] = me
            if n == 0:
                assert release.wait(WAIT)  # stuck: after _STALLED another worker joins
                back.set()
            elif n == 1:
                joined_in.set()
                assert back.wait(WAIT)  # the rest starts once job 0's worker is back
            if len(workers) == 40:
                rest.set()

        try:
            _due_together(heap, pool, job, 40).set()
            assert joined_in.wait(WAIT)
            release.set()
            assert rest.wait(WAIT)
            assert workers[0] != workers[1]
            assert len(after_back) >= 38  # jobs 2-39
            assert set(after_back.values()) == {workers[1]}
        finally:
            release.set()
            back.set()
            for thread in heap.stop() + pool.close() + dog.stop():
                thread.join(WAIT)

    def test_hand_overs_before_the_woken_worker_begins_wake_no_other(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Work handed over while the worker woken for the backlog has not begun yet (it waits
        for the GIL beside a busy thread, or finishes other work) wakes no other: idle
        workers do not drain beside it, so the jobs run one after another, in order."""
        monkeypatch.setattr(_workers, "_STALLED", 30.0)  # no job looks stuck here
        dog = Watchdog("token-refresh-batch-test-watchdog")
        pool = Workers("token-refresh-batch-test", max_workers=4, max_stuck=1, watchdog=dog)
        release = threading.Event()
        started = threading.Semaphore(0)
        second_began = threading.Event()
        ran: list[tuple[int, int]] = []  # (job, thread)
        last = threading.Event()

        def blocker() -> None:
            started.release()
            assert release.wait(WAIT)

        def job(n: int) -> None:
            ran.append((n, threading.get_ident()))
            if n == 0:
                # Another drainer would begin job 1 meanwhile (a bounded look).
                second_began.wait(0.2)
            elif n == 1:
                second_began.set()
            elif n == 9:
                last.set()

        try:
            for _ in range(4):  # every worker busy: a woken drainer cannot begin yet
                pool.submit(blocker)
            for _ in range(4):
                assert started.acquire(timeout=WAIT)
            for n in range(10):
                pool.gather()
                pool.submit(functools.partial(job, n))
                pool.hand_over()
            release.set()
            assert last.wait(WAIT)
            assert [n for n, _ in ran] == list(range(10))
            assert len({thread for _, thread in ran}) == 1  # one drainer ran them all
        finally:
            release.set()
            for thread in pool.close() + dog.stop():
                thread.join(WAIT)

    def test_timers_that_submit_nothing_or_fail_hand_over_nothing(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A due timer that submits no work, or raises, leaves no batch; a job that raises
        inside a batch is logged by type and the batch goes on."""
        caplog.set_level(logging.ERROR, logger="token_refresh")
        pool = Workers("token-refresh-batch-test", max_workers=1, max_stuck=1)
        heap = HeapTimers("token-refresh-batch-test", workers=pool)
        after = threading.Event()

        def broken() -> None:
            raise RuntimeError("sk-ant-si-secret")

        def submits_broken_then_more() -> None:
            pool.submit(broken)
            pool.submit(after.set)

        nothing = threading.Event()
        try:
            heap.arm(0.0, nothing.set)  # submits nothing
            heap.start()
            assert nothing.wait(WAIT)
            heap.arm(0.0, broken)  # raises on the heap's thread
            heap.arm(0.0, submits_broken_then_more)
            assert after.wait(WAIT)
        finally:
            for thread in heap.stop() + pool.close():
                thread.join(WAIT)
        errors = [r.getMessage() for r in caplog.records]
        assert (
            errors.count("[token_refresh] internal error in a timer or worker thread: RuntimeError")
            == 2
        )
        assert "sk-ant-si-" not in caplog.text

    def test_a_closed_pool_drops_the_rest_of_a_batch(self) -> None:
        """Once the pool is closed, the backlog being run runs no further job."""
        pool = Workers("token-refresh-batch-test", max_workers=1, max_stuck=1)
        inside, release = threading.Event(), threading.Event()
        ran: list[int] = []

        def first() -> None:
            inside.set()
            assert release.wait(WAIT)

        pool.gather()
        pool.submit(first)
        pool.submit(lambda: ran.append(2))
        pool.hand_over()
        assert inside.wait(WAIT)
        assert pool.backlog(time.monotonic())  # the second job waits
        threads = pool.close()
        assert not pool.backlog(time.monotonic())  # closed: nothing waits any more
        release.set()
        for thread in threads:
            thread.join(WAIT)
        assert ran == []


class TestWatchdog:
    def test_calls_past_their_deadline_are_called_back_and_others_not(self) -> None:
        """Only a watch not cancelled by its deadline calls back; watches made later end later
        and wake nobody."""
        dog = Watchdog("token-refresh-watchdog-test")
        fired = threading.Event()
        called: list[str] = []
        try:
            for _ in range(50):
                watch = dog.watch(0.2, lambda: called.append("cancelled one"))
                assert watch is not None
                watch.cancel()

            def hung() -> None:
                called.append("hung")
                fired.set()

            assert dog.watch(0.2, hung) is not None
            assert fired.wait(WAIT)
            # After a quiet spell it sleeps until woken again, and a new watch still fires.
            again = threading.Event()
            assert dog.watch(0.05, again.set) is not None
            assert again.wait(WAIT)
        finally:
            for thread in dog.stop():
                thread.join(WAIT)
        assert called == ["hung"]

    def test_a_sooner_deadline_wakes_it(self) -> None:
        """A watch with a shorter timeout than those it sleeps on is called back in time."""
        dog = Watchdog("token-refresh-watchdog-test")
        soon = threading.Event()
        try:
            assert dog.watch(600.0, lambda: None) is not None
            assert dog.watch(0.05, soon.set) is not None
            assert soon.wait(WAIT)
        finally:
            for thread in dog.stop():
                thread.join(WAIT)

    def test_a_refused_thread_leaves_calls_unwatched(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """If the OS refuses the watchdog's thread, watch() says so (None) and stop() has
        nothing to join."""
        dog = Watchdog("token-refresh-watchdog-test")

        def refuse(self: threading.Thread) -> None:
            raise RuntimeError("can't start new thread")

        monkeypatch.setattr(threading.Thread, "start", refuse)
        assert dog.watch(1.0, lambda: None) is None
        monkeypatch.undo()
        assert dog.stop() == []

    def test_a_failing_callback_is_logged_and_the_watchdog_goes_on(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        dog = Watchdog("token-refresh-watchdog-test")
        after = threading.Event()

        def broken() -> None:
            raise ValueError("sk-ant-si-secret")

        try:
            dog.watch(0.0, broken)
            dog.watch(0.01, after.set)
            assert after.wait(WAIT)
        finally:
            for thread in dog.stop():
                thread.join(WAIT)
        assert "internal error in a timer or worker thread: ValueError" in caplog.text
        assert "sk-ant-si-" not in caplog.text
