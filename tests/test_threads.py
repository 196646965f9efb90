"""The threaded guarantees, with real timers and Event handshakes."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable

import pytest

from token_refresh import Scheduler, SchedulerClosedError
from token_refresh._runtime import _SessionAlarm

from conftest import ReraisingThread, make_jwt

pytestmark = [
    pytest.mark.realclock,
    pytest.mark.timeout(30),
    pytest.mark.usefixtures("timer_backend"),
]

WAIT = 10.0  # generous bound for a handshake; a passing test never waits this long


def expiring_in(seconds: float) -> str:
    return make_jwt({"exp": time.time() + seconds})


def our_threads(label: str = "") -> list[threading.Thread]:
    """Threads of schedulers whose label starts with ``label`` (all of them by default)."""
    return [t for t in threading.enumerate() if t.name.startswith(f"token-refresh-{label}")]


def wait_for(event: threading.Event, what: str) -> None:
    assert event.wait(WAIT), f"timed out waiting for {what}"


class Gate:
    """A callback that announces it was entered and blocks until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self) -> None:
        self.entered.set()
        wait_for(self.release, "the gate to open")


class TestRealTimers:
    def test_refresh_happens_on_a_worker_thread(self) -> None:
        """A due token is fetched and delivered on a named daemon worker, not the caller."""
        delivered = threading.Event()
        seen: list[tuple[str, str, str]] = []

        def on_refresh(session_id: str, token: str) -> None:
            seen.append((session_id, token, threading.current_thread().name))
            delivered.set()

        with Scheduler(lambda: "fresh", on_refresh, label="rt", refresh_buffer=0) as sched:
            sched.schedule("s1", expiring_in(0.05))
            wait_for(delivered, "the refresh")
        assert seen[0][:2] == ("s1", "fresh")
        assert seen[0][2].startswith("token-refresh-rt")

    def test_timer_threads_are_named_daemons(self, timer_backend: str) -> None:
        """Timers run on daemon threads named after the label: one per session, or one in all."""
        with Scheduler(lambda: "t", lambda s, t: None, label="named") as sched:
            assert our_threads("named") == []  # nothing until there is something to time
            for n in range(3):
                sched.schedule_from_expires_in(f"s{n}", 3600)
            timers = [t for t in our_threads() if t.name == "token-refresh-named"]
            assert len(timers) == {"thread": 3, "heap": 1}[timer_backend]
            assert all(t.daemon for t in timers)

    def test_close_leaves_no_thread(self) -> None:
        """After close() returns, no thread of the scheduler is alive."""
        delivered = threading.Event()
        sched = Scheduler(lambda: "t", lambda s, t: delivered.set(), label="gone", refresh_buffer=0)
        sched.schedule("now", expiring_in(-1))
        wait_for(delivered, "the refresh")
        for n in range(20):
            sched.schedule_from_expires_in(f"s{n}", 3600)
        sched.close()
        assert [t for t in our_threads() if "gone" in t.name] == []

    def test_close_waits_for_refresh_in_flight(self) -> None:
        """close() returns only after a running get_access_token and on_refresh finished."""
        gate = Gate()
        finished = threading.Event()

        def get_access_token() -> str:
            gate()
            return "t"

        sched = Scheduler(
            get_access_token, lambda s, t: finished.set(), refresh_buffer=0, label="inflight"
        )
        sched.schedule("s1", expiring_in(-1))
        wait_for(gate.entered, "the fetch to start")
        closer = ReraisingThread(sched.close, name="closer")
        closer.start()
        assert not finished.is_set()
        gate.release.set()
        closer.join()
        assert our_threads("inflight") == []

    def test_close_is_idempotent_and_schedule_after_close_raises(self) -> None:
        """close() twice is fine; schedule*() afterwards raises SchedulerClosedError."""
        sched = Scheduler(lambda: "t", lambda s, t: None)
        sched.close()
        sched.close()
        with pytest.raises(SchedulerClosedError, match="closed"):
            sched.schedule("s1", expiring_in(3600))
        with pytest.raises(SchedulerClosedError):
            sched.schedule("s1", "opaque")
        with pytest.raises(SchedulerClosedError):
            sched.schedule_from_expires_in("s1", 3600)
        sched.cancel("s1")
        sched.cancel_all()
        assert isinstance(SchedulerClosedError("x"), RuntimeError)


