"""Time that jumps: suspends, wall-clock steps, exact ManualClock sums, and the delay floors."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import pytest

from token_refresh import Scheduler, events, testing
from token_refresh import _runtime as runtime
from token_refresh.testing import ManualClock

from conftest import START, Recorder, make_jwt

HOUR = 3600.0
KINDS = ["exp", "expires_in", "retry", "follow_up"]


def arm(kind: str, scheduler: Scheduler, recorder: Recorder, clock: ManualClock) -> float:
    """Give session "s" a pending refresh of this kind (default options); return its delay."""
    if kind == "exp":
        scheduler.schedule("s", make_jwt({"exp": clock.time() + 1300}))  # buffer 300
        return 1000.0
    if kind == "expires_in":
        scheduler.schedule_from_expires_in("s", 1300)
        return 1000.0
    if kind == "retry":
        recorder.tokens = [None]  # the immediate refresh fails: a retry in 60 s
    scheduler.schedule("s", make_jwt({"exp": clock.time() - 1}))
    return 60.0 if kind == "retry" else 1800.0


class TestExactManualClock:
    @pytest.mark.parametrize(
        ("steps", "delay"),
        [([0.1] * 10, 1.0), ([0.1] * 300, 30.0), ([0.7, 0.2, 0.1], 1.0), ([0.01] * 1000, 10.0)],
    )
    def test_advances_that_sum_to_the_delay_fire_it(
        self, clock: ManualClock, steps: list[float], delay: float
    ) -> None:
        """Any run of advance() calls summing to a timer's delay fires it, at that time."""
        fired: list[float] = []
        clock.call_later(delay, lambda: fired.append(clock.time()))
        for step in steps[:-1]:
            clock.advance(step)
        assert fired == []
        clock.advance(steps[-1])
        assert fired == [START + delay]
        assert clock.time() == START + delay

    def test_three_hundred_tenths_refresh_at_the_expires_in_floor(
        self, scheduler: Scheduler, clock: ManualClock, recorder: Recorder
    ) -> None:
        """300 advance(0.1) reach a refresh armed on the 30 s expires_in floor."""
        scheduler.schedule_from_expires_in("s", 0)
        for _ in range(300):
            clock.advance(0.1)
        assert recorder.gets == [30.0]

    def test_due_keyword_fires_before_the_delay(self, clock: ManualClock) -> None:
        """call_later(..., due=) runs at the wall due time if that comes before the delay."""
        fired: list[float] = []
        clock.call_later(100, lambda: fired.append(clock.time()), due=START + 10)
        clock.advance(10)
        assert fired == [START + 10]

    def test_suspend_moves_the_wall_clock_only_and_runs_nothing(self, clock: ManualClock) -> None:
        """suspend() moves time() and not monotonic(); what fell due waits for advance()."""
        fired: list[str] = []
        clock.call_later(60, lambda: fired.append("a"))
        clock.suspend(HOUR)
        assert (clock.time(), clock.monotonic()) == (START + HOUR, START)
        assert fired == []
        assert clock.pending == 1
        clock.advance(0)
        assert fired == ["a"]
        assert clock.time() == START + HOUR

    def test_what_fell_due_runs_in_due_order(self, clock: ManualClock) -> None:
        """After a suspend, overdue timers run in the order of their due times, then the rest."""
        fired: list[tuple[str, float]] = []

        def record(label: str) -> Callable[[], None]:
            return lambda: fired.append((label, clock.time() - START))

        clock.call_later(300, record("c"))
        clock.call_later(100, record("a"))
        clock.call_later(200, record("b"))
        clock.call_later(5000, record("later"))
        clock.suspend(1000)
        clock.advance(4000)
        assert fired == [("a", 1000), ("b", 1000), ("c", 1000), ("later", 5000)]

    def test_step_back_delays_nothing(self, clock: ManualClock) -> None:
        """A wall clock stepped back leaves the monotonic deadline in force."""
        fired: list[float] = []
        clock.call_later(60, lambda: fired.append(clock.monotonic() - START))
        clock.step(-HOUR)
        assert clock.time() == START - HOUR
        clock.advance(59.9)
        assert fired == []
        clock.advance(0.1)
        assert fired == [60.0]

    def test_bad_jumps_are_refused(self, clock: ManualClock) -> None:
        """suspend() takes no negative time; neither jump takes a non-finite one or runs nested."""
        with pytest.raises(ValueError, match="must not be negative"):
            clock.suspend(-1)
        with pytest.raises(ValueError, match="must be finite"):
            clock.step(float("inf"))
        with pytest.raises(TypeError, match="must be a number"):
            clock.step("1")  # type: ignore[arg-type]
        errors: list[BaseException] = []

        def jump() -> None:
            try:
                clock.suspend(1)
            except RuntimeError as error:
                errors.append(error)

        clock.call_later(0, jump)
        clock.advance(0)
        assert "cannot be called from inside a timer callback" in str(errors[0])
        assert clock.time() == START


