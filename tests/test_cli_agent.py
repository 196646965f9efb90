"""``token-refresh agent``: its file, its sinks, and the agent as a real process."""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from test_cli import FakeIssuer

from token_refresh import RetryPolicy
from token_refresh.cli import main
from token_refresh.cli._agent import ConfigError, load_config, write_sink

from conftest import terminate
from strict_oauth import Client, StrictTokenServer, answer

SECRET = "agent-s3cr+t-do-not-show"
PYTHON_M = [sys.executable, "-m", "token_refresh"]


@pytest.fixture
def issuer() -> Iterator[FakeIssuer]:
    """A token server minting unsigned JWTs, with metadata for discovery."""
    fake = FakeIssuer()
    yield fake
    fake.close()


def config_text(store: Path, keys: Mapping[str, Mapping[str, object]]) -> str:
    """A TOML file: ``store`` and one table per key (values as TOML literals via JSON)."""
    lines = [f"store = {json.dumps(str(store))}"]
    for name, table in keys.items():
        lines.append(f"[keys.{name}]")
        lines += [f"{field} = {json.dumps(value)}" for field, value in table.items()]
    return "\n".join(lines) + "\n"


def write_config(path: Path, store: Path, keys: Mapping[str, Mapping[str, object]]) -> Path:
    path.write_text(config_text(store, keys))
    return path


def jwt_exp(token: str) -> float:
    segment = token.split(".")[1]
    return float(json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))["exp"])


# -- the file -------------------------------------------------------------------------------------


