"""``python -m token_refresh demo``: watch real timers keep a few sessions' tokens fresh."""

from __future__ import annotations

import base64
import itertools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from token_refresh._jwt import decode_jwt_payload
from token_refresh._scheduler import Scheduler

# Seconds at speed 1 (the hidden --speed divides them all): minutes shrunk to seconds.
TOKEN_LIFETIME = 7.0  # of the tokens the servers mint
REFRESH_BUFFER = 3.0
FOLLOW_UP = TOKEN_LIFETIME - REFRESH_BUFFER
RETRY_DELAY = 1.0
DEADLINE = 30.0  # to wait for every session's refreshes (the story takes about 10)
REFRESHES = 2  # per session; then the session ends
OUTAGE = ("returns None", "raises ConnectionError")  # flaky-auth's first answers
SESSIONS = (("alice", "auth", 5.0), ("bob", "auth", 6.0), ("carol", "flaky-auth", 6.5))
INTRO = """\
token_refresh demo: 3 sessions on real timers, about {total:.3g} seconds.
Minutes are shrunk to seconds so you can watch. Tokens live {lifetime:.3g}s; the schedulers use
  refresh_buffer={buffer:.3g}s: refresh a token {buffer:.3g}s before it expires
  follow_up_interval={follow_up:.3g}s: refresh again {follow_up:.3g}s after a good refresh
  retry_delay={retry:.3g}s: retry {retry:.3g}s after a failure (giving up after 3 in a row)
A Scheduler has one token source, get_access_token(), for all its sessions, so each
token server gets its own: "auth" serves alice and bob; "flaky-auth" serves carol and
is down at first. Tokens are unsigned JWTs minted here; only their serial numbers show.
"""


class Story:
    """Thread-safe lines on ``out``, stamped with the time since the demo started.

    When the reader of ``out`` goes away (a closed pipe), the story stops, on
    whichever thread was telling it: ``hung_up`` becomes true and ``wake`` is
    called, so that the demo can end at once (:meth:`check` raises BrokenPipeError).
    """

    def __init__(self, out: TextIO, wake: Callable[[], object] = lambda: None) -> None:
        self.out, self.start, self.wake = out, time.time(), wake
        self.hung_up = False
        self._lock = threading.Lock()

    def at(self, wall: float) -> str:
        return f"+{wall - self.start:.1f}s"

    def say(self, text: str, stamp: bool = True) -> None:
        line = f"{self.at(time.time()):>6}  {text}" if stamp else text
        with self._lock:
            if self.hung_up:
                return
            try:
                print(line, file=self.out, flush=True)
            except BrokenPipeError:
                self.hung_up = True
            else:
                return
        self.wake()

    def check(self) -> None:
        """Raise BrokenPipeError if the reader has gone: the command line exits quietly."""
        if self.hung_up:
            raise BrokenPipeError("the reader of the demo's output has gone")


class TokenServer:
    """Stands in for an auth server: mints unsigned JWTs numbered #1, #2, ..."""

    def __init__(self, name: str, story: Story, lifetime: float, retry: float) -> None:
        self.name, self.story, self.lifetime, self.retry = name, story, lifetime, retry
        self.outage: list[str] = []  # how the next calls fail
        self.failures = 0
        self._serials, self._lock = itertools.count(1), threading.Lock()

    def mint(self, lifetime: float) -> str:
        with self._lock:
            claims = {"iss": self.name, "jti": next(self._serials), "exp": time.time() + lifetime}
        parts = ({"alg": "none", "typ": "JWT"}, claims)
        encoded = (base64.urlsafe_b64encode(json.dumps(part).encode()) for part in parts)
        return ".".join(segment.decode().rstrip("=") for segment in encoded) + "."

    def get_access_token(self) -> str | None:
        """What a Scheduler calls: a fresh token; while the server is down, none."""
        with self._lock:
            failure = self.outage.pop(0) if self.outage else ""
            self.failures += bool(failure)
        if not failure:
            return self.mint(self.lifetime)
        retry_at = self.story.at(time.time() + self.retry)
        self.story.say(f"{self.name} is down: get_access_token() {failure}; retry at {retry_at}")
        if failure.startswith("raises"):
            raise ConnectionError(f"{self.name} unreachable")
        return None


