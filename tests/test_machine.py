"""The state machine alone, driven with plain values against test_model's model of the seed.

No Scheduler, no clock, no threads: a dozen lines below play the driver (an
alarm is a dict entry, a fetch calls the test's token source, microtasks are
a deque), so every transition of ``token_refresh._machine`` is checked
against the seed's rules directly, thousands of random input sequences long.
A mutant of the machine (four failures allowed) must fail the same check.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test
from test_model import (
    BUFFER,
    DEFAULT_TOKEN,
    FLOOR,
    SESSIONS,
    Action,
    Model,
    Outcome,
    TokenSpec,
    advances,
    any_tokens,
    expires_ins,
    hook_actions,
    outcome_specs,
    sessions,
)

from token_refresh._machine import Attempt, Deliver, Fetch, Machine, Report, Session, Step

Event = tuple[object, ...]


class Alarm:
    """An alarm as plain data: what it fires and when, in the driver's table."""

    def __init__(self, driver: PureDriver) -> None:
        self.driver = driver

    def set(self, delay: float, due: float, payload: object) -> None:
        assert isinstance(payload, Attempt)
        self.driver.armed[self] = (self.driver.now + delay, next(self.driver.sequence), payload)

    def cancel(self) -> None:
        self.driver.armed.pop(self, None)


class PureDriver:
    """Carries out the machine's steps as the Scheduler does on a ManualClock, with no I/O."""

    def __init__(self, machine: Machine, source: Callable[[], object], hook: Callable[[str], Any]):
        self.machine = machine
        self.source = source  # get_access_token: returns a value or raises
        self.hook = hook  # what on_refresh does for a session (a nested call, or raise)
        self.now = 0
        self.armed: dict[Alarm, tuple[float, int, Attempt]] = {}
        self.sequence = itertools.count()
        self.events: list[Event] = []
        self.microtasks: deque[Callable[[], None]] = deque()
        self.running = False

    # -- inputs, as the public methods give them ------------------------------

    def schedule(self, session_id: str, spec: TokenSpec) -> None:
        delay = spec.expiry_delay(self.now)
        if delay is not None:
            self._schedule(session_id, delay, "exp")

    def schedule_from_expires_in(self, session_id: str, expires_in: int) -> None:
        self._schedule(session_id, max(expires_in - BUFFER, FLOOR), "expires_in")

    def _schedule(self, session_id: str, delay: int, reason: Any) -> None:
        session = self.machine.sessions.get(session_id)
        alarm = session.alarm if session is not None else Alarm(self)
        step = self.machine.schedule(
            session_id,
            alarm,
            delay=delay,
            due=self.now + delay,
            monotonic=self.now,
            reason=reason,
            detail={},
        )
        self._run(lambda: self.carry_out(step))

    def cancel(self, session_id: str) -> None:
        self.carry_out(self.machine.cancel(session_id))

    def cancel_all(self) -> None:
        for step in self.machine.cancel_all():
            self.carry_out(step)

    def advance(self, seconds: int) -> None:
        target = self.now + seconds
        while due := [entry for entry in self.armed.values() if entry[0] <= target]:
            when, _, attempt = min(due, key=lambda entry: entry[:2])
            self.armed.pop(self.machine.sessions[attempt.session_id].alarm)
            self.now = int(when)
            self._run(lambda attempt=attempt: self.fire(attempt))  # type: ignore[misc]
        self.now = target

    # -- the driver ------------------------------------------------------------

    def apply(self, step: Step) -> Step:
        if step.arm is not None:
            assert isinstance(step.session, Session)
            step.session.alarm.set(step.arm.delay, step.arm.due, step.arm)
        self.machine.commit(step)
        if step.release is not None:
            step.release.cancel()
        return step

    def carry_out(self, step: Step) -> None:
        self.apply(step)
        for command in step.then:
            if isinstance(command, Fetch):
                self._now_or_nested(lambda command=command: self.fetch(command.attempt))  # type: ignore[misc]
            elif isinstance(command, Deliver):
                self.deliver(command.attempt, command.token)
            else:
                assert isinstance(command, Report)

    def fire(self, attempt: Attempt) -> None:
        self.carry_out(self.machine.fire(attempt, attempt.reason))

    def fetch(self, attempt: Attempt) -> None:
        self.events.append(("get", self.now))
        try:
            value = self.source()
        except Exception as raised:  # the seed's synchronous throw: handled at once
            self.fetched(attempt, None, type(raised).__name__)
            return
        token = value if isinstance(value, str) and value else None
        kind = None if value is None or isinstance(value, str) else type(value).__name__
        self.microtasks.append(lambda: self.fetched(attempt, token, kind))
        if not self.running:
            self._run(None)

    def fetched(self, attempt: Attempt, token: str | None, error: str | None) -> None:
        step = self.machine.fetched(attempt, token, error=error, wall=self.now, monotonic=self.now)
        self.carry_out(step)

    def deliver(self, attempt: Attempt, token: str) -> None:
        self.events.append(("deliver", self.now, attempt.session_id, token))
        self.hook(attempt.session_id)
        self.carry_out(self.machine.delivered(attempt, wall=self.now, monotonic=self.now))

    # -- run_now / run_soon, as a ManualClock has them --------------------------

    def _now_or_nested(self, work: Callable[[], None]) -> None:
        if self.running:
            work()
        else:
            self._run(work)

    def _run(self, work: Callable[[], None] | None) -> None:
        nested, self.running = self.running, True
        try:
            if work is not None:
                work()
            while self.microtasks and not nested:
                self.microtasks.popleft()()
        finally:
            self.running = nested


