"""Shared fixtures: a ManualClock scheduler, JWT minting, a re-raising thread."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from token_refresh import Scheduler
from token_refresh.testing import ManualClock

START = 1_800_000_000.0


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def make_jwt(payload: Any, *, prefix: str = "") -> str:
    """An unsigned JWT whose payload is ``payload`` serialised as JSON."""
    header = b64url(b'{"alg":"none","typ":"JWT"}')
    body = b64url(json.dumps(payload).encode("utf-8"))
    return f"{prefix}{header}.{body}.c2lnbmF0dXJl"


class Recorder:
    """Stands in for get_access_token and on_refresh, recording every call with its time."""

    def __init__(self, clock: ManualClock | None = None) -> None:
        self.clock = clock
        self.tokens: list[object] = []  # what get_access_token returns next; Exception raises
        self.default: object = "access-token"
        self.calls: list[tuple[Any, ...]] = []
        self.lock = threading.Lock()

    def _now(self) -> float | None:
        return None if self.clock is None else self.clock.time() - START

    def get_access_token(self) -> str | None:
        with self.lock:
            self.calls.append(("get", self._now()))
            value = self.tokens.pop(0) if self.tokens else self.default
        if isinstance(value, BaseException):
            raise value
        return value  # type: ignore[return-value]

    def on_refresh(self, session_id: str, token: str) -> None:
        with self.lock:
            self.calls.append(("deliver", self._now(), session_id, token))

    @property
    def gets(self) -> list[float | None]:
        return [call[1] for call in self.calls if call[0] == "get"]

    @property
    def deliveries(self) -> list[tuple[Any, ...]]:
        return [call[1:] for call in self.calls if call[0] == "deliver"]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=START)


@pytest.fixture
def recorder(clock: ManualClock) -> Recorder:
    return Recorder(clock)


@pytest.fixture
def scheduler(clock: ManualClock, recorder: Recorder) -> Iterator[Scheduler]:
    with Scheduler(recorder.get_access_token, recorder.on_refresh, clock=clock) as sched:
        yield sched


class ReraisingThread(threading.Thread):
    """A thread whose exception, if any, is raised again by ``join()``."""

    def __init__(self, target: Callable[[], object], name: str = "test-worker") -> None:
        super().__init__(name=name, daemon=True)
        self._work = target
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._work()
        except BaseException as error:  # re-raised in the test's thread
            self.error = error

    def join(self, timeout: float | None = 10.0) -> None:
        super().join(timeout)
        if self.is_alive():
            raise AssertionError(f"{self.name} did not finish within {timeout}s")
        if self.error is not None:
            raise self.error


@pytest.fixture(params=["thread", "heap"])
def timer_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test once per real timer backend, as the default for every Scheduler it makes."""
    defaults = Scheduler.__init__.__kwdefaults__
    assert defaults is not None
    assert "timers" in defaults
    monkeypatch.setitem(defaults, "timers", request.param)
    return str(request.param)