@pytest.mark.parametrize("kind", KINDS)
class TestJumpsOnEveryTimer:
    def test_suspend_past_due_refreshes_at_the_next_advance(
        self, scheduler: Scheduler, clock: ManualClock, recorder: Recorder, kind: str
    ) -> None:
        """A suspend past the due time refreshes at the next advance(0), not a delay later."""
        delay = arm(kind, scheduler, recorder, clock)
        due = clock.time() + delay
        assert scheduler.next_refresh_at("s") == due
        before = len(recorder.gets)
        clock.suspend(delay + HOUR)
        assert len(recorder.gets) == before  # nothing runs during a suspend
        assert scheduler.next_refresh_at("s") == due  # overdue: it comes now
        clock.advance(0)
        assert recorder.gets[before:] == [clock.time() - START]

    def test_suspend_short_of_due_refreshes_at_the_due_time(
        self, scheduler: Scheduler, clock: ManualClock, recorder: Recorder, kind: str
    ) -> None:
        """After a suspend of half the delay, the refresh comes at the wall due time."""
        delay = arm(kind, scheduler, recorder, clock)
        due = clock.time() + delay
        before = len(recorder.gets)
        clock.suspend(delay / 2)
        assert scheduler.next_refresh_at("s") == due
        clock.advance(delay / 2 - 1)
        assert len(recorder.gets) == before
        clock.advance(1)
        assert recorder.gets[before:] == [due - START]

    def test_step_forward_past_due_refreshes_at_the_next_advance(
        self, scheduler: Scheduler, clock: ManualClock, recorder: Recorder, kind: str
    ) -> None:
        """A wall clock stepped forward past the due time refreshes at the next advance(0)."""
        delay = arm(kind, scheduler, recorder, clock)
        before = len(recorder.gets)
        clock.step(delay + 1)
        assert len(recorder.gets) == before
        clock.advance(0)
        assert recorder.gets[before:] == [clock.time() - START]
        assert scheduler.next_refresh_at("s") is not None  # the chain goes on

    def test_step_back_refreshes_after_the_delay(
        self, scheduler: Scheduler, clock: ManualClock, recorder: Recorder, kind: str
    ) -> None:
        """A wall clock stepped back an hour still refreshes after the delay, and says so."""
        delay = arm(kind, scheduler, recorder, clock)
        due = clock.time() + delay
        before = len(recorder.gets)
        clock.step(-HOUR)
        assert scheduler.next_refresh_at("s") == due - HOUR
        clock.advance(delay - 1)
        assert len(recorder.gets) == before
        clock.advance(1)
        assert recorder.gets[before:] == [due - HOUR - START]

    def test_a_step_back_within_a_second_is_drift_as_on_real_clocks(
        self, scheduler: Scheduler, clock: ManualClock, recorder: Recorder, kind: str
    ) -> None:
        """next_refresh_at() reads the real clocks' drift (a second or less) as no step:
        the same answer on a ManualClock; the refresh still comes after the delay."""
        delay = arm(kind, scheduler, recorder, clock)
        due = clock.time() + delay
        before = len(recorder.gets)
        clock.step(-0.5)
        assert scheduler.next_refresh_at("s") == due
        clock.step(-1)
        assert scheduler.next_refresh_at("s") == due - 1.5
        clock.advance(delay - 1)
        assert len(recorder.gets) == before
        clock.advance(1)
        assert recorder.gets[before:] == [due - 1.5 - START]