def due_times(driver: PureDriver) -> dict[str, float]:
    """Each session's next refresh, from the alarm table."""
    return {attempt.session_id: when for when, _, attempt in driver.armed.values()}


class MachineAgainstModel(RuleBasedStateMachine):
    """Random inputs to the bare machine, each checked against the model of the seed."""

    make_machine: Callable[[], Machine] = staticmethod(
        lambda: Machine(retry_delay=60, follow_up_interval=1800)
    )

    def __init__(self) -> None:
        super().__init__()
        self.model = Model()
        self.outcomes: deque[Outcome] = deque()
        self.hooks: dict[str, deque[Action]] = {}
        self.tokens_made = 0
        self.driver = PureDriver(self.make_machine(), self.get_access_token, self.on_refresh)

    def get_access_token(self) -> object:
        outcome = self.outcomes.popleft() if self.outcomes else Outcome("token", DEFAULT_TOKEN)
        if outcome.during is not None:
            self._apply(outcome.during)
        if outcome.kind == "raise":
            raise RuntimeError("token server unavailable")
        if outcome.kind == "bad":
            return 42
        return {"token": outcome.token, "none": None, "empty": ""}[outcome.kind]

    def on_refresh(self, session_id: str) -> None:
        pending = self.hooks.get(session_id)
        if pending:
            action = pending.popleft()
            if action.kind != "raise":  # a raising on_refresh changes nothing here
                self._apply(action)

    def _apply(self, action: Action) -> None:
        if action.kind == "sfei":
            self.driver.schedule_from_expires_in(action.session, action.expires_in)
        elif action.kind == "schedule":
            assert action.token is not None
            self.driver.schedule(action.session, action.token)
        elif action.kind == "cancel":
            self.driver.cancel(action.session)
        else:
            self.driver.cancel_all()

    @initialize()
    def start(self) -> None:
        self.check()

    @rule(session=sessions, spec=any_tokens)
    def schedule(self, session: str, spec: TokenSpec) -> None:
        self.model.schedule(session, spec)
        self.driver.schedule(session, spec)
        self.check()

    @rule(session=sessions, expires_in=expires_ins)
    def schedule_from_expires_in(self, session: str, expires_in: int) -> None:
        self.model.schedule_from_expires_in(session, expires_in)
        self.driver.schedule_from_expires_in(session, expires_in)
        self.check()

    @rule(session=st.sampled_from((*SESSIONS, None)))
    def cancel(self, session: str | None) -> None:
        if session is None:
            self.model.cancel_all()
            self.driver.cancel_all()
        else:
            self.model.cancel(session)
            self.driver.cancel(session)
        self.check()

    @rule(seconds=advances)
    def advance(self, seconds: int) -> None:
        self.model.advance(seconds)
        self.driver.advance(seconds)
        self.check()

    @rule(specs=st.lists(outcome_specs, min_size=1, max_size=4))
    def next_outcomes(self, specs: list[tuple[str, Action | None]]) -> None:
        for kind, during in specs:
            self.tokens_made += 1
            outcome = Outcome(kind, f"tok-{self.tokens_made}", during)
            self.outcomes.append(outcome)
            self.model.outcomes.append(outcome)

    @rule(session=sessions, action=hook_actions)
    def on_next_refresh(self, session: str, action: Action) -> None:
        self.hooks.setdefault(session, deque()).append(action)
        self.model.hooks.setdefault(session, deque()).append(action)

    def check(self) -> None:
        """Calls, due times and live sessions all match the model."""
        model, driver = self.model, self.driver
        assert driver.events == model.events
        assert due_times(driver) == {s: timer.due for s, timer in model.timers.items()}
        assert set(driver.machine.sessions) == set(model.timers)


