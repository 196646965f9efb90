"""The outage-proof retry policy: backoff, its cap and jitter, terminal errors, GaveUp.reason."""

from __future__ import annotations

import logging
import random
from typing import Any

import pytest

from token_refresh import RetryPolicy, Scheduler, events
from token_refresh._machine import Attempt, Fetch, Machine, Report, Step
from token_refresh.oauth import OAuthError
from token_refresh.shared import InvalidGrant, RateLimited
from token_refresh.testing import ManualClock, _ManualAlarm

from conftest import START

OUTAGE = 600.0  # ten minutes without a token server


class Outage:
    """A get_access_token whose server is down until ``up_at`` (seconds after START)."""

    def __init__(self, clock: ManualClock, up_at: float, error: BaseException | None = None):
        self.clock, self.up_at = clock, up_at
        self.error = error or OAuthError("token endpoint unreachable")
        self.calls: list[float] = []

    def __call__(self) -> str:
        now = self.clock.time() - START
        self.calls.append(now)
        if now < self.up_at:
            raise self.error
        return f"token-{len(self.calls)}"


class Log:
    """on_event, keeping every event."""

    def __init__(self) -> None:
        self.events: list[events.Event] = []

    def __call__(self, event: events.Event) -> None:
        self.events.append(event)

    def of(self, kind: type[events.Event]) -> list[Any]:
        return [event for event in self.events if type(event) is kind]


@pytest.fixture
def log() -> Log:
    return Log()


def scheduler(
    clock: ManualClock, source: Any, log: Log, policy: RetryPolicy | None, **options: Any
) -> Scheduler:
    delivered: list[tuple[float, str]] = options.pop("delivered", [])
    return Scheduler(
        source,
        lambda session_id, token: delivered.append((clock.time() - START, token)),
        clock=clock,
        on_event=log,
        retry_policy=policy,
        **options,
    )


STEADY = RetryPolicy(first_delay=10, cap=300, multiplier=2, jitter=0)


class TestPolicyValue:
    def test_defaults_are_documented_ones(self) -> None:
        """10 s first, doubling, a 5-minute cap, jitter 0.2, no terminal callable."""
        policy = RetryPolicy()
        assert (policy.first_delay, policy.cap, policy.multiplier, policy.jitter) == (
            10.0,
            300.0,
            2.0,
            0.2,
        )
        assert policy.terminal is None

    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({"first_delay": 0.05}, "first_delay must be at least 0.1"),
            ({"cap": 3601}, "cap must be at most 3600"),
            ({"first_delay": 20, "cap": 10}, "cap must be at least 20"),
            ({"multiplier": 0.5}, "multiplier must be at least 1"),
            ({"jitter": 0.6}, "jitter must be from 0 to 0.5"),
            ({"jitter": -0.1}, "jitter must be from 0 to 0.5"),
            ({"cap": float("nan")}, "cap must be finite"),
        ],
    )
    def test_bad_values_are_refused(self, options: dict[str, Any], message: str) -> None:
        """A loop-making, over-an-hour or nonsensical value is a ValueError at construction."""
        with pytest.raises(ValueError, match=message):
            RetryPolicy(**options)

    def test_bad_types_are_refused(self) -> None:
        """A bool delay or a non-callable terminal is a TypeError."""
        with pytest.raises(TypeError, match="first_delay"):
            RetryPolicy(first_delay=True)
        with pytest.raises(TypeError, match="terminal must be callable"):
            RetryPolicy(terminal="invalid_client")  # type: ignore[arg-type]

    def test_scheduler_refuses_what_is_not_a_policy(self) -> None:
        """retry_policy takes a RetryPolicy or None."""
        with pytest.raises(TypeError, match="retry_policy must be a RetryPolicy"):
            Scheduler(str, print, retry_policy={"cap": 60})  # type: ignore[arg-type]

    def test_steps_grow_by_the_multiplier_up_to_the_cap(self) -> None:
        """10, 20, 40, 80, 160, then 300 for ever, even past a float's range."""
        assert [STEADY.step(n) for n in range(1, 8)] == [10, 20, 40, 80, 160, 300, 300]
        assert STEADY.step(10**6) == 300
        assert RetryPolicy(multiplier=1).step(50) == 10

    def test_jitter_shortens_by_at_most_its_fraction(self) -> None:
        """A draw of 0 is the step; a draw near 1 shortens it by jitter of itself, no more."""
        policy = RetryPolicy(jitter=0.5)
        assert policy.delay(3, 0.0) == 40
        assert policy.delay(3, 0.999999) == pytest.approx(20, abs=1e-3)
        rng = random.Random(7)
        draws = [policy.delay(2, rng.random()) for _ in range(500)]
        assert all(10 < delay <= 20 for delay in draws)
        assert max(draws) - min(draws) > 8  # spread out, not fixed

    def test_a_servers_wait_is_a_lower_bound(self) -> None:
        """A Retry-After longer than the step wins; a shorter one changes nothing."""
        assert STEADY.delay(1, 0.0, wait=120) == 120
        assert STEADY.delay(3, 0.0, wait=5) == 40

    def test_shared_hold_grows_with_the_failing_time(self) -> None:
        """A SharedToken's hold-back: first_delay, then (multiplier - 1) x failing time, capped."""
        assert [STEADY.hold(t, 0.0) for t in (-5, 0, 10, 20, 40, 1000)] == [
            10,
            10,
            10,
            20,
            40,
            300,
        ]
        assert RetryPolicy(jitter=0.5).hold(40, 0.5) == 30


