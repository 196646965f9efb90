"""Stateful test: a real Scheduler on a ManualClock against an independent model of the seed."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from token_refresh import Scheduler
from token_refresh.testing import ManualClock

from conftest import START, make_jwt

# The seed's constants, in seconds.
BUFFER = 300
FOLLOW_UP = 1800
RETRY = 60
MAX_FAILURES = 3
FLOOR = 30

SESSIONS = ("a", "b", "c")
START_INT = int(START)
FAR_EXP = 10**12  # beyond threading.TIMEOUT_MAX from now: armed in steps, never reached
DEFAULT_TOKEN = "tok-default"

# Token kinds schedule() accepts: "jwt" and "far" carry a usable exp, the rest do not.
EXPIRING_KINDS = ("jwt", "far")
NO_EXPIRY_KINDS = ("opaque", "exp0", "noexp", "exp_true", "exp_str", "exp_null", "two_parts")

Event = tuple[object, ...]


@dataclass(frozen=True)
class TokenSpec:
    """What schedule() is given: a token kind, an exp offset from now, and the ingress prefix."""

    kind: str
    offset: int = 0
    prefixed: bool = False

    def expiry_delay(self, now: int) -> int | None:
        """The model's refresh delay for this token at relative time ``now``, or None (no exp)."""
        if self.kind == "jwt":
            return self.offset - BUFFER
        if self.kind == "far":
            return FAR_EXP - (START_INT + now) - BUFFER
        return None

    def render(self, wall_now: float) -> str:
        """The token string itself, with exp computed against the wall time ``wall_now``."""
        prefix = "sk-ant-si-" if self.prefixed else ""
        payloads: dict[str, object] = {
            "jwt": {"exp": int(wall_now) + self.offset, "sub": "user"},
            "far": {"exp": FAR_EXP},
            "exp0": {"exp": 0},
            "noexp": {"sub": "user"},
            "exp_true": {"exp": True},
            "exp_str": {"exp": str(int(wall_now) + self.offset)},
            "exp_null": {"exp": None},
        }
        if self.kind == "opaque":
            return "opaque-oauth-access-token"
        if self.kind == "two_parts":
            return make_jwt({"exp": int(wall_now) + self.offset}).rsplit(".", 1)[0]
        return make_jwt(payloads[self.kind], prefix=prefix)


@dataclass(frozen=True)
class Action:
    """A scheduler call made from inside a callback (or, kind "raise", on_refresh raising)."""

    kind: str  # "sfei", "schedule", "cancel", "cancel_all", "raise"
    session: str = ""
    expires_in: int = 0
    token: TokenSpec | None = None


@dataclass(frozen=True)
class Outcome:
    """One get_access_token result, optionally after a nested scheduler call."""

    kind: str  # "token", "none", "empty", "raise", "bad"
    token: str = ""
    during: Action | None = None

    def value(self) -> str | None:
        """The token the scheduler should see, None for every kind of failure."""
        return self.token if self.kind == "token" else None


@dataclass
class Timer:
    """A model timer: due time (relative seconds), arming order and generation."""

    due: int
    seq: int
    gen: int


