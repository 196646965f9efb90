"""Shared fixtures: a ManualClock scheduler, JWT minting, a re-raising thread."""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from token_refresh import Scheduler, _scheduler
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


@pytest.fixture
def sub_second_delays(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lower the 1 s floor of retry_delay and follow_up_interval, for a fast real-clock story.

    Only for the demo and end-to-end tests, which shrink minutes to fractions
    of a second; every other test keeps the floor users get.
    """
    monkeypatch.setattr(_scheduler, "MIN_DELAY", 0.01)


@pytest.fixture(params=["thread", "heap"])
def timer_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test once per real timer backend, as the default for every Scheduler it makes."""
    defaults = Scheduler.__init__.__kwdefaults__
    assert defaults is not None
    assert "timers" in defaults
    monkeypatch.setitem(defaults, "timers", request.param)
    return str(request.param)


class HungUp(io.StringIO):
    """An output stream whose reader goes away after ``lines`` lines: then writes fail."""

    def __init__(self, lines: int = 0) -> None:
        super().__init__()
        self.lines = lines

    def write(self, text: str) -> int:
        if self.getvalue().count("\n") >= self.lines:
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(text)


# -- The real OAuth2 server: oauth2-mock-server under Node (test_e2e.py, test_cli.py) ----------
#
# tests/e2e/server.mjs runs it on 127.0.0.1 with short-lived tokens and faults on demand. It
# needs Node.js 20.19+ and `npm ci --prefix tests/e2e`; without them its tests skip, except
# under CI=true, where they fail. pytest does not run npm itself: installing is a setup step,
# like `pip install ".[test]"`, and a test run should not reach for a registry.

E2E_DIR = Path(__file__).parent / "e2e"
NODE_MINIMUM = (20, 19)


@functools.cache
def mock_server_unavailable() -> str | None:
    """Why the mock OAuth2 server cannot run here, or None if it can."""
    node = shutil.which("node")
    if node is None:
        return "node is not on PATH: the end-to-end tests need Node.js 20.19 or newer"
    version = subprocess.run(
        [node, "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout.strip()
    numbers = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if numbers < NODE_MINIMUM:
        return f"node {version or '(unknown version)'} is too old: oauth2-mock-server needs 20.19+"
    if not (E2E_DIR / "node_modules" / "oauth2-mock-server").is_dir():
        return "tests/e2e/node_modules is missing: run `npm ci --prefix tests/e2e`"
    return None


def require_mock_server() -> None:
    """Skip the calling test if the mock server cannot run; under CI=true, fail it."""
    reason = mock_server_unavailable()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the end-to-end tests must run, not skip)", pytrace=False)
    pytest.skip(reason)


def terminate(process: subprocess.Popen[str]) -> None:
    """SIGTERM, wait up to 5 seconds, then SIGKILL."""
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class MockOAuthServer:
    """oauth2-mock-server in a Node process on 127.0.0.1: short-lived tokens, faults on demand."""

    def __init__(self, lifetime: float, *, wrapper: tuple[str, ...] = ()) -> None:
        self.lifetime = lifetime
        self.wrapper = wrapper  # a command the server runs under (faketime and its offset)
        self.port = 0  # 0 until started: the OS picks; a restart keeps the port
        self.output: list[str] = []  # every line it printed, for failure messages
        self._process: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader: threading.Thread | None = None

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token_url(self) -> str:
        return f"{self.issuer}/token"

    def start(self) -> None:
        """Start the server (on the same port as before, after a stop) and wait until it listens."""
        assert self._process is None, "already running"
        self._process = subprocess.Popen(
            [
                *self.wrapper,
                "node",
                "server.mjs",
                "--port",
                str(self.port),
                "--lifetime",
                str(self.lifetime),
            ],
            cwd=E2E_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._lines = queue.Queue()
        self._reader = threading.Thread(
            target=self._read, args=(self._process, self._lines), name="mock-oauth-output"
        )
        self._reader.start()
        self.port = int(self._expect("listening ").rpartition(":")[2])

    def command(self, line: str) -> None:
        """Send one command to server.mjs and wait until it is in effect."""
        assert self._process is not None, "not running"
        stdin = self._process.stdin
        assert stdin is not None
        stdin.write(f"{line}\n")
        stdin.flush()
        self._expect(f"ok {line}")

    def fail(self, count: int, fault: str) -> None:
        """Answer the next ``count`` token requests with ``http500`` or ``invalid_grant``."""
        self.command(f"fail {count} {fault}")

    def stop(self) -> None:
        """Stop the server process: terminate, wait, kill if it lingers. Idempotent."""
        process, self._process = self._process, None
        if process is None:
            return
        terminate(process)
        assert self._reader is not None
        self._reader.join(timeout=5)  # it ends at the end of the output
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()

    @staticmethod
    def _read(process: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    def _expect(self, prefix: str, timeout: float = 20.0) -> str:
        """The next line starting with ``prefix``; an AssertionError if it does not come."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"mock OAuth2 server: no {prefix!r} line within {timeout}s: {self.output}"
                ) from None
            if line is None:
                raise AssertionError(f"mock OAuth2 server exited: {self.output}")
            self.output.append(line)
            if line.startswith(prefix):
                return line
            if line.startswith("error "):
                raise AssertionError(f"mock OAuth2 server refused a command: {line}")


@pytest.fixture
def oauth_server() -> Iterator[MockOAuthServer]:
    """A running mock OAuth2 server whose tokens live 3 seconds; stopped afterwards."""
    require_mock_server()
    server = MockOAuthServer(lifetime=3)
    try:
        server.start()
        yield server
    finally:
        server.stop()


# -- libfaketime (Debian's faketime): a token server whose clock is off (test_clocks_e2e.py) -----


def require_faketime() -> str:
    """faketime's path; the calling test skips without it, and fails under CI=true."""
    path = shutil.which("faketime")
    if path is not None:
        return path
    reason = "faketime is not on PATH: `apt-get install faketime` (Debian's libfaketime)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the clock tests must run, not skip)", pytrace=False)
    pytest.skip(reason)


# -- A real Redis: Debian's redis-server on a unix socket in a temp dir (test_shared.py) --------
#
# Each test that asks for `redis_server` gets its own server, no persistence, no TCP port.
# Without redis-server (`apt-get install redis-server`) or redis-py (the test extra) the
# tests skip; under CI=true they fail, as the end-to-end tests do.


@functools.cache
def redis_unavailable() -> str | None:
    """Why a real Redis cannot run here, or None if it can."""
    if shutil.which("redis-server") is None:
        return "redis-server is not on PATH: apt-get install redis-server"
    try:
        import redis  # noqa: F401
    except ImportError:
        return 'redis-py is not installed: pip install ".[test]"'
    return None


class RedisServer:
    """redis-server on a unix socket in ``directory``; started, frozen, thawed and stopped."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.socket = directory / "redis.sock"
        self._process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self._process = subprocess.Popen(
            [
                *("redis-server", "--port", "0", "--unixsocket", str(self.socket)),
                *("--unixsocketperm", "700", "--save", "", "--appendonly", "no"),
                *("--dir", str(self.directory)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self._process.stdout is not None
        seen: list[str] = []
        for line in self._process.stdout:  # pytest-timeout bounds this
            seen.append(line)
            if "ready to accept connections" in line.lower():
                break
        else:
            raise AssertionError(f"redis-server exited: {''.join(seen)}")
        # Keep draining its log so that the pipe never fills.
        threading.Thread(target=self._process.stdout.read, daemon=True).start()

    def client(self, **options: Any) -> Any:
        """A new redis-py client for this server (``options`` as redis.Redis takes them)."""
        import redis

        return redis.Redis(unix_socket_path=str(self.socket), **options)

    def freeze(self) -> None:
        """Stop the server process (SIGSTOP): connections stay open and nothing answers."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Stop the server (idempotent); its socket file goes with it."""
        process, self._process = self._process, None
        if process is None:
            return
        process.send_signal(signal.SIGCONT)  # a frozen server cannot act on SIGTERM
        terminate(process)
        if process.stdout is not None:
            process.stdout.close()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A running redis-server of this test's own, on a unix socket; stopped afterwards."""
    reason = redis_unavailable()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: the Redis tests must run, not skip)", pytrace=False)
        pytest.skip(reason)
    # A short directory: a unix socket path must fit in 108 bytes.
    server = RedisServer(Path(tempfile.mkdtemp(prefix="redis-")))
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.directory, ignore_errors=True)