class TestOutage:
    def test_default_rule_gives_up_after_three_failures(self, clock: ManualClock, log: Log) -> None:
        """The seed's rule: a 10-minute outage ends the chain for good, at the 3rd failure."""
        source = Outage(clock, OUTAGE)
        delivered: list[tuple[float, str]] = []
        with scheduler(clock, source, log, None, delivered=delivered) as sched:
            sched.schedule_from_expires_in("s", 330)
            clock.advance(3600)
        assert source.calls == [30, 90, 150]
        assert delivered == []
        [gave_up] = log.of(events.GaveUp)
        assert (gave_up.failures, gave_up.reason) == (3, "failures")

    def test_policy_recovers_with_no_action_from_the_app(
        self, clock: ManualClock, log: Log
    ) -> None:
        """On the policy the chain backs off through the outage and delivers once it ends."""
        source = Outage(clock, 30 + OUTAGE)
        delivered: list[tuple[float, str]] = []
        with scheduler(clock, source, log, STEADY, delivered=delivered) as sched:
            sched.schedule_from_expires_in("s", 330)
            clock.advance(3600)
        # 30, then 10, 20, 40, 80, 160, 300 apart: the server is back at 630.
        assert source.calls == [30, 40, 60, 100, 180, 340, 640, 2440]  # then the follow-up
        assert delivered[0] == (640.0, "token-7")
        assert log.of(events.GaveUp) == []
        failed = log.of(events.RefreshFailed)
        assert [event.attempt for event in failed] == [1, 2, 3, 4, 5, 6]
        assert {(event.max_attempts, event.final) for event in failed} == {(0, False)}
        retries = [e.delay for e in log.of(events.Scheduled) if e.reason == "retry"]
        assert retries == [10, 20, 40, 80, 160, 300]
        [refreshed] = log.of(events.Refreshed)[:1]
        assert refreshed.attempts == 7

    def test_a_token_resets_the_backoff(self, clock: ManualClock, log: Log) -> None:
        """After a success the next outage starts again from first_delay."""
        calls: list[float] = []

        def flaky() -> str:
            calls.append(clock.time() - START)
            if len(calls) in (1, 2, 4):
                raise OAuthError("down")
            return "token"

        with scheduler(clock, flaky, log, STEADY) as sched:
            sched.schedule_from_expires_in("s", 330)
            clock.advance(1900)
        assert calls == [30, 40, 60, 1860, 1870]

    def test_jittered_retries_stay_within_bounds(self, clock: ManualClock, log: Log) -> None:
        """With jitter each retry comes between step x (1 - jitter) and the step."""
        policy = RetryPolicy(first_delay=10, cap=60, jitter=0.5)
        source = Outage(clock, 10**9)
        with scheduler(clock, source, log, policy, rng=random.Random(3)) as sched:
            sched.schedule_from_expires_in("s", 330)
            clock.advance(3600)
        retries = [e.delay for e in log.of(events.Scheduled) if e.reason == "retry"]
        assert len(retries) > 50
        steps = [policy.step(n) for n in range(1, len(retries) + 1)]
        assert all(step / 2 <= delay <= step for delay, step in zip(retries, steps, strict=True))
        assert len(set(retries)) > 40

    def test_rate_limited_waits_at_least_retry_after(self, clock: ManualClock, log: Log) -> None:
        """A RateLimited's retry_after is the least delay before the retry."""
        source = Outage(clock, 100, RateLimited(70, "default"))
        with scheduler(clock, source, log, STEADY) as sched:
            sched.schedule_from_expires_in("s", 330)
            clock.advance(600)
        assert source.calls == [30, 100]