@dataclass
class Session:
    name: str
    server: TokenServer
    token: str = ""
    refreshes: int = 0
    done: threading.Event = field(default_factory=threading.Event)


def claims(token: str) -> tuple[int, float]:
    """The serial number and expiry (Unix seconds) of a token the demo minted."""
    payload = decode_jwt_payload(token)
    assert isinstance(payload, dict)
    return int(payload["jti"]), float(payload["exp"])


def run_demo(out: TextIO, speed: float = 1.0) -> int:
    """Tell the demo's story on ``out``; return 0 if every session was kept fresh, else 1."""
    finished = threading.Event()  # every session has ended, or the reader has gone
    story = Story(out, wake=finished.set)
    lifetime, buffer, follow_up, retry = (
        seconds / speed for seconds in (TOKEN_LIFETIME, REFRESH_BUFFER, FOLLOW_UP, RETRY_DELAY)
    )
    durations = {"lifetime": lifetime, "buffer": buffer, "follow_up": follow_up, "retry": retry}
    story.say(INTRO.format(total=10 / speed, **durations), stamp=False)
    servers = {name: TokenServer(name, story, lifetime, retry) for name in ("auth", "flaky-auth")}
    servers["flaky-auth"].outage = list(OUTAGE)
    sessions = {name: Session(name, servers[server]) for name, server, _ in SESSIONS}

    def on_refresh(session_id: str, token: str) -> None:
        session = sessions[session_id]
        session.token, session.refreshes = token, session.refreshes + 1
        serial, expires = claims(token)
        failures = session.server.failures if session.refreshes == 1 else 0
        recovered = f" (recovered after {failures} failures)" if failures else ""
        news = (
            f"{session_id:<5}  refreshed{recovered}: token #{serial}, expires {story.at(expires)}"
        )
        if session.refreshes < REFRESHES:
            story.say(f"{news}; next refresh at {story.at(time.time() + follow_up)}")
            return
        schedulers[session.server.name].cancel(session_id)  # allowed inside a callback
        story.say(f"{news}; session over: cancel()")
        session.done.set()
        if all(other.done.is_set() for other in sessions.values()):
            finished.set()

    schedulers = {
        name: Scheduler(
            server.get_access_token,
            on_refresh,
            label=name,
            refresh_buffer=buffer,
            retry_delay=retry,
            follow_up_interval=follow_up,
        )
        for name, server in servers.items()
    }
    try:
        for name, server, first_lifetime in SESSIONS:
            token = sessions[name].token = servers[server].mint(first_lifetime / speed)
            serial, expires = claims(token)
            schedulers[server].schedule(name, token)
            story.say(
                f"{name:<5}  has token #{serial} from {server}, expires {story.at(expires)}; "
                f"schedule() arms its refresh for {story.at(expires - buffer)}"
            )
        finished.wait(DEADLINE / speed)
        story.check()
        late = [s for s in sessions.values() if not s.done.is_set()]
        story.say("close() both schedulers: it cancels what is left and stops their threads")
    finally:
        for scheduler in schedulers.values():
            scheduler.close()
    ours = tuple(f"token-refresh-{name}" for name in servers)
    left = [thread.name for thread in threading.enumerate() if thread.name.startswith(ours)]
    story.say("\nSummary:", stamp=False)
    now = time.time()
    for session in sessions.values():
        serial, expires = claims(session.token)
        state = f"fresh for {expires - now:.1f}s more" if expires > now else "EXPIRED"
        story.say(
            f"  {session.name:<5}  {session.refreshes} refreshes, {session.server.failures} "
            f"failed attempts, holds token #{serial}, {state}",
            stamp=False,
        )
    problems = [f"{s.name} got {s.refreshes} of {REFRESHES} refreshes in time" for s in late] or [
        f"{s.name}'s token expired" for s in sessions.values() if claims(s.token)[1] <= now
    ]
    problems += [f"thread {name} is still running" for name in left]
    if problems:
        story.say(f"FAILED: {'; '.join(problems)}. --verbose shows the library's log.", stamp=False)
        return 1
    story.say(
        f"All {len(sessions)} sessions refreshed {REFRESHES} times and hold a fresh token; "
        "schedulers closed, no threads left.",
        stamp=False,
    )
    return 0