class TestCancelGuarantee:
    def test_cancel_waits_for_running_on_refresh(self) -> None:
        """cancel() from another thread returns only after the running on_refresh returned."""
        gate = Gate()
        sched = Scheduler(lambda: "t", lambda s, t: gate(), refresh_buffer=0)
        sched.schedule("s1", expiring_in(-1))
        wait_for(gate.entered, "on_refresh to start")
        cancelled = threading.Event()

        def cancel() -> None:
            sched.cancel("s1")
            cancelled.set()

        canceller = ReraisingThread(cancel)
        canceller.start()
        assert not cancelled.wait(0.2)  # bounded check that it is still blocked
        gate.release.set()
        canceller.join()
        assert sched.next_refresh_at("s1") is None  # no follow-up for a cancelled session
        sched.close()

    def test_cancel_all_waits_for_running_on_refresh(self) -> None:
        """cancel_all() waits for every running on_refresh, then nothing is pending."""
        gate = Gate()
        sched = Scheduler(lambda: "t", lambda s, t: gate(), refresh_buffer=0)
        sched.schedule("s1", expiring_in(-1))
        sched.schedule_from_expires_in("s2", 3600)
        wait_for(gate.entered, "on_refresh to start")
        done = threading.Event()

        def cancel_all() -> None:
            sched.cancel_all()
            done.set()

        worker = ReraisingThread(cancel_all)
        worker.start()
        assert not done.wait(0.2)
        gate.release.set()
        worker.join()
        assert repr(sched).endswith("pending=0, closed=False)")
        sched.close()

    def test_cancel_from_inside_on_refresh_does_not_deadlock(self) -> None:
        """A callback may cancel its own session, another one, or all of them."""
        done = threading.Event()
        sched: Scheduler

        def on_refresh(session_id: str, token: str) -> None:
            sched.cancel("other")
            sched.cancel(session_id)
            sched.cancel_all()
            done.set()

        sched = Scheduler(lambda: "t", on_refresh, refresh_buffer=0, label="self-cancel")
        sched.schedule_from_expires_in("other", 3600)
        sched.schedule("s1", expiring_in(-1))
        wait_for(done, "on_refresh to finish")
        sched.close()
        assert our_threads("self-cancel") == []

    def test_close_from_inside_on_refresh_does_not_deadlock(self) -> None:
        """close() from a callback returns without waiting for itself."""
        done = threading.Event()
        sched: Scheduler

        def on_refresh(session_id: str, token: str) -> None:
            sched.close()
            done.set()

        sched = Scheduler(lambda: "t", on_refresh, refresh_buffer=0)
        sched.schedule("s1", expiring_in(-1))
        wait_for(done, "on_refresh to finish")
        sched.close()


class TestOrdering:
    def test_newer_generation_waits_for_older_delivery(self) -> None:
        """A newer token for a session is delivered only after the older on_refresh returned."""
        tokens = iter(["old", "new"])
        gate = Gate()
        log: list[str] = []
        second_done = threading.Event()

        def on_refresh(session_id: str, token: str) -> None:
            log.append(f"start {token}")
            if token == "old":
                gate()
            log.append(f"end {token}")
            if token == "new":
                second_done.set()

        sched = Scheduler(lambda: next(tokens), on_refresh, refresh_buffer=0)
        sched.schedule("s1", expiring_in(-1))
        wait_for(gate.entered, "the first delivery")
        sched.schedule("s1", expiring_in(-2))  # a new generation, refreshed at once
        assert not second_done.wait(0.2)
        gate.release.set()
        wait_for(second_done, "the second delivery")
        assert log == ["start old", "end old", "start new", "end new"]
        sched.close()

    def test_stale_token_is_never_delivered_after_newer(self) -> None:
        """A fetch that was overtaken by a newer schedule() is dropped when it finally returns."""
        first_fetch = Gate()
        calls = 0
        delivered: list[str] = []
        newer = threading.Event()

        def get_access_token() -> str:
            nonlocal calls
            calls += 1
            if calls == 1:
                first_fetch()
                return "stale"
            return "fresh"

        def on_refresh(session_id: str, token: str) -> None:
            delivered.append(token)
            newer.set()

        sched = Scheduler(get_access_token, on_refresh, refresh_buffer=0)
        sched.schedule("s1", expiring_in(-1))
        wait_for(first_fetch.entered, "the first fetch")
        sched.schedule("s1", expiring_in(-1))
        wait_for(newer, "the newer delivery")
        first_fetch.release.set()
        sched.close()
        assert delivered == ["fresh"]