class TestTerminal:
    @pytest.mark.parametrize(
        ("error", "reason"),
        [
            (OAuthError("refused", error="invalid_client", status=401), "invalid_client"),
            (OAuthError("refused", error="unauthorized_client", status=400), "unauthorized_client"),
            (InvalidGrant("refresh token refused"), "invalid_grant"),
        ],
    )
    def test_terminal_errors_end_the_chain(
        self,
        clock: ManualClock,
        log: Log,
        caplog: pytest.LogCaptureFixture,
        error: BaseException,
        reason: str,
    ) -> None:
        """invalid_client, unauthorized_client and invalid_grant give up at once, saying why."""
        source = Outage(clock, 10**9, error)
        with (
            caplog.at_level(logging.ERROR, "token_refresh"),
            scheduler(clock, source, log, STEADY, label="svc") as sched,
        ):
            sched.schedule_from_expires_in("s", 330)
            clock.advance(3600)
        assert source.calls == [30]
        [gave_up] = log.of(events.GaveUp)
        assert (gave_up.failures, gave_up.reason) == (1, f"terminal: {reason}")
        [failed] = log.of(events.RefreshFailed)
        assert failed.final
        assert (
            f"[svc:token] Giving up on sessionId=s: the error is terminal: {reason} (failure 1)"
            in caplog.messages
        )
        assert sched.stats().give_ups == 1

    def test_other_oauth_errors_are_retried(self, clock: ManualClock, log: Log) -> None:
        """A 500 or an unknown error code is an outage, not a verdict."""
        source = Outage(clock, 100, OAuthError("server error", error="server_error", status=500))
        with scheduler(clock, source, log, STEADY) as sched:
            sched.schedule_from_expires_in("s", 330)
            clock.advance(600)
        assert source.calls[:4] == [30, 40, 60, 100]

    def test_failed_line_says_it_retries_until_terminal(
        self, clock: ManualClock, log: Log, caplog: pytest.LogCaptureFixture
    ) -> None:
        """On the policy the failure line has no "of 3"; without it, it is the seed's."""
        with caplog.at_level(logging.ERROR, "token_refresh"):
            with scheduler(clock, Outage(clock, 100), log, STEADY, label="p") as sched:
                sched.schedule_from_expires_in("s", 330)
                clock.advance(45)
            with scheduler(clock, Outage(clock, 10**9), log, None, label="d") as sched:
                sched.schedule_from_expires_in("s", 330)
                clock.advance(35)
        assert (
            "[p:token] No access token available for refresh, sessionId=s "
            "(failure 2, retrying until the error is terminal)" in caplog.messages
        )
        assert "[d:token] No access token available for refresh, sessionId=s (failure 1/3)" in (
            caplog.messages
        )