class TestConfig:
    def test_a_full_file(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Every setting read; secrets from the environment and from a file."""
        monkeypatch.setenv("BILLING_SECRET", SECRET)
        (tmp_path / "secret").write_text(f"{SECRET}-2\n")
        path = write_config(
            tmp_path / "agent.toml",
            tmp_path / "store",
            {
                "billing": {
                    "token_endpoint": "https://auth.example/token",
                    "client_id": "billing",
                    "client_secret_env": "BILLING_SECRET",
                    "scope": ["a", "b"],
                    "audience": "https://billing.example",
                    "client_auth": "post",
                    "refresh_buffer": 120,
                    "sink": str(tmp_path / "sink"),
                },
                "search": {
                    "issuer": "https://auth.example",
                    "client_id": "search",
                    "client_secret_file": str(tmp_path / "secret"),
                },
            },
        )

        config = load_config(path)

        assert config.store == tmp_path / "store"
        billing, search = config.keys
        assert (billing.name, billing.refresh_buffer, billing.sink) == (
            "billing",
            120.0,
            tmp_path / "sink",
        )
        assert billing.grant.client_secret == SECRET
        assert (billing.grant.scope, billing.grant.client_auth) == (["a", "b"], "post")
        assert (search.grant.issuer, search.grant.client_secret) == (
            "https://auth.example",
            f"{SECRET}-2",
        )
        assert (search.refresh_buffer, search.sink) == (300.0, None)
        assert SECRET not in repr(config)

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("store = ", "not TOML"),
            ('store = "/s"\nwho = 1\n[keys.a]\n', "unknown setting 'who'"),
            ("[keys.a]\nclient_id = 'x'\n", "store = DIR is missing"),
            ('store = "/s"\n', "no [keys.NAME] table"),
            ('store = "/s"\nkeys = {a = 1}\n', "[keys.a] must be a table"),
            (
                'store = "/s"\n[keys.a]\nclient_secret = "hunter2"\n',
                "a secret never goes in the file",
            ),
            ('store = "/s"\n[keys.a]\nsecret = "x"\n', "unknown setting 'secret'"),
            ('store = "/s"\n[keys.a]\nclient_id = "x"\n', "give issuer or token_endpoint"),
            (
                'store = "/s"\n[keys.a]\nissuer = "https://a"\ntoken_endpoint = "https://a/t"\n',
                "give issuer or token_endpoint",
            ),
            ('store = "/s"\n[keys.a]\nissuer = "http://a.example"\n', "must be an https:// URL"),
            (
                'store = "/s"\n[keys.a]\ntoken_endpoint = "https://a/t"\nclient_auth = "jwt"\n',
                "client_auth must be one of basic, post, none, auto",
            ),
            (
                'store = "/s"\n[keys.a]\ntoken_endpoint = "https://a/t"\nscope = 3\n',
                "scope must be a string or a list of strings",
            ),
            (
                'store = "/s"\n[keys.a]\ntoken_endpoint = "https://a/t"\nclient_id = 3\n',
                "client_id must be a non-empty str",
            ),
            (
                'store = "/s"\n[keys.a]\ntoken_endpoint = "https://a/t"\nclient_id = "x"\n'
                "refresh_buffer = -1\n",
                "refresh_buffer must not be negative",
            ),
            (
                'store = "/s"\n[keys.a]\ntoken_endpoint = "https://a/t"\nclient_id = "x"\n'
                "refresh_buffer = true\n",
                "refresh_buffer must be a number of seconds",
            ),
            (
                'store = "/s"\n[keys.a]\ntoken_endpoint = "https://a/t"\nclient_id = "x"\n'
                "sink = 1\n",
                "sink must be a path",
            ),
            (
                'store = "/s"\n[keys.a]\ntoken_endpoint = "https://a/t"\nclient_id = "x"\n'
                'client_secret_env = "TOKEN_REFRESH_TEST_UNSET"\n',
                "$TOKEN_REFRESH_TEST_UNSET is not set",
            ),
            (
                'store = "/s"\n[keys.a]\ntoken_endpoint = "https://a/t"\nclient_id = "x"\n'
                'client_secret_env = "A"\nclient_secret_file = "/f"\n',
                "not both",
            ),
            (
                'store = "/s"\n[keys.a]\ntoken_endpoint = "https://a/t"\nclient_id = "x"\n'
                'client_secret_file = "/nonexistent/secret"\n',
                "client_secret_file: No such file or directory",
            ),
        ],
    )
    def test_mistakes(self, tmp_path: Path, text: str, message: str) -> None:
        """Each mistake is a ConfigError naming the file and the table; never a secret."""
        path = tmp_path / "agent.toml"
        path.write_text(text)

        with pytest.raises(ConfigError) as raised:
            load_config(path)

        assert message in str(raised.value)
        assert str(raised.value).startswith(f"{path}: ")
        assert "hunter2" not in str(raised.value)

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="No such file or directory"):
            load_config(tmp_path / "absent.toml")


class TestSink:
    def test_written_0600_atomically(self, tmp_path: Path) -> None:
        """The sink holds the token alone, mode 0600, in a directory made 0700."""
        sink = tmp_path / "run" / "token"
        write_sink(sink, "first")
        write_sink(sink, "second")

        assert sink.read_text() == "second"
        assert stat.S_IMODE(sink.stat().st_mode) == 0o600
        assert stat.S_IMODE(sink.parent.stat().st_mode) == 0o700
        assert sorted(p.name for p in sink.parent.iterdir()) == ["token"]

    def test_a_failed_write_leaves_no_temporary_file(self, tmp_path: Path) -> None:
        """A sink path that is a directory: the error is raised, the temporary file is gone."""
        (tmp_path / "token").mkdir()

        with pytest.raises(IsADirectoryError):
            write_sink(tmp_path / "token", "t")

        assert [p.name for p in tmp_path.iterdir()] == ["token"]


# -- the agent in this process (signals to ourselves) ----------------------------------------------


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    give_up = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < give_up, "timed out"
        time.sleep(0.01)


class Signaller(threading.Thread):
    """For each step, wait for its condition and then do its action (signals to this process).

    On a failure it stops the agent with SIGTERM, unless the agent has returned
    (``finished``): then the default SIGTERM handler would end the test run.
    """

    def __init__(self, steps: Sequence[tuple[Callable[[], bool], Callable[[], object]]]) -> None:
        super().__init__(name="test-signaller")
        self.steps = steps
        self.failures: list[BaseException] = []
        self.finished = threading.Event()

    def run(self) -> None:
        try:
            for condition, action in self.steps:
                wait_for(lambda c=condition: c() or self.finished.is_set())  # type: ignore[misc]
                if self.finished.is_set():
                    raise AssertionError("the agent returned before the steps were done")
                action()
        except BaseException as error:
            self.failures.append(error)
            if not self.finished.is_set():
                os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.realclock
@pytest.mark.timeout(60)
class TestAgentInProcess:
    def test_keeps_keys_fresh_reloads_and_stops(
        self,
        issuer: FakeIssuer,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """JWT and opaque keys refreshed; SIGHUP adds a key, a bad file is refused; SIGTERM: 0."""
        issuer.lifetime = 1.0
        hangup_handler = signal.getsignal(signal.SIGHUP)  # SIG_IGN under nohup
        sink = tmp_path / "jwt.token"
        path = tmp_path / "agent.toml"
        jwt_key = {
            "issuer": issuer.url,
            "client_id": "svc",
            "refresh_buffer": 0.5,
            "sink": str(sink),
        }
        write_config(path, tmp_path / "store", {"jwt": jwt_key})
        strict = StrictTokenServer(clients={"svc": Client(SECRET, "basic")})
        unknown = StrictTokenServer(lifetime=0, clients={"svc": Client(None, "none")})
        monkeypatch.setenv("OPAQUE_SECRET", SECRET)
        opaque_key = {
            "token_endpoint": "",
            "client_id": "svc",
            "client_secret_env": "OPAQUE_SECRET",
            "sink": str(tmp_path / "opaque.token"),
        }
        with strict, unknown:
            opaque_key["token_endpoint"] = strict.token_url
            unknown_key = {"token_endpoint": unknown.token_url, "client_id": "svc"}
            reloaded: dict[str, Mapping[str, object]] = {
                "jwt": jwt_key,
                "opaque": opaque_key,
                "unknown": unknown_key,
            }
            steps = [
                (lambda: len(issuer.token_requests()) >= 3, lambda: None),  # refreshed twice
                (lambda: True, lambda: write_config(path, tmp_path / "store", reloaded)),
                (lambda: True, lambda: os.kill(os.getpid(), signal.SIGHUP)),
                (lambda: (tmp_path / "opaque.token").exists() and unknown.seen != [], lambda: None),
                (lambda: True, lambda: path.write_text("store = ")),
                (lambda: True, lambda: os.kill(os.getpid(), signal.SIGHUP)),
                (lambda: True, lambda: time.sleep(0.2)),
                (lambda: True, lambda: os.kill(os.getpid(), signal.SIGTERM)),
            ]
            signaller = Signaller(steps)
            signaller.start()
            status, out, err = 0, "", ""
            try:
                status = main(["agent", "--config", str(path)])
            finally:
                signaller.finished.set()
                signaller.join(timeout=20)
            out, err = capsys.readouterr()

        assert signaller.failures == []
        assert (status, out) == (0, "")
        assert sink.read_text() in issuer.issued
        assert (tmp_path / "opaque.token").read_text() == "at-1"
        assert "keeping 1 keys fresh in" in err
        assert "keeping 3 keys fresh in" in err
        assert "reload failed, keeping the keys as they were: " in err
        assert "not TOML" in err
        refreshes = [line for line in err.splitlines() if ": key " in line]
        assert len([line for line in refreshes if "key jwt:" in line]) >= 3
        assert any("key opaque: token " in line for line in refreshes)
        assert any(
            "key unknown: token " in line and "expires unknown" in line for line in refreshes
        )
        for token in [*issuer.issued, "at-1"]:
            assert token not in err
        assert SECRET not in err
        assert "stopping" in err
        assert signal.getsignal(signal.SIGHUP) == hangup_handler

    def test_bad_file_at_start_exits_2(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A file that cannot be used at start: one error line, exit status 2."""
        path = tmp_path / "agent.toml"
        path.write_text('store = "/s"\n')

        with pytest.raises(SystemExit) as exit_info:
            main(["agent", "--config", str(path)])

        assert exit_info.value.code == 2
        assert f"token-refresh: error: {path}: no [keys.NAME] table" in capsys.readouterr().err

    def test_unusable_store_exits_3(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A store directory others may write to: exit status 3."""
        store = tmp_path / "store"
        store.mkdir(mode=0o777)
        store.chmod(0o777)
        path = write_config(
            tmp_path / "agent.toml",
            store,
            {"a": {"token_endpoint": "http://127.0.0.1:9/t", "client_id": "x"}},
        )

        with pytest.raises(SystemExit) as exit_info:
            main(["agent", "--config", str(path)])

        assert exit_info.value.code == 3
        assert "must be a real directory of this user" in capsys.readouterr().err


# -- the agent as a real process --------------------------------------------------------------


class AgentProcess:
    """``python -m token_refresh agent`` in a process of its own; its log lines on a queue."""

    def __init__(self, config: Path) -> None:
        self.process = subprocess.Popen(
            [*PYTHON_M, "agent", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        self._reader = threading.Thread(target=self._read, name="agent-log")
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.put(line)

    def expect(self, text: str, timeout: float = 20.0) -> str:
        give_up = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, give_up - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {text!r} in the agent's log: {self.log}") from None
            self.log.append(line)
            if text in line:
                return line

    def stop(self) -> tuple[int, float]:
        """SIGTERM; the exit status and how long it took."""
        began = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        status = self.process.wait(timeout=15)
        took = time.monotonic() - began
        self.close()
        return status, took

    def close(self) -> None:
        if self.process.poll() is None:
            terminate(self.process)
        self._reader.join(timeout=5)
        while not self.lines.empty():
            self.log.append(self.lines.get())
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()


#: A curl stand-in: read "Authorization: Bearer ..." on stdin, GET argv[1] with it.
URLLIB_CALL = """
import sys, urllib.request
name, _, value = sys.stdin.read().strip().partition(": ")
urllib.request.urlopen(urllib.request.Request(sys.argv[1], headers={name: value}), timeout=10)
"""


class ResourceServer:
    """An API on 127.0.0.1 that records the bearer token of every call and when it came."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, str]] = []
        resource = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                token = self.headers.get("Authorization", "").removeprefix("Bearer ")
                resource.seen.append((time.time(), token))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # no noise on stderr

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1/items"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.01,), name="resource-server"
        )

    def __enter__(self) -> ResourceServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    """Agents started by a test; every one still running is stopped afterwards."""
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.close()


@pytest.mark.realclock
@pytest.mark.timeout(90)
class TestAgentProcess:
    def test_sink_readers_and_shells_never_see_a_partial_or_expired_token(
        self, issuer: FakeIssuer, tmp_path: Path, agents: list[AgentProcess]
    ) -> None:
        """Over 3+ token lifetimes: sink reads are whole tokens; shells get unexpired ones."""
        issuer.lifetime = 2.0
        sink = tmp_path / "sinks" / "api.token"
        key = {"issuer": issuer.url, "client_id": "svc", "refresh_buffer": 1.0, "sink": str(sink)}
        agent = AgentProcess(
            write_config(tmp_path / "agent.toml", tmp_path / "store", {"api": key})
        )
        agents.append(agent)
        agent.expect("key api: token ")
        reads: list[str] = []
        printed: list[tuple[float, str]] = []
        stop = threading.Event()

        def read_sink() -> None:
            while not stop.is_set():
                reads.append(sink.read_text())

        reader = threading.Thread(target=read_sink, name="sink-reader")
        reader.start()
        argv = [*PYTHON_M, "token", "--store", str(tmp_path / "store"), "--key", "api"]
        argv += ["--issuer", issuer.url, "--client-id", "svc", "--min-ttl", "0.5"]
        argv += ["--format", "header"]
        try:
            with ResourceServer() as api:
                # A cron job's line: the header into curl (or Python's urllib without curl).
                call = (
                    f"curl -sf -H @- {api.url}"
                    if shutil.which("curl")
                    else f"{shlex.quote(sys.executable)} -c {shlex.quote(URLLIB_CALL)} {api.url}"
                )
                command = f"{shlex.join(argv)} | {call}"
                until = time.time() + 6.5
                while time.time() < until:
                    subprocess.run(["bash", "-c", command], check=True, capture_output=True)
                printed = api.seen
        finally:
            stop.set()
            reader.join(timeout=10)
        status, took = agent.stop()

        assert (status, took < 10) == (0, True)
        assert reads
        assert set(reads) <= set(issuer.issued)  # whole tokens only, never a partial file
        assert len(set(reads)) >= 3
        assert len(printed) >= 3  # a few calls over three lifetimes, even on a loaded machine
        for when, token in printed:
            assert token in issuer.issued
            assert jwt_exp(token) > when, "a shell sent an expired token"
        assert stat.S_IMODE(sink.stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "store").stat().st_mode) == 0o700
        assert stat.S_IMODE(sink.parent.stat().st_mode) == 0o700
        log = "".join(agent.log)
        for token in issuer.issued:
            assert token.split(".")[1] not in log
        refreshes = [line for line in agent.log if "key api: token " in line]
        assert len(refreshes) >= 4  # one line per refresh

    def test_restart_reuses_the_stored_token(
        self, issuer: FakeIssuer, tmp_path: Path, agents: list[AgentProcess]
    ) -> None:
        """An agent restarted while its token is good makes no new grant; SIGHUP neither."""
        issuer.lifetime = 600.0
        sink = tmp_path / "api.token"
        key = {"issuer": issuer.url, "client_id": "svc", "sink": str(sink)}
        config = write_config(tmp_path / "agent.toml", tmp_path / "store", {"api": key})
        first = AgentProcess(config)
        agents.append(first)
        first.expect("key api: token ")
        assert first.stop()[0] == 0
        sink.unlink()

        second = AgentProcess(config)
        agents.append(second)
        second.expect("key api: token ")
        second.process.send_signal(signal.SIGHUP)
        second.expect("keeping 1 keys fresh")
        second.expect("key api: token ")
        assert second.stop()[0] == 0

        assert len(issuer.token_requests()) == 1
        assert sink.read_text() == issuer.issued[0]