class TestStress:
    def test_hammering_keeps_every_guarantee(self) -> None:
        """Eight threads racing schedule/cancel/cancel_all: no late or overlapping on_refresh."""
        violations: list[str] = []
        active: dict[str, int] = {}
        cancelled: set[str] = set()
        state = threading.Lock()
        deliveries = 0

        def on_refresh(session_id: str, token: str) -> None:
            nonlocal deliveries
            with state:
                deliveries += 1
                if session_id in cancelled:
                    violations.append(f"on_refresh for {session_id} after its cancel returned")
                active[session_id] = active.get(session_id, 0) + 1
                if active[session_id] > 1:
                    violations.append(f"overlapping on_refresh for {session_id}")
            time.sleep(random.random() / 2000)  # widen the window for a race
            with state:
                active[session_id] -= 1

        sched = Scheduler(lambda: "t", on_refresh, refresh_buffer=0, max_workers=4, label="hammer")
        stop = time.monotonic() + 3.0

        def hammer(worker: int) -> Callable[[], None]:
            def run() -> None:
                rng = random.Random(worker)
                own = [f"w{worker}-s{n}" for n in range(5)]
                while time.monotonic() < stop:
                    session = rng.choice(own)
                    action = rng.random()
                    if action < 0.5:
                        with state:
                            cancelled.discard(session)
                        sched.schedule(session, expiring_in(rng.uniform(-0.01, 0.02)))
                    elif action < 0.97:
                        sched.cancel(session)
                        with state:
                            cancelled.add(session)
                    else:
                        sched.cancel_all()

            return run

        workers = [ReraisingThread(hammer(n), name=f"hammer-{n}") for n in range(8)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=20)
        sched.close()
        assert violations == []
        assert deliveries > 100, "the stress test should exercise many deliveries"
        assert our_threads("hammer") == []


class TestProcessExit:
    def test_script_without_close_exits_at_once(self) -> None:
        """A script with a refresh an hour out that never calls close() exits promptly."""
        script = textwrap.dedent(
            """
            import threading
            from token_refresh import Scheduler
            done = threading.Event()
            sched = Scheduler(lambda: "t", lambda s, t: done.set(), refresh_buffer=0)
            sched.schedule_from_expires_in("later", 3600)
            sched.schedule("now", "x.eyJleHAiOjF9.y")  # exp=1: refreshed at once
            assert done.wait(10)
            print("bye")
            """
        )
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=20
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == "bye\n"
        assert time.monotonic() - started < 10


class TestShutdownRaces:
    def test_refresh_refused_by_a_shut_down_pool_is_dropped(
        self, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A refresh that can no longer be submitted (interpreter exiting) is dropped quietly."""
        from token_refresh._runtime import Workers

        monkeypatch.setattr(Workers, "submit", lambda self, job: False)
        caplog.set_level("DEBUG", logger="token_refresh")
        calls: list[str] = []

        def get_access_token() -> str:
            calls.append("get")
            return "t"

        with Scheduler(get_access_token, lambda s, t: None) as sched:
            sched.schedule("s1", expiring_in(-1))
        assert calls == []
        assert "Refresh for sessionId=s1 dropped: shut down" in caplog.text

    def test_refresh_during_interpreter_exit_leaves_no_traceback(self) -> None:
        """A schedule() from an atexit hook exits cleanly, delivered or not."""
        script = textwrap.dedent(
            """
            import atexit
            from token_refresh import Scheduler
            sched = Scheduler(lambda: "t", lambda s, t: print("delivered"))
            atexit.register(lambda: sched.schedule("s1", "x.eyJleHAiOjF9.y"))
            """
        )
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=20
        )
        assert (result.returncode, result.stderr) == (0, "")
        assert result.stdout in ("", "delivered\n")

    def test_label_is_exposed(self) -> None:
        """The label given at construction is readable and shows in the repr."""
        with Scheduler(lambda: "t", lambda s, t: None, label="billing") as sched:
            assert sched.label == "billing"
            assert repr(sched) == "Scheduler(label='billing', pending=0, closed=False)"


class TestRefusedThreads:
    """The thread backend starts a timer's thread outside the scheduler's lock."""

    def test_a_refused_alarm_thread_fails_schedule_and_changes_nothing(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A session's one timer thread starts in schedule(): if the OS refuses it, schedule raises.

        Retries and follow-ups re-use that thread, so no refresh ever needs a
        new one and a chain cannot end for want of a thread half-way.
        """
        calls: list[str] = []

        def refuse(alarm: object) -> None:
            raise RuntimeError("can't start new thread")

        def get_access_token() -> str:
            calls.append("get")
            return "t"

        sched = Scheduler(get_access_token, lambda s, t: None, timers="thread")
        monkeypatch.setattr(_SessionAlarm, "start", refuse)
        with pytest.raises(RuntimeError, match="existing timer is kept"):
            sched.schedule("s1", expiring_in(-1))
        with pytest.raises(RuntimeError, match="existing timer is kept"):
            sched.schedule_from_expires_in("s2", 3600)
        assert sched.sessions() == frozenset()
        assert sched.close(timeout=WAIT)
        assert calls == []
