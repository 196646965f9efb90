"""The seed's rules as a state machine: inputs in, steps out; no threads, clocks or I/O.

The seed's ``doRefresh`` is sixty lines of JavaScript that its single thread
runs without interruption. Here the same rules are plain data and pure
functions, as h11 keeps HTTP/1.1: every input (``schedule``, ``fire``,
``fetched``, ``delivered``, ``cancel``...) *plans* a :class:`Step` (the new
record of one session, counters, and the commands to carry out) and changes
nothing; :meth:`Machine.commit` then stores it in a run of plain assignments
with nothing that can raise between them. The driver (``_scheduler.py``)
plans under its lock, sets the alarm a step arms, commits, and only after
releasing the lock runs what the step says: start a fetch, deliver a token,
report an outcome. So a ``KeyboardInterrupt`` that lands anywhere leaves the
machine either before the step or after it, never half-way.

Time comes in as values (the wall and monotonic "now" of each input), and
the machine calls nothing but the ``jitter`` function it was given.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal, NamedTuple

from ._retry import RetryPolicy
from .events import ServedBy, Trigger

__all__ = ["Attempt", "Deliver", "Fetch", "Machine", "Report", "Session", "Step"]

#: Consecutive failures after which a session's refresh chain gives up (the seed's 3).
MAX_REFRESH_FAILURES: Final = 3

Reason = Literal["exp", "expires_in", "retry", "follow_up"]


class Attempt(NamedTuple):
    """One refresh attempt of a session, bound to the generation that armed it."""

    session_id: str
    generation: int
    reason: Reason
    delay: float
    due: float  # wall time it is due (exact for "exp": the token's exp minus the buffer)
    deadline: float  # monotonic time its delay has run
    number: int = 1  # this refresh's attempt: 1, then 2 and 3 for its retries
    origin: Trigger | None = None  # what started the refresh; None until it starts
    duration: float = 0.0  # seconds its get_access_token call ran, once it has
    served_by: ServedBy | None = None  # who fetched its token, for a SharedToken
    terminal: str | None = None  # why its failure ends the chain (a retry policy's verdict)
    wait: float = 0.0  # the least delay before its retry (a RateLimited's retry_after)

    # Written out rather than _replace(), which costs a storm of refreshes
    # several times more.
    def started(self, origin: Trigger) -> Attempt:
        """The attempt, started by ``origin`` (kept if it was set before)."""
        return self._then(
            self.origin or origin, self.duration, self.served_by, self.terminal, self.wait
        )

    def ran(
        self,
        duration: float,
        served_by: ServedBy | None = None,
        terminal: str | None = None,
        wait: float = 0.0,
    ) -> Attempt:
        """The attempt, after its get_access_token call ran for ``duration`` seconds
        (``terminal`` and ``wait``: a retry policy's verdict on its error)."""
        return self._then(self.origin, duration, served_by, terminal, wait)

    def _then(
        self,
        origin: Trigger | None,
        duration: float,
        served_by: ServedBy | None,
        terminal: str | None,
        wait: float,
    ) -> Attempt:
        """The same attempt with what its start and its call set."""
        return Attempt(
            self.session_id,
            self.generation,
            self.reason,
            self.delay,
            self.due,
            self.deadline,
            self.number,
            origin,
            duration,
            served_by,
            terminal,
            wait,
        )


class Session(NamedTuple):
    """A session with a live refresh chain: its generation, its alarm, what that alarm fires."""

    generation: int
    alarm: Any  # the driver's alarm; opaque here, kept for the session's life
    armed: Attempt | None = None  # None while a refresh runs (or starts at once)

    def arming(self, armed: Attempt | None) -> Session:
        """The session with its alarm set for ``armed`` (None: for nothing)."""
        return Session(self.generation, self.alarm, armed)


class Delivery(NamedTuple):
    """An on_refresh call running for a session, and the newer result due after it."""

    generation: int
    next: tuple[Attempt, str] | None = None


class Report(NamedTuple):
    """An outcome for the driver to log and send as an event (see ``_report.py``)."""

    outcome: str
    session_id: str
    fields: dict[str, Any]


class Fetch(NamedTuple):
    """Call get_access_token for this attempt (on a worker)."""

    attempt: Attempt


class Deliver(NamedTuple):
    """Call on_refresh with this token (on the thread that carries out the step)."""

    attempt: Attempt
    token: str


class _Keep:
    """A record a step leaves as it is."""


KEEP: Final = _Keep()


@dataclass(slots=True)
class Step:
    """What one input does: the records it stores, then what the driver carries out."""

    session_id: str
    session: Session | _Keep | None = KEEP
    failures: int | _Keep | None = KEEP
    delivery: Delivery | _Keep | None = KEEP
    refreshes: int = 0
    failed: int = 0
    give_ups: int = 0
    arm: Attempt | None = None  # set the session's alarm for it before committing
    release: Any = None  # an alarm no session needs any more, cancelled after committing
    notify: bool = False  # a delivery ended or moved on: wake whoever waits for it
    then: list[Report | Fetch | Deliver] = field(default_factory=list)


class Machine:
    """Every session's refresh chain, as the seed keeps it, and lifetime counters."""

    def __init__(
        self,
        *,
        retry_delay: float,
        follow_up_interval: float,
        jitter: Callable[[float], float] = lambda delay: delay,
        max_failures: int = MAX_REFRESH_FAILURES,
        policy: RetryPolicy | None = None,
        draw: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.retry_delay = retry_delay
        self.follow_up_interval = follow_up_interval
        self.jitter = jitter
        self.max_failures = max_failures
        # None: the seed's rule (max_failures in a row end the chain, retry_delay apart).
        self.policy = policy
        self.draw = draw  # a uniform random number in [0, 1), for the policy's jitter
        self.sessions: dict[str, Session] = {}
        # The seed's failureCounts: kept when a chain gives up, cleared by a
        # token or a cancel, and carried across schedule().
        self.failures: dict[str, int] = {}
        # Kept past a cancel: cancel() waits for the call to end.
        self.deliveries: dict[str, Delivery] = {}
        self.closed = False
        self.refreshes = self.failed_attempts = self.give_ups = 0
        # One counter for every session, so a freed session id that comes back
        # can never match a refresh still in flight from its past.
        self._generations = itertools.count(1)

    # -- reading -------------------------------------------------------------

    def pending(self) -> int:
        """Sessions with an alarm set."""
        return sum(session.armed is not None for session in self.sessions.values())

    def current(self, attempt: Attempt) -> bool:
        """Whether the attempt's session still has the generation that made it."""
        session = self.sessions.get(attempt.session_id)
        return session is not None and session.generation == attempt.generation

    # -- inputs ----------------------------------------------------------------

    def schedule(
        self,
        session_id: str,
        alarm: Any,
        *,
        delay: float,
        due: float,
        monotonic: float,
        reason: Reason,
        detail: dict[str, Any],
    ) -> Step:
        """Replace the session's timer: refresh after ``delay``, or at once if not positive."""
        old = self.sessions.get(session_id)
        generation = next(self._generations)
        step = Step(session_id, then=self._retry_dropped(old))
        if delay > 0:
            jittered = self.jitter(delay)
            due, delay = due - (delay - jittered), jittered
            attempt = Attempt(session_id, generation, reason, delay, due, monotonic + delay)
            step.session, step.arm = Session(generation, alarm, attempt), attempt
            fields = {"due": attempt.due, "delay": delay, "reason": reason}
            step.then.append(Report(f"scheduled_{reason}", session_id, fields | detail))
            return step
        attempt = Attempt(session_id, generation, "exp", 0.0, due, monotonic)
        step.session = Session(generation, alarm)
        fields = {"due": due, "delay": 0.0, "reason": "exp"}
        step.then += [Report("scheduled_now", session_id, fields | detail), Fetch(attempt)]
        return step

    def fire(self, attempt: Attempt, trigger: Trigger) -> Step:
        """The attempt's alarm went off: start its fetch if it is still the one armed."""
        session = self.sessions.get(attempt.session_id)
        step = Step(attempt.session_id)
        if session is None or session.armed is not attempt:
            return step  # cancelled or replaced before it started: never called
        running = attempt.started(trigger)
        step.session = session.arming(None)
        step.then.append(Fetch(running))
        return step

    def fetched(
        self,
        attempt: Attempt,
        token: str | None,
        *,
        error: str | None,
        wall: float,
        monotonic: float,
        detail: dict[str, Any] | None = None,
    ) -> Step:
        """get_access_token ended (``error``: its type, "timeout" or "hung"): retry or deliver."""
        session_id = attempt.session_id
        session = self.sessions.get(session_id)
        if session is None or session.generation != attempt.generation:
            return Step(session_id, then=[self._stale(attempt, session)])
        if token is None:
            return self._failed(attempt, session, error, wall, monotonic, detail or {})
        delivery = self.deliveries.get(session_id)
        if delivery is None:
            step = Step(session_id, failures=None, refreshes=1)
            step.delivery = Delivery(attempt.generation)
            step.then.append(Deliver(attempt, token))
            return step
        # An older generation's on_refresh is running: its thread delivers this
        # one next, so no worker waits for it. What it would have delivered is stale.
        step = Step(session_id, failures=None, delivery=delivery._replace(next=(attempt, token)))
        if delivery.next is not None:
            handed = delivery.next[0]
            step.then.append(self._stale(handed, session))
        return step

    def _failed(
        self,
        attempt: Attempt,
        session: Session,
        error: str | None,
        wall: float,
        monotonic: float,
        detail: dict[str, Any],
    ) -> Step:
        session_id = attempt.session_id
        failures = self.failures.get(session_id, 0) + 1
        step = Step(session_id, failures=failures, failed=1)
        timed_out = error in ("timeout", "hung")
        ends = self._ends(attempt, failures)
        fields = {
            "attempt": failures,
            "max_attempts": self.max_failures if self.policy is None else 0,
            "error_type": "TimeoutError" if timed_out else error,
            "final": ends is not None,
            "called": error != "hung",
            "trigger": attempt.origin or attempt.reason,
            "fetch_duration": attempt.duration,
        } | detail
        step.then.append(Report("timed_out" if timed_out else "failed", session_id, fields))
        if ends is not None:
            step.session, step.release, step.give_ups = None, session.alarm, 1
            outcome = "gave_up" if ends == "failures" else "gave_up_terminal"
            step.then.append(Report(outcome, session_id, {"failures": failures, "reason": ends}))
            return step
        if self.policy is None:
            delay = self.jitter(self.retry_delay)
        else:
            delay = self.policy.delay(failures, self.draw(), wait=attempt.wait)
        retry = Attempt(
            session_id,
            attempt.generation,
            "retry",
            delay,
            wall + delay,
            monotonic + delay,
            attempt.number + 1,
            attempt.origin,
        )
        step.session, step.arm = session.arming(retry), retry
        step.then.append(Report("scheduled_retry", session_id, _scheduled(retry)))
        return step

    def _ends(self, attempt: Attempt, failures: int) -> str | None:
        """Why this failure ends the chain (GaveUp.reason), or None: it is retried."""
        if self.policy is not None:
            return attempt.terminal  # on the policy, only a terminal error ends it
        return "failures" if failures >= self.max_failures else None

    def delivered(self, attempt: Attempt, *, wall: float, monotonic: float) -> Step:
        """on_refresh returned (or raised): arm the follow-up, then any result handed over."""
        session_id = attempt.session_id
        session = self.sessions.get(session_id)
        current = None if session is None else session.generation
        step = Step(session_id, notify=True)
        # A schedule() from inside on_refresh bumped the generation: its timer
        # supersedes the follow-up, so none is armed (no orphan timer).
        if session is not None and current == attempt.generation:
            delay = self.jitter(self.follow_up_interval)
            follow_up = Attempt(
                session_id, current, "follow_up", delay, wall + delay, monotonic + delay
            )
            step.session, step.arm = session.arming(follow_up), follow_up
            step.then.append(Report("scheduled_follow_up", session_id, _scheduled(follow_up)))
        delivery = self.deliveries.get(session_id)
        handed = None if delivery is None else delivery.next
        if handed is not None and handed[0].generation != current:
            step.then.append(self._stale(handed[0], session))
            handed = None
        if handed is None:
            step.delivery = None
        else:
            step.delivery, step.refreshes = Delivery(handed[0].generation), 1
            step.then.append(Deliver(*handed))
        return step

    def abandon_delivery(self, session_id: str) -> Step:
        """A delivery was left by an exception: unmark it all the same."""
        return Step(session_id, delivery=None, notify=True)

    def alarm_refused(self, step: Step) -> Step:
        """The alarm ``step`` arms could not be set (no thread): the chain ends there instead."""
        session = self.sessions.get(step.session_id)
        then = [
            command._replace(fields=command.fields | {"final": True})
            if isinstance(command, Report) and command.outcome in ("failed", "timed_out")
            else command
            for command in step.then
            if not (isinstance(command, Report) and command.outcome.startswith("scheduled_"))
        ]
        then.append(Report("no_timer", step.session_id, {"failures": 0, "reason": "no timer"}))
        return replace(
            step,
            session=None,
            arm=None,
            release=None if session is None else session.alarm,
            give_ups=step.give_ups + 1,
            then=then,
        )

    def rescue(self, attempt: Attempt, *, wall: float, monotonic: float) -> Step:
        """A refresh due at once never started (an exception came first): arm it for now."""
        session = self.sessions.get(attempt.session_id)
        step = Step(attempt.session_id)
        if session is None or session.generation != attempt.generation or session.armed:
            return step  # replaced, cancelled, or armed again meanwhile
        now = attempt._replace(delay=0.0, due=wall, deadline=monotonic)
        step.session, step.arm = session.arming(now), now
        return step

    def cancel(self, session_id: str) -> Step:
        """Forget the session: its chain, its failures; a refresh in flight becomes stale."""
        session = self.sessions.get(session_id)
        step = Step(session_id, session=None, failures=None, then=self._retry_dropped(session))
        if session is not None:
            step.release = session.alarm
            step.then.append(Report("cancelled", session_id, {}))
        return step

    def cancel_all(self) -> list[Step]:
        """Cancel every session, as :meth:`cancel` does for one."""
        return [self.cancel(session_id) for session_id in self.sessions | self.failures]

    def commit(self, step: Step) -> None:
        """Store what ``step`` planned: plain assignments, nothing that can raise between them."""
        session_id = step.session_id
        self.refreshes += step.refreshes
        self.failed_attempts += step.failed
        self.give_ups += step.give_ups
        if step.failures is None:
            self.failures.pop(session_id, None)
        elif not isinstance(step.failures, _Keep):
            self.failures[session_id] = step.failures
        if step.delivery is None:
            self.deliveries.pop(session_id, None)
        elif not isinstance(step.delivery, _Keep):
            self.deliveries[session_id] = step.delivery
        # Last: once the session's record is stored, the step is (the driver's test).
        if step.session is None:
            self.sessions.pop(session_id, None)
        elif not isinstance(step.session, _Keep):
            self.sessions[session_id] = step.session

    # -- helpers ---------------------------------------------------------------

    def _stale(self, attempt: Attempt, session: Session | None) -> Report:
        fields = {
            "generation": attempt.generation,
            "current": None if session is None else session.generation,
            "trigger": attempt.origin or attempt.reason,
            "fetch_duration": attempt.duration,
        }
        return Report("stale", attempt.session_id, fields)

    @staticmethod
    def _retry_dropped(session: Session | None) -> list[Report | Fetch | Deliver]:
        """A failed refresh whose retry a cancel or reschedule drops ends here, without a token."""
        armed = None if session is None else session.armed
        if armed is None or armed.reason != "retry":
            return []
        trigger = armed.origin or armed.reason
        return [Report("retry_dropped", armed.session_id, {"trigger": trigger})]


def _scheduled(attempt: Attempt) -> dict[str, Any]:
    return {"due": attempt.due, "delay": attempt.delay, "reason": attempt.reason}