TestMachineAgainstModel = MachineAgainstModel.TestCase
TestMachineAgainstModel.settings = settings(
    max_examples=1000, stateful_step_count=40, deadline=None
)


class FourFailuresAllowed(MachineAgainstModel):
    """A mutant: the machine gives up after the 4th failure, not the 3rd."""

    make_machine = staticmethod(
        lambda: Machine(retry_delay=60, follow_up_interval=1800, max_failures=4)
    )


def test_a_mutant_of_the_machine_fails_the_model() -> None:
    """The check above can fail: a machine that allows a fourth failure is caught."""
    with pytest.raises(AssertionError):
        run_state_machine_as_test(
            FourFailuresAllowed,
            settings=settings(
                max_examples=500,
                stateful_step_count=40,
                deadline=None,
                derandomize=True,
                report_multiple_bugs=False,
                phases=[Phase.generate],  # the first failure is the answer: no shrinking
                suppress_health_check=list(HealthCheck),
                database=None,
            ),
        )


def test_steps_change_nothing_until_committed() -> None:
    """Planning is pure: a step that is never committed leaves the machine as it was."""
    machine = Machine(retry_delay=60, follow_up_interval=1800)
    alarm = object()
    machine.commit(
        machine.schedule("s", alarm, delay=10, due=10, monotonic=0, reason="expires_in", detail={})
    )
    before = (dict(machine.sessions), dict(machine.failures), dict(machine.deliveries))
    armed = machine.sessions["s"].armed
    assert armed is not None
    machine.schedule("s", alarm, delay=5, due=5, monotonic=0, reason="expires_in", detail={})
    machine.cancel("s")
    machine.cancel_all()
    machine.fire(armed, "expires_in")
    after = (dict(machine.sessions), dict(machine.failures), dict(machine.deliveries))
    assert after == before


def test_rescue_arms_a_refresh_that_never_started_and_nothing_else() -> None:
    """rescue() arms for now only a current session with nothing armed."""
    machine = Machine(retry_delay=60, follow_up_interval=1800)
    alarm = object()
    now = machine.schedule("s", alarm, delay=0, due=5, monotonic=0, reason="exp", detail={})
    machine.commit(now)
    fetch = now.then[-1]
    assert isinstance(fetch, Fetch)
    rescue = machine.rescue(fetch.attempt, wall=7, monotonic=2)
    assert rescue.arm is not None
    assert (rescue.arm.delay, rescue.arm.due, rescue.arm.deadline) == (0.0, 7, 2)
    machine.commit(rescue)
    assert machine.rescue(fetch.attempt, wall=8, monotonic=3).arm is None  # armed already
    machine.commit(machine.cancel("s"))
    assert machine.rescue(fetch.attempt, wall=8, monotonic=3).arm is None  # cancelled