@dataclass
class Model:
    """The seed's createTokenRefreshScheduler, plus the contract's deliberate differences."""

    outcomes: deque[Outcome] = field(default_factory=deque)
    hooks: dict[str, deque[Action]] = field(default_factory=dict)
    now: int = 0
    timers: dict[str, Timer] = field(default_factory=dict)
    gens: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    # The seed's microtask queue: what runs after an awaited get_access_token.
    microtasks: deque[tuple[str, int, str | None]] = field(default_factory=deque)
    counter: int = 0
    seq: int = 0
    draining: bool = False

    # -- public calls (from the test, outside any callback) -------------------

    def schedule(self, session: str, spec: TokenSpec) -> None:
        """Model of schedule() called from outside a callback."""
        self._schedule(session, spec)
        self._drain()

    def schedule_from_expires_in(self, session: str, expires_in: int) -> None:
        """Model of schedule_from_expires_in() called from outside a callback."""
        self._schedule_from_expires_in(session, expires_in)

    def cancel(self, session: str) -> None:
        """Model of cancel() called from outside a callback."""
        self._cancel(session)

    def cancel_all(self) -> None:
        """Model of cancel_all() called from outside a callback."""
        self._cancel_all()

    def advance(self, seconds: int) -> None:
        """Fire every timer due by now + seconds, earliest first, ties in arming order."""
        target = self.now + seconds
        while True:
            due = [(t.due, t.seq, s) for s, t in self.timers.items() if t.due <= target]
            if not due:
                break
            when, _, session = min(due)
            self.now = when
            timer = self.timers.pop(session)
            self._refresh(session, timer.gen)
            self._drain()
        self.now = target

    # -- the seed's internals ---------------------------------------------------

    def _next_generation(self, session: str) -> int:
        self.counter += 1
        self.gens[session] = self.counter
        return self.counter

    def _arm(self, session: str, delay: int, gen: int) -> None:
        self.seq += 1
        self.timers[session] = Timer(self.now + delay, self.seq, gen)

    def _schedule(self, session: str, spec: TokenSpec) -> None:
        delay = spec.expiry_delay(self.now)
        if delay is None:
            return  # no usable exp: keep whatever timer the session has
        self.timers.pop(session, None)
        gen = self._next_generation(session)
        if delay <= 0:
            self._refresh(session, gen)
        else:
            self._arm(session, delay, gen)

    def _schedule_from_expires_in(self, session: str, expires_in: int) -> None:
        self.timers.pop(session, None)
        gen = self._next_generation(session)
        self._arm(session, max(expires_in - BUFFER, FLOOR), gen)

    def _cancel(self, session: str) -> None:
        self._next_generation(session)
        self.timers.pop(session, None)
        self.failures.pop(session, None)

    def _cancel_all(self) -> None:
        for session in list(self.gens):
            self._next_generation(session)
        self.timers.clear()
        self.failures.clear()

    def _apply(self, action: Action) -> None:
        """A scheduler call made from inside a callback: its refresh work waits its turn."""
        if action.kind == "sfei":
            self._schedule_from_expires_in(action.session, action.expires_in)
        elif action.kind == "schedule":
            assert action.token is not None
            self._schedule(action.session, action.token)
        elif action.kind == "cancel":
            self._cancel(action.session)
        elif action.kind == "cancel_all":
            self._cancel_all()

    def _refresh(self, session: str, gen: int) -> None:
        """doRefresh up to its await: get_access_token runs now, the rest is a microtask."""
        self.events.append(("get", self.now))
        outcome = self.outcomes.popleft() if self.outcomes else Outcome("token", DEFAULT_TOKEN)
        if outcome.during is not None:
            self._apply(outcome.during)
        if outcome.kind == "raise":
            # A synchronous throw: the seed's catch, and the failure after it, run
            # now, before any microtask queued meanwhile (by a refresh started
            # inside the call).
            self._complete(session, gen, None)
            return
        self.microtasks.append((session, gen, outcome.value()))

    def _drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        try:
            while self.microtasks:
                self._complete(*self.microtasks.popleft())
        finally:
            self.draining = False

    def _complete(self, session: str, gen: int, token: str | None) -> None:
        """doRefresh after its await."""
        if self.gens.get(session) != gen:
            return  # rescheduled or cancelled meanwhile
        if token is None:
            failures = self.failures.get(session, 0) + 1
            self.failures[session] = failures
            if failures < MAX_FAILURES:
                self._arm(session, RETRY, gen)
            return
        self.failures.pop(session, None)
        self.events.append(("deliver", self.now, session, token))
        pending = self.hooks.get(session)
        if pending:
            self._apply(pending.popleft())  # "raise" does nothing here: the chain goes on
        if self.gens.get(session) == gen:
            # Deliberate difference: a reschedule or cancel from on_refresh supersedes this.
            self._arm(session, FOLLOW_UP, gen)


# -- strategies ------------------------------------------------------------------