class TestUserCallable:
    def run(self, clock: ManualClock, log: Log, error: BaseException, terminal: Any) -> Outage:
        source = Outage(clock, 10**9, error)
        policy = RetryPolicy(first_delay=10, cap=10, jitter=0, terminal=terminal)
        with scheduler(clock, source, log, policy) as sched:
            sched.schedule_from_expires_in("s", 330)
            clock.advance(90)
        return source

    def test_true_ends_the_chain_naming_the_error_type(self, clock: ManualClock, log: Log) -> None:
        """terminal(error) -> True: GaveUp.reason names the exception's type."""
        seen: list[BaseException] = []

        def terminal(error: BaseException) -> bool:
            seen.append(error)
            return isinstance(error, PermissionError)

        source = self.run(clock, log, PermissionError("revoked"), terminal)
        assert source.calls == [30]
        assert isinstance(seen[0], PermissionError)
        assert log.of(events.GaveUp)[0].reason == "terminal: PermissionError"

    def test_a_string_is_the_reason(self, clock: ManualClock, log: Log) -> None:
        """terminal(error) -> "account disabled": GaveUp.reason is "terminal: account disabled"."""
        self.run(clock, log, ValueError(), lambda error: "account disabled")
        assert log.of(events.GaveUp)[0].reason == "terminal: account disabled"

    def test_false_retries_even_a_built_in_terminal_error(
        self, clock: ManualClock, log: Log
    ) -> None:
        """terminal(error) -> False overrides the built-in rule: invalid_client is retried."""
        error = OAuthError("refused", error="invalid_client")
        source = self.run(clock, log, error, lambda error: False)
        assert source.calls == [30, 40, 50, 60, 70, 80, 90]
        assert log.of(events.GaveUp) == []

    @pytest.mark.parametrize("said", [None, ""])
    def test_no_opinion_leaves_it_to_the_built_in_rule(
        self, clock: ManualClock, log: Log, said: str | None
    ) -> None:
        """terminal(error) -> None (or an empty reason): invalid_client still ends the chain."""
        source = self.run(clock, log, OAuthError("no", error="invalid_client"), lambda e: said)
        assert source.calls == [30]
        assert log.of(events.GaveUp)[0].reason == "terminal: invalid_client"

    def test_a_raising_callable_is_logged_and_the_built_in_rule_decides(
        self, clock: ManualClock, log: Log, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A terminal() that raises is logged by type; the chain goes on as the rule says."""

        def broken(error: BaseException) -> bool:
            raise KeyError("secret-looking-detail")

        with caplog.at_level(logging.ERROR, "token_refresh"):
            source = self.run(clock, log, OSError(), broken)
        assert source.calls == [30, 40, 50, 60, 70, 80, 90]
        assert (
            "[token_refresh:token] retry policy's terminal() raised KeyError for sessionId=s; "
            "the built-in rule decides" in caplog.messages
        )
        assert not any("secret-looking-detail" in message for message in caplog.messages)


@pytest.fixture
def no_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every retry alarm is refused, as an OS out of threads refuses a timer thread."""
    real = _ManualAlarm.set

    def refuse(self: _ManualAlarm, delay: float, due: float, payload: object) -> None:
        if getattr(payload, "reason", None) == "retry":
            raise RuntimeError("can't start new thread")
        real(self, delay, due, payload)

    monkeypatch.setattr(_ManualAlarm, "set", refuse)


def test_no_timer_says_so(clock: ManualClock, log: Log, no_threads: None) -> None:
    """A retry that cannot be armed ends the chain with GaveUp.reason "no timer"."""
    with scheduler(clock, Outage(clock, 10**9), log, STEADY) as sched:
        sched.schedule_from_expires_in("s", 330)
        clock.advance(60)
    [gave_up] = log.of(events.GaveUp)
    assert (gave_up.failures, gave_up.reason) == (0, "no timer")


class TestMachine:
    """The rule in the pure state machine, with plain values: no clock, no driver."""

    def fail(self, machine: Machine, attempt: Attempt, **verdict: Any) -> Step:
        step = machine.fetched(
            attempt._replace(**verdict), None, error="OSError", wall=0.0, monotonic=0.0
        )
        machine.commit(step)
        return step

    def test_backoff_and_terminal_verdicts(self) -> None:
        """Retries follow the policy's steps (and a wait); a terminal verdict ends the chain."""
        machine = Machine(retry_delay=60, follow_up_interval=1800, policy=STEADY, draw=lambda: 0.5)
        step = machine.schedule(
            "s", object(), delay=0, due=0.0, monotonic=0.0, reason="exp", detail={}
        )
        machine.commit(step)
        fetch = step.then[-1]
        assert isinstance(fetch, Fetch)
        attempt, delays = fetch.attempt, []
        for wait in (0.0, 0.0, 0.0, 500.0, 0.0):
            step = self.fail(machine, attempt, wait=wait)
            assert step.arm is not None
            delays.append(step.arm.delay)
            attempt = step.arm
        assert delays == [10, 20, 40, 500, 160]  # jitter 0 here; a wait is a lower bound
        step = self.fail(machine, attempt, terminal="terminal: invalid_client")
        assert step.arm is None
        assert step.give_ups == 1
        gave_up = [c for c in step.then if isinstance(c, Report) and c.outcome.startswith("gave")]
        assert [(c.outcome, c.fields) for c in gave_up] == [
            ("gave_up_terminal", {"failures": 6, "reason": "terminal: invalid_client"})
        ]
        assert machine.sessions == {}

    def test_without_a_policy_a_terminal_verdict_changes_nothing(self) -> None:
        """The seed's rule: a verdict is ignored; the third failure gives up for "failures"."""
        machine = Machine(retry_delay=60, follow_up_interval=1800)
        step = machine.schedule(
            "s", object(), delay=0, due=0.0, monotonic=0.0, reason="exp", detail={}
        )
        machine.commit(step)
        fetch = step.then[-1]
        assert isinstance(fetch, Fetch)
        attempt = fetch.attempt
        for _ in range(2):
            step = self.fail(machine, attempt, terminal="terminal: invalid_client", wait=999.0)
            assert step.arm is not None
            assert step.arm.delay == 60
            attempt = step.arm
        step = self.fail(machine, attempt)
        reports = [c for c in step.then if isinstance(c, Report)]
        assert [c.fields for c in reports if c.outcome == "gave_up"] == [
            {"failures": 3, "reason": "failures"}
        ]