class TestAdvanceAlwaysReturns:
    def test_a_timer_rearming_itself_for_now_raises(
        self, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A callback that re-arms itself for now makes advance() raise, not spin for ever."""
        monkeypatch.setattr(testing, "_LOOP_LIMIT", 1000)

        def again() -> None:
            clock.call_later(0, again)

        clock.call_later(1, again)
        with pytest.raises(RuntimeError, match="more than 1,000 timers ran at one instant"):
            clock.advance(1)
        assert clock.time() == START + 1

    def test_work_queueing_itself_raises(
        self, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Work that queues itself again with run_soon() raises, and the clock stays usable."""
        monkeypatch.setattr(testing, "_LOOP_LIMIT", 1000)

        def again() -> None:
            clock.run_soon(again)

        with pytest.raises(RuntimeError, match="pieces of work queued one another"):
            clock.run_soon(again)
        fired: list[float] = []
        clock.call_later(1, lambda: fired.append(clock.time()))
        clock.advance(1)
        assert fired == [START + 1]


class TestSlowWallClockAtSchedule:
    def test_clock_an_hour_slow_then_stepped_refreshes_before_expiry(
        self, clock: ManualClock, recorder: Recorder
    ) -> None:
        """Scheduled with the wall clock an hour slow, then set: refreshed before exp."""
        seen: list[events.Event] = []
        with Scheduler(
            recorder.get_access_token,
            recorder.on_refresh,
            clock=clock,
            refresh_buffer=10,
            on_event=seen.append,
        ) as sched:
            clock.step(-HOUR)  # before NTP syncs
            sched.schedule("s", make_jwt({"exp": START + 14}))  # exp in 14 real seconds
            scheduled = [e for e in seen if isinstance(e, events.Scheduled)]
            assert [e.due for e in scheduled] == [START + 4]
            assert sched.next_refresh_at("s") == START + 4
            clock.step(HOUR)  # NTP steps the clock
            assert sched.next_refresh_at("s") == START + 4
            clock.advance(4)
            assert recorder.gets == [4.0]


class TestFloors:
    @pytest.mark.parametrize("option", ["retry_delay", "follow_up_interval", "expires_in_floor"])
    @pytest.mark.parametrize("value", [0.999, 1e-9, 0, -5, timedelta(milliseconds=500)])
    def test_under_a_second_is_refused(self, option: str, value: object) -> None:
        """retry_delay, follow_up_interval and expires_in_floor under 1 s are a ValueError."""
        with pytest.raises(ValueError, match=f"{option} must be at least 1 second"):
            Scheduler(lambda: "t", lambda s, t: None, **{option: value})  # type: ignore[arg-type]

    def test_one_second_follow_ups_let_advance_return(
        self, clock: ManualClock, recorder: Recorder
    ) -> None:
        """At the floor, advance(31) runs 31 follow-ups and returns."""
        with Scheduler(
            recorder.get_access_token, recorder.on_refresh, clock=clock, follow_up_interval=1
        ) as sched:
            sched.schedule("s", make_jwt({"exp": START - 1}))
            clock.advance(31)
        assert recorder.gets == [float(n) for n in range(32)]

    def test_expires_in_floor_option(self, clock: ManualClock, recorder: Recorder) -> None:
        """expires_in_floor sets the least delay schedule_from_expires_in waits."""
        with Scheduler(
            recorder.get_access_token,
            recorder.on_refresh,
            clock=clock,
            expires_in_floor=timedelta(seconds=5),
        ) as sched:
            sched.schedule_from_expires_in("s", 0)
            assert sched.next_refresh_at("s") == START + 5
            clock.advance(5)
        assert recorder.gets == [5.0]


class SteppableWall:
    """The wall clock the real runtime reads, off the real one by ``offset`` seconds."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.mark.realclock
@pytest.mark.timeout(20)
class TestRealClockSteps:
    @pytest.fixture
    def wall(self, monkeypatch: pytest.MonkeyPatch) -> SteppableWall:
        wall = SteppableWall(-HOUR)  # an hour slow, as before NTP syncs
        monkeypatch.setattr(runtime, "_wall", wall)
        monkeypatch.setattr(runtime, "_WATCH_INTERVAL", 0.05)
        return wall

    def test_a_step_forward_brings_the_refresh_before_expiry(
        self, timer_backend: str, wall: SteppableWall
    ) -> None:
        """Scheduled an hour slow, the wall clock stepped right: refreshed before exp, not later."""
        delivered = threading.Event()
        with Scheduler(lambda: "t", lambda s, t: delivered.set(), refresh_buffer=10) as sched:
            exp = time.time() + 12  # real time: the refresh is due in 2 s
            sched.schedule("s", make_jwt({"exp": exp}))
            due = sched.next_refresh_at("s")
            assert due is not None
            assert abs(due - (exp - 10)) < 0.5
            wall.offset = 0.0  # the step: 3602 s of monotonic delay left
            assert delivered.wait(8), "no refresh within a few seconds of the step"
            assert time.time() < exp

    def test_set_back_and_forward_between_two_wakes_is_seen(
        self, timer_backend: str, wall: SteppableWall
    ) -> None:
        """A watcher already running, the clock set back, a refresh armed, the clock set right."""
        wall.offset = 0.0
        delivered = threading.Event()
        with Scheduler(lambda: "t", lambda s, t: None, label="other") as other:
            other.schedule_from_expires_in("s", HOUR)  # the watcher has read the right time
            with Scheduler(lambda: "t", lambda s, t: delivered.set(), refresh_buffer=10) as sched:
                wall.offset = -HOUR
                exp = time.time() + 12
                sched.schedule("s", make_jwt({"exp": exp}))
                wall.offset = 0.0  # within one watcher interval: no reading saw it slow
                assert delivered.wait(8)
                assert time.time() < exp

    def test_a_step_back_delays_nothing(self, timer_backend: str, wall: SteppableWall) -> None:
        """The wall clock stepped back an hour under a pending refresh: it still comes on time."""
        wall.offset = 0.0
        delivered = threading.Event()
        with Scheduler(lambda: "t", lambda s, t: delivered.set(), refresh_buffer=10) as sched:
            exp = time.time() + 11
            sched.schedule("s", make_jwt({"exp": exp}))
            wall.offset = -HOUR
            due = sched.next_refresh_at("s")
            assert due is not None
            assert abs(due - (exp - 10 - HOUR)) < 0.5
            assert delivered.wait(8)
            assert time.time() < exp

    def test_one_watcher_thread_for_every_scheduler_gone_when_idle(
        self, timer_backend: str
    ) -> None:
        """Schedulers share one clock-watch thread, which ends once no timer is armed."""

        def watchers() -> list[threading.Thread]:
            return [t for t in threading.enumerate() if t.name == "token-refresh-clock-watch"]

        schedulers = [Scheduler(lambda: "t", lambda s, t: None, label=f"w{n}") for n in range(3)]
        for sched in schedulers:
            sched.schedule_from_expires_in("s", HOUR)
        assert len(watchers()) == 1
        for sched in schedulers:
            assert sched.close(timeout=5)
        for thread in watchers():
            thread.join(5)  # it ends at once when the last timer goes
            assert not thread.is_alive()

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
    def test_a_forked_child_starts_its_own_watcher(self, wall: SteppableWall) -> None:
        """A child of fork() inherits no watcher; its own timers get one, and a step is seen."""
        wall.offset = 0.0
        with Scheduler(lambda: "t", lambda s, t: None, label="parent") as parent:
            parent.schedule_from_expires_in("s", HOUR)  # the parent's watcher runs
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child; its exit code is the result
                code = 99
                try:
                    code = _child_sees_a_step(wall)
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


def _child_sees_a_step(wall: SteppableWall) -> int:  # pragma: no cover - runs in a child
    if [t for t in threading.enumerate() if t.name == "token-refresh-clock-watch"]:
        return 2
    delivered = threading.Event()
    with Scheduler(lambda: "t", lambda s, t: delivered.set(), refresh_buffer=10) as sched:
        wall.offset = -HOUR
        sched.schedule("s", make_jwt({"exp": time.time() + 12}))
        wall.offset = 0.0
        return 0 if delivered.wait(8) else 3


class TestWatcherEdges:
    def test_refused_thread_leaves_timers_on_monotonic_time(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """If the OS refuses the watcher a thread, add() does not raise and a later add retries."""
        watcher = runtime._ClockWatcher()

        class Backend:
            def clock_jumped(self) -> None:
                raise AssertionError("not called")

        def refuse(self: threading.Thread) -> None:
            raise RuntimeError("can't start new thread")

        backend = Backend()
        with monkeypatch.context() as patch:
            patch.setattr(threading.Thread, "start", refuse)
            watcher.add(backend)
        assert watcher._thread is None
        watcher.discard(backend)

    def test_a_refused_timer_thread_is_not_watched(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A timer whose thread the OS refuses raises, and leaves nothing for the watcher."""
        timers = runtime.ThreadTimers("token-refresh-refused")

        def refuse(self: threading.Thread) -> None:
            raise RuntimeError("can't start new thread")

        with monkeypatch.context() as patch:
            patch.setattr(threading.Thread, "start", refuse)
            with pytest.raises(RuntimeError, match="can't start new thread"):
                timers.alarm(lambda payload: None)
        assert timers not in set(runtime._watcher._watched)

    @pytest.mark.realclock
    @pytest.mark.timeout(20)
    def test_a_jump_fires_armed_timers_and_leaves_parked_ones(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Told of a jump, the thread backend fires what is due by wall time; parked timers wait."""
        timers = runtime.ThreadTimers("token-refresh-jump")
        fired, rearmed = threading.Event(), threading.Event()
        parked = timers.alarm(lambda payload: rearmed.set())
        armed = timers.alarm(lambda payload: fired.set())
        armed.set(HOUR, time.time() + HOUR, None)
        monkeypatch.setattr(runtime, "_wall", lambda: time.time() + 2 * HOUR)
        timers.clock_jumped()
        assert fired.wait(5)
        assert not rearmed.is_set()  # a parked alarm fires only once set
        parked.set(0, time.time(), None)
        assert rearmed.wait(5)
        for thread in timers.stop():
            thread.join(5)