sessions = st.sampled_from(SESSIONS)
offsets = st.integers(-60, 720).map(lambda n: n * 10)
expires_ins = st.integers(-100, 7200)
advances = st.sampled_from([0, 1, 30, 59, 60, 61, 299, 300, 301, 1799, 1800, 1801, 3600]) | (
    st.integers(0, 4000)
)

expiring_tokens = st.builds(
    TokenSpec, kind=st.sampled_from(EXPIRING_KINDS), offset=offsets, prefixed=st.booleans()
)
no_expiry_tokens = st.builds(
    TokenSpec, kind=st.sampled_from(NO_EXPIRY_KINDS), offset=offsets, prefixed=st.booleans()
)
any_tokens = st.one_of(expiring_tokens, expiring_tokens, no_expiry_tokens)


def nested_actions(tokens: st.SearchStrategy[TokenSpec]) -> st.SearchStrategy[Action]:
    """Scheduler calls a callback can make, schedule() drawing its token from ``tokens``."""
    return st.one_of(
        st.builds(Action, kind=st.just("sfei"), session=sessions, expires_in=expires_ins),
        st.builds(Action, kind=st.just("schedule"), session=sessions, token=tokens),
        st.builds(Action, kind=st.just("cancel"), session=sessions),
        st.just(Action("cancel_all")),
    )


hook_actions = nested_actions(any_tokens) | st.just(Action("raise"))
outcome_specs = st.tuples(
    st.sampled_from(["token", "token", "none", "empty", "raise", "bad"]),
    st.none() | st.none() | st.none() | nested_actions(any_tokens),
)