# -- the outage-proof retry policy --------------------------------------------------------------


RETRY_KEY = {"token_endpoint": "https://auth.example/token", "client_id": "x"}


class TestRetryConfig:
    def test_the_default_is_the_outage_proof_policy(self, tmp_path: Path) -> None:
        """Without a [retry] table every key runs on RetryPolicy()'s documented defaults."""
        path = write_config(tmp_path / "agent.toml", tmp_path / "store", {"a": RETRY_KEY})
        assert load_config(path).retry == RetryPolicy(
            first_delay=10, cap=300, multiplier=2, jitter=0.2
        )

    def test_a_retry_table_sets_it(self, tmp_path: Path) -> None:
        """[retry] sets first_delay, cap, multiplier and jitter."""
        path = tmp_path / "agent.toml"
        text = config_text(tmp_path / "store", {"a": RETRY_KEY})
        path.write_text(f"{text}[retry]\nfirst_delay = 1\ncap = 60\nmultiplier = 3\njitter = 0\n")
        assert load_config(path).retry == RetryPolicy(first_delay=1, cap=60, multiplier=3, jitter=0)

    @pytest.mark.parametrize(
        ("table", "message"),
        [
            ("[retry]\ntries = 5\n", "[retry]: unknown setting 'tries'"),
            ("[retry]\ncap = 7200\n", "[retry]: cap must be at most 3600"),
            ("[retry]\nfirst_delay = true\n", "[retry]: first_delay must be a number"),
        ],
    )
    def test_mistakes(self, tmp_path: Path, table: str, message: str) -> None:
        """A wrong [retry] table is a ConfigError naming it."""
        path = tmp_path / "agent.toml"
        path.write_text(f"{config_text(tmp_path / 'store', {'a': RETRY_KEY})}{table}")
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(path)

    def test_retry_must_be_a_table(self, tmp_path: Path) -> None:
        """retry = 3 is not a [retry] table."""
        path = tmp_path / "agent.toml"
        path.write_text(f"retry = 3\n{config_text(tmp_path / 'store', {'a': RETRY_KEY})}")
        with pytest.raises(ConfigError, match=re.escape("[retry] must be a table")):
            load_config(path)


