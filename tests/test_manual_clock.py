"""ManualClock: deterministic time that moves only when a test advances it."""

from __future__ import annotations

import gc
import math
import weakref
from collections.abc import Callable

import pytest

from token_refresh.testing import ManualClock

START = 1_800_000_000.0


class Log:
    """Collects (label, clock time) pairs from callbacks."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.entries: list[tuple[str, float]] = []

    def callback(self, label: str) -> Callable[[], None]:
        def record() -> None:
            self.entries.append((label, self.clock.time() - START))

        return record

    @property
    def labels(self) -> list[str]:
        return [label for label, _ in self.entries]


@pytest.fixture
def log(clock: ManualClock) -> Log:
    return Log(clock)


class TestConstruction:
    def test_default_start(self) -> None:
        """Without arguments the clock reads 1,800,000,000 (2027-01-15T08:00:00Z)."""
        clock = ManualClock()
        assert clock.time() == 1_800_000_000.0
        assert clock.monotonic() == 1_800_000_000.0
        assert clock.pending == 0

    @pytest.mark.parametrize("start", [0, 0.0, -5.5, 1_700_000_000, 1e12])
    def test_explicit_start_reads_as_float(self, start: float) -> None:
        """time() and monotonic() both return the given start, as a float."""
        clock = ManualClock(start=start)
        assert clock.time() == start
        assert clock.monotonic() == start
        assert type(clock.time()) is float
        assert type(clock.monotonic()) is float

    @pytest.mark.parametrize("start", ["1800000000", None, True, [0]])
    def test_non_number_start_raises_type_error(self, start: object) -> None:
        """A start that is not a real number (bools included) is a TypeError."""
        with pytest.raises(TypeError, match="start must be a number"):
            ManualClock(start=start)  # type: ignore[arg-type]

    @pytest.mark.parametrize("start", [math.nan, math.inf, -math.inf])
    def test_non_finite_start_raises_value_error(self, start: float) -> None:
        """A NaN or infinite start is a ValueError."""
        with pytest.raises(ValueError, match="start must be finite"):
            ManualClock(start=start)

    def test_repr_shows_time_and_pending(self, clock: ManualClock) -> None:
        """repr() shows the current time and the number of pending timers."""
        assert repr(clock) == "ManualClock(time=1800000000.0, pending=0)"
        clock.call_later(5, lambda: None)
        clock.advance(1.5)
        assert repr(clock) == "ManualClock(time=1800000001.5, pending=1)"


class TestAdvance:
    def test_moves_both_readings(self, clock: ManualClock) -> None:
        """advance() moves time() and monotonic() together, cumulatively."""
        clock.advance(10)
        clock.advance(0.25)
        assert clock.time() == START + 10.25
        assert clock.monotonic() == START + 10.25

    def test_time_stands_still_otherwise(self, clock: ManualClock) -> None:
        """Without advance(), the clock never moves."""
        readings = {clock.time() for _ in range(1000)}
        assert readings == {START}

    def test_runs_due_timers_in_deadline_order(self, clock: ManualClock, log: Log) -> None:
        """Timers armed out of order run in deadline order, each at its deadline."""
        clock.call_later(30, log.callback("c"))
        clock.call_later(10, log.callback("a"))
        clock.call_later(20, log.callback("b"))
        clock.advance(60)
        assert log.entries == [("a", 10.0), ("b", 20.0), ("c", 30.0)]
        assert clock.time() == START + 60

    def test_ties_run_in_arming_order(self, clock: ManualClock, log: Log) -> None:
        """Timers due at the same moment run in the order they were armed."""
        for label in "abcdefgh":
            clock.call_later(5, log.callback(label))
        clock.call_later(4, log.callback("early"))
        clock.advance(5)
        assert log.labels == ["early", *"abcdefgh"]

    def test_only_due_timers_run(self, clock: ManualClock, log: Log) -> None:
        """A timer after the target stays pending until a later advance reaches it."""
        clock.call_later(10, log.callback("due"))
        clock.call_later(10.5, log.callback("later"))
        clock.advance(10)
        assert log.labels == ["due"]
        assert clock.pending == 1
        clock.advance(0.4)
        assert log.labels == ["due"]
        clock.advance(0.1)
        assert log.entries == [("due", 10.0), ("later", 10.5)]

    def test_timer_at_the_target_runs(self, clock: ManualClock, log: Log) -> None:
        """A timer whose deadline equals the target time runs in that advance."""
        clock.call_later(7, log.callback("edge"))
        clock.advance(7)
        assert log.entries == [("edge", 7.0)]

    def test_advance_zero_runs_what_is_due_now(self, clock: ManualClock, log: Log) -> None:
        """advance(0) runs timers due now, and moves no time."""
        clock.call_later(0, log.callback("now"))
        clock.call_later(1, log.callback("later"))
        assert log.labels == []
        clock.advance(0)
        assert log.entries == [("now", 0.0)]
        assert clock.time() == START

    def test_negative_delay_means_now(self, clock: ManualClock, log: Log) -> None:
        """A negative delay arms the timer for now, not the past: it runs after earlier ties."""
        clock.advance(100)
        clock.call_later(0, log.callback("armed first"))
        clock.call_later(-50, log.callback("negative"))
        clock.advance(0)
        assert log.entries == [("armed first", 100.0), ("negative", 100.0)]

    def test_callbacks_see_their_deadline(self, clock: ManualClock) -> None:
        """Inside a callback, time() and monotonic() read exactly its deadline."""
        seen: list[tuple[float, float]] = []
        for delay in (0.001, 3, 1e6):
            clock.call_later(delay, lambda: seen.append((clock.time(), clock.monotonic())))
        clock.advance(2e6)
        assert seen == [(START + 0.001,) * 2, (START + 3,) * 2, (START + 1e6,) * 2]

    def test_timer_armed_by_a_callback_within_the_window_runs(
        self, clock: ManualClock, log: Log
    ) -> None:
        """A timer a callback arms for inside the advance window runs in the same advance."""

        def first() -> None:
            log.callback("first")()
            clock.call_later(5, log.callback("chained"))
            clock.call_later(0, log.callback("immediate"))
            clock.call_later(50, log.callback("outside"))

        clock.call_later(10, first)
        clock.call_later(12, log.callback("between"))
        clock.advance(20)
        expected = [("first", 10.0), ("immediate", 10.0), ("between", 12.0), ("chained", 15.0)]
        assert log.entries == expected
        assert clock.pending == 1
        assert clock.time() == START + 20

    def test_chain_of_timers_runs_to_the_target(self, clock: ManualClock) -> None:
        """A callback that re-arms itself every second runs once per second of the advance."""
        ticks: list[float] = []

        def tick() -> None:
            ticks.append(clock.time() - START)
            clock.call_later(1, tick)

        clock.call_later(1, tick)
        clock.advance(5)
        assert ticks == [1.0, 2.0, 3.0, 4.0, 5.0]
        assert clock.pending == 1

    def test_exception_propagates_and_clock_stays_usable(
        self, clock: ManualClock, log: Log
    ) -> None:
        """An exception from a callback leaves advance(); later timers still run afterwards."""

        def boom() -> None:
            raise LookupError("boom")

        clock.call_later(1, boom)
        clock.call_later(2, log.callback("after"))
        with pytest.raises(LookupError, match="boom"):
            clock.advance(3)
        assert log.labels == []
        clock.advance(3)
        assert log.entries == [("after", 2.0)]
        clock.run_soon(log.callback("soon"))
        assert log.labels == ["after", "soon"]

    @pytest.mark.parametrize("seconds", [-1, -0.001, -math.inf])
    def test_negative_raises_value_error(
        self, clock: ManualClock, log: Log, seconds: float
    ) -> None:
        """Time never goes backwards: a negative advance is rejected and runs nothing."""
        clock.call_later(0, log.callback("due"))
        with pytest.raises(ValueError, match="seconds must"):
            clock.advance(seconds)
        assert log.labels == []
        assert clock.time() == START
        assert clock.pending == 1

    @pytest.mark.parametrize("seconds", [math.nan, math.inf])
    def test_non_finite_raises_value_error(
        self, clock: ManualClock, log: Log, seconds: float
    ) -> None:
        """NaN and infinity are rejected with ValueError and run nothing."""
        clock.call_later(0, log.callback("due"))
        with pytest.raises(ValueError, match="seconds must be finite"):
            clock.advance(seconds)
        assert log.labels == []
        assert clock.time() == START

    @pytest.mark.parametrize("seconds", ["1", None, True, False, [1]])
    def test_non_number_raises_type_error(
        self, clock: ManualClock, log: Log, seconds: object
    ) -> None:
        """A non-number (bools included) is rejected with TypeError and runs nothing."""
        clock.call_later(0, log.callback("due"))
        with pytest.raises(TypeError, match="seconds must be a number"):
            clock.advance(seconds)  # type: ignore[arg-type]
        assert log.labels == []
        assert clock.time() == START

    def test_advance_inside_a_callback_raises(self, clock: ManualClock, log: Log) -> None:
        """advance() from inside a timer callback is a RuntimeError; the outer advance goes on."""
        errors: list[RuntimeError] = []

        def reentrant() -> None:
            try:
                clock.advance(100)
            except RuntimeError as error:
                errors.append(error)

        clock.call_later(1, reentrant)
        clock.call_later(2, log.callback("next"))
        clock.advance(2)
        assert len(errors) == 1
        assert "inside a timer callback" in str(errors[0])
        assert log.entries == [("next", 2.0)]
        assert clock.time() == START + 2

    def test_advance_inside_run_soon_work_raises(self, clock: ManualClock) -> None:
        """advance() from work passed to run_soon() is a RuntimeError too."""
        errors: list[RuntimeError] = []

        def reentrant() -> None:
            try:
                clock.advance(1)
            except RuntimeError as error:
                errors.append(error)

        clock.run_soon(reentrant)
        assert len(errors) == 1
        assert clock.time() == START


class TestCancel:
    def test_cancelled_timer_never_runs(self, clock: ManualClock, log: Log) -> None:
        """A timer cancelled before its deadline does not run, now or later."""
        handle = clock.call_later(5, log.callback("cancelled"))
        clock.call_later(5, log.callback("kept"))
        handle.cancel()
        clock.advance(10)
        clock.advance(1000)
        assert log.labels == ["kept"]

    def test_cancel_from_an_earlier_callback(self, clock: ManualClock, log: Log) -> None:
        """A callback may cancel a later timer that is due in the same advance."""
        later = clock.call_later(2, log.callback("later"))
        clock.call_later(1, later.cancel)
        clock.advance(5)
        assert log.labels == []
        assert clock.pending == 0

    def test_cancel_a_tie_from_the_first_callback(self, clock: ManualClock, log: Log) -> None:
        """Cancelling a timer due at the same moment, from the one before it, stops it."""
        cancel_second: list[Callable[[], None]] = []

        def first() -> None:
            log.callback("first")()
            cancel_second[0]()

        clock.call_later(3, first)
        cancel_second.append(clock.call_later(3, log.callback("second")).cancel)
        clock.advance(3)
        assert log.labels == ["first"]

    def test_cancel_is_idempotent_and_harmless_after_firing(
        self, clock: ManualClock, log: Log
    ) -> None:
        """Cancelling twice, or after the timer ran, changes nothing."""
        fired = clock.call_later(1, log.callback("fired"))
        clock.advance(1)
        fired.cancel()
        fired.cancel()
        assert log.labels == ["fired"]
        pending = clock.call_later(1, log.callback("pending"))
        pending.cancel()
        pending.cancel()
        assert clock.pending == 0

    def test_cancel_releases_the_callback(self, clock: ManualClock) -> None:
        """A cancelled timer stops holding its callback, and so what the callback holds."""

        class Callback:
            def __call__(self) -> None:
                raise AssertionError("a cancelled callback ran")

        callback = Callback()
        ref = weakref.ref(callback)
        handle = clock.call_later(5, callback)
        del callback
        gc.collect()
        assert ref() is not None
        handle.cancel()
        gc.collect()
        assert ref() is None
        clock.advance(10)

    def test_pending_counts_armed_timers(self, clock: ManualClock) -> None:
        """pending counts timers that have neither fired nor been cancelled."""
        handles = [clock.call_later(delay, lambda: None) for delay in (1, 2, 3, 4)]
        assert clock.pending == 4
        handles[3].cancel()
        assert clock.pending == 3
        clock.advance(1)
        assert clock.pending == 2
        clock.advance(10)
        assert clock.pending == 0


class TestRunSoon:
    def test_runs_immediately_outside_a_callback(self, clock: ManualClock, log: Log) -> None:
        """Outside any callback, run_soon() runs the work before it returns, at the same time."""
        clock.run_soon(log.callback("work"))
        assert log.entries == [("work", 0.0)]
        assert clock.pending == 0

    def test_runs_after_the_current_callback(self, clock: ManualClock) -> None:
        """Inside a timer callback, the work runs right after the callback returns."""
        order: list[str] = []

        def callback() -> None:
            order.append("callback start")
            clock.run_soon(lambda: order.append("work"))
            order.append("callback end")

        clock.call_later(1, callback)
        clock.call_later(1, lambda: order.append("next timer"))
        clock.advance(1)
        assert order == ["callback start", "callback end", "work", "next timer"]

    def test_work_sees_its_timer_time(self, clock: ManualClock, log: Log) -> None:
        """Work queued by a timer callback runs at that timer's deadline, before later timers."""
        clock.call_later(4, lambda: clock.run_soon(log.callback("work")))
        clock.call_later(6, log.callback("timer"))
        clock.advance(10)
        assert log.entries == [("work", 4.0), ("timer", 6.0)]

    def test_never_nests_inside_run_soon_work(self, clock: ManualClock) -> None:
        """Work queued by run_soon work runs after it, first in, first out."""
        order: list[str] = []

        def outer() -> None:
            order.append("outer start")
            clock.run_soon(lambda: order.append("inner 1"))
            clock.run_soon(lambda: order.append("inner 2"))
            order.append("outer end")

        clock.run_soon(outer)
        assert order == ["outer start", "outer end", "inner 1", "inner 2"]

    def test_work_may_arm_timers(self, clock: ManualClock, log: Log) -> None:
        """Work run by run_soon() can arm timers that a later advance runs."""

        def arm() -> None:
            clock.call_later(2, log.callback("armed"))

        clock.run_soon(arm)
        assert clock.pending == 1
        clock.advance(2)
        assert log.entries == [("armed", 2.0)]