class SchedulerMachine(RuleBasedStateMachine):
    """Random schedule/cancel/advance/outcome steps, each checked against the Model."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock(start=START)
        self.model = Model()
        self.outcomes: deque[Outcome] = deque()
        self.hooks: dict[str, deque[Action]] = {}
        self.events: list[Event] = []
        self.tokens_made = 0
        self.scheduler = Scheduler(self.get_access_token, self.on_refresh, clock=self.clock)

    # -- the callbacks the real scheduler calls ---------------------------------

    def _now(self) -> float:
        return self.clock.time() - START

    def get_access_token(self) -> str | None:
        """Record the call, make the outcome's nested call, then return or raise as told."""
        self.events.append(("get", self._now()))
        outcome = self.outcomes.popleft() if self.outcomes else Outcome("token", DEFAULT_TOKEN)
        if outcome.during is not None:
            self._apply(outcome.during)
        if outcome.kind == "raise":
            raise RuntimeError("token server unavailable")
        if outcome.kind == "bad":
            return 42  # type: ignore[return-value]
        return {"token": outcome.token, "none": None, "empty": ""}[outcome.kind]

    def on_refresh(self, session_id: str, token: str) -> None:
        """Record the delivery, then run the session's next hook, if any."""
        self.events.append(("deliver", self._now(), session_id, token))
        pending = self.hooks.get(session_id)
        if pending:
            action = pending.popleft()
            if action.kind == "raise":
                raise RuntimeError("on_refresh failed")
            self._apply(action)

    def _apply(self, action: Action) -> None:
        if action.kind == "sfei":
            self.scheduler.schedule_from_expires_in(action.session, action.expires_in)
        elif action.kind == "schedule":
            assert action.token is not None
            self.scheduler.schedule(action.session, action.token.render(self.clock.time()))
        elif action.kind == "cancel":
            self.scheduler.cancel(action.session)
        elif action.kind == "cancel_all":
            self.scheduler.cancel_all()

    # -- rules --------------------------------------------------------------------

    @initialize()
    def start(self) -> None:
        """Nothing is pending at the start."""
        self.check()

    @rule(session=sessions, spec=any_tokens)
    def schedule(self, session: str, spec: TokenSpec) -> None:
        """schedule() with a JWT (expiring, far-future) or a token with no usable exp."""
        self.model.schedule(session, spec)
        self.scheduler.schedule(session, spec.render(self.clock.time()))
        self.check()

    @rule(session=sessions, expires_in=expires_ins)
    def schedule_from_expires_in(self, session: str, expires_in: int) -> None:
        """schedule_from_expires_in() with any TTL, including ones under the 30 s floor."""
        self.model.schedule_from_expires_in(session, expires_in)
        self.scheduler.schedule_from_expires_in(session, expires_in)
        self.check()

    @precondition(lambda self: bool(self.model.timers or self.model.failures))
    @rule(session=st.sampled_from((*SESSIONS, None)))
    def cancel(self, session: str | None) -> None:
        """cancel() one session, or (None) cancel_all()."""
        if session is None:
            self.model.cancel_all()
            self.scheduler.cancel_all()
        else:
            self.model.cancel(session)
            self.scheduler.cancel(session)
        self.check()

    @rule(seconds=advances)
    def advance(self, seconds: int) -> None:
        """Move the clock on, firing whatever falls due."""
        self.model.advance(seconds)
        self.clock.advance(seconds)
        self.check()

    @rule(extra=st.sampled_from([0, 0, 1, 60]))
    def advance_to_next_due(self, extra: int) -> None:
        """Move the clock to the model's next due time (plus ``extra``), to hit exact deadlines."""
        dues = [timer.due for timer in self.model.timers.values() if timer.due < 10**6]
        seconds = min(dues, default=self.model.now) - self.model.now + extra
        self.model.advance(seconds)
        self.clock.advance(seconds)
        self.check()

    @rule(specs=st.lists(outcome_specs, min_size=1, max_size=4))
    def next_outcomes(self, specs: list[tuple[str, Action | None]]) -> None:
        """Queue what the next get_access_token calls return (default: a token)."""
        for kind, during in specs:
            self.tokens_made += 1
            outcome = Outcome(kind, f"tok-{self.tokens_made}", during)
            self.outcomes.append(outcome)
            self.model.outcomes.append(outcome)
        self.check()

    @rule(session=sessions, action=hook_actions)
    def on_next_refresh(self, session: str, action: Action) -> None:
        """Make the session's next on_refresh call the scheduler (or raise)."""
        self.hooks.setdefault(session, deque()).append(action)
        self.model.hooks.setdefault(session, deque()).append(action)
        self.check()

    def teardown(self) -> None:
        """Close the scheduler: nothing is left pending."""
        self.scheduler.close()
        assert self.clock.pending == 0

    # -- the check after every step -----------------------------------------------

    def check(self) -> None:
        """Calls, due times and pending timers all match the model."""
        model = self.model
        assert self.clock.time() == START + model.now
        assert self.events == model.events
        assert list(self.outcomes) == list(model.outcomes)
        assert {s: list(q) for s, q in self.hooks.items()} == {
            s: list(q) for s, q in model.hooks.items()
        }
        for session in SESSIONS:
            timer = model.timers.get(session)
            expected = None if timer is None else START + timer.due
            assert self.scheduler.next_refresh_at(session) == expected, session
        assert self.clock.pending == len(model.timers)
        sessions_of = getattr(self.scheduler, "sessions", None)
        if callable(sessions_of):
            assert sessions_of() == frozenset(model.timers)


SchedulerMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None
)
TestSchedulerModel = SchedulerMachine.TestCase


def test_immediate_refresh_inside_fetch() -> None:
    """Refreshes started inside get_access_token complete in the seed's microtask order."""
    clock = ManualClock(start=START)
    expired = TokenSpec("jwt", -100)
    events: list[str] = []
    sched: Scheduler

    def get_access_token() -> str:
        events.append("get")
        if len(events) == 1:
            sched.schedule("b", expired.render(clock.time()))
        return "t"

    def on_refresh(session_id: str, token: str) -> None:
        events.append(f"deliver {session_id}")
        if session_id == "b":
            sched.schedule("c", expired.render(clock.time()))

    sched = Scheduler(get_access_token, on_refresh, clock=clock)
    with sched:
        sched.schedule("a", expired.render(clock.time()))
    # In the seed, a's await was queued before c's: deliver a, then c.
    assert events == ["get", "get", "deliver b", "get", "deliver a", "deliver c"]