@pytest.mark.realclock
@pytest.mark.timeout(60)
def test_agent_rides_out_an_outage(
    issuer: FakeIssuer, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    """Five 503s in a row (the seed gives up at three): the agent retries and gets its token."""
    issuer.lifetime = 600.0
    issuer.queue("/token", *[answer(503, {"error": "temporarily_unavailable"})] * 5)
    sink = tmp_path / "api.token"
    key = {"token_endpoint": f"{issuer.url}/token", "client_id": "svc", "sink": str(sink)}
    config = write_config(tmp_path / "agent.toml", tmp_path / "store", {"api": key})
    with config.open("a") as file:
        file.write("[retry]\nfirst_delay = 0.2\ncap = 0.4\njitter = 0\n")
    agent = AgentProcess(config)
    agents.append(agent)
    agent.expect("(failure 4, retrying until the error is terminal)")
    agent.expect("key api: token ")
    assert agent.stop()[0] == 0
    assert len(issuer.token_requests()) == 6
    assert sink.read_text() == issuer.issued[0]
    assert "Giving up" not in "".join(agent.log)


@pytest.mark.realclock
@pytest.mark.timeout(60)
def test_agent_stops_a_key_on_invalid_client(
    issuer: FakeIssuer, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    """invalid_client is terminal: one request, and the log says why the key stopped."""
    issuer.queue("/token", answer(401, {"error": "invalid_client"}))
    key = {"token_endpoint": f"{issuer.url}/token", "client_id": "svc"}
    config = write_config(tmp_path / "agent.toml", tmp_path / "store", {"api": key})
    agent = AgentProcess(config)
    agents.append(agent)
    line = agent.expect("Giving up on sessionId=api")
    assert "the error is terminal: invalid_client (failure 1)" in line
    assert agent.stop()[0] == 0
    assert len(issuer.token_requests()) == 1
