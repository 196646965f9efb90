"""End to end: a refused token is replaced once, for every thread and worker, with real servers.

The token server is oauth2-mock-server (tests/e2e). The resource server is
``tests/http_e2e/resource.py`` under a real gunicorn on an ephemeral loopback
port: it checks each bearer token, echoes the SHA-256 of the body it got, and
has an admin call that refuses every token issued before now. After one
warm-up call the test refuses the current token and sends 256 POSTs with 64 KiB
bodies at once; it holds when the token server saw exactly one new grant,
every call got a 200, and every attempt that reached the resource server
carried a whole body. A generator body gets its 401, unretried.

Two callers: the test process itself (32 threads, requests and httpx, with a
small source that has ``reject``), and ``tests/http_e2e/caller.py``, Flask under
gunicorn with 4 workers x 8 threads sharing one ``SharedToken`` through a
``FileStore``, which needs ``SharedToken.reject``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from test_prefork import TESTS_DIR, Server, _free_port, _has_module, _require, _serve

from token_refresh.http import HttpxAuth, RequestsAuth
from token_refresh.oauth import ClientCredentials
from token_refresh.shared import SharedToken

from conftest import MockOAuthServer, require_mock_server

pytestmark = [
    pytest.mark.realclock,
    pytest.mark.timeout(180),
    pytest.mark.skipif(not hasattr(os, "fork"), reason="gunicorn needs os.fork()"),
]

CONFIG = str(TESTS_DIR / "http_e2e" / "gunicorn.conf.py")
CALLS = 256
THREADS = 32
BODY_SIZE = 64 * 1024
STARTUP = 30.0  # seconds a server may take to answer


def _post(url: str, data: bytes = b"", timeout: float = 60) -> Any:
    request = urllib.request.Request(url, data=data, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _wait_until_up(server: Server, path: str) -> None:
    deadline = time.monotonic() + STARTUP
    while True:
        if server.process.poll() is not None:
            pytest.fail(f"{server.name} exited{server.context()}", pytrace=False)
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5).close()
            return
        except urllib.error.HTTPError as answered:  # up: it answered
            answered.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"{server.name} did not answer{server.context()}", pytrace=False)
            time.sleep(0.05)  # not listening yet: poll again shortly


def _gunicorn(app: str, port: int, workers: int, threads: int) -> list[str]:
    return [
        *(sys.executable, "-m", "gunicorn", "--config", CONFIG, "--chdir", str(TESTS_DIR)),
        *("--workers", str(workers), "--threads", str(threads), "--bind", f"127.0.0.1:{port}"),
        app,
    ]


class Resource:
    """The resource server under gunicorn: its URL, its admin call, the attempts it logged."""

    def __init__(self, server: Server, state: Path) -> None:
        self.server = server
        self.state = state
        self.url = f"http://127.0.0.1:{server.port}"

    def refuse_current_tokens(self) -> None:
        _post(f"{self.url}/admin/refuse")

    def attempts(self) -> list[tuple[int, str, int, str]]:
        """(status, token fingerprint, body length, body sha256) of every attempt, in order."""
        path = self.state / "attempts.log"
        lines = path.read_text(encoding="ascii").splitlines() if path.exists() else []
        return [(int(s), f, int(n), h) for s, f, n, h in map(str.split, lines)]


@pytest.fixture
def token_server() -> Iterator[MockOAuthServer]:
    """oauth2-mock-server issuing hour-long JWTs, so only a refusal makes a new grant."""
    require_mock_server()
    server = MockOAuthServer(lifetime=3600)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def _require_servers() -> None:
    _require("flask", _has_module("flask"))
    _require("gunicorn", _has_module("gunicorn"))


@pytest.fixture
def resource(token_server: MockOAuthServer, tmp_path: Path) -> Iterator[Resource]:
    _require_servers()
    state = tmp_path / "resource"
    state.mkdir()
    port = _free_port()
    env = {"RESOURCE_STATE": str(state), "RESOURCE_ISSUER": token_server.issuer}
    command = _gunicorn("http_e2e.resource:app", port, workers=2, threads=16)
    with _serve("resource", command, port, tmp_path, env) as server:
        _wait_until_up(server, "/data")
        yield Resource(server, state)


class Rejecting:
    """A token source with ``reject``, as SharedToken has: one fetch replaces a rejected token."""

    def __init__(self, token_url: str) -> None:
        self.token_url = token_url
        self.grants = 0
        self._current: str | None = None
        self._lock = threading.Lock()

    def __call__(self) -> str:
        with self._lock:  # concurrent callers wait for the one fetch
            if self._current is None:
                grant = ClientCredentials(self.token_url, "e2e", timeout=5)()
                self._current = grant.access_token
                self.grants += 1
            return self._current

    def reject(self, token: str) -> None:
        with self._lock:
            if token == self._current:
                self._current = None


def _check_attempts(resource: Resource, since: int, sent: set[str]) -> None:
    """Every attempt after ``since`` carried a whole body that a caller sent."""
    later = resource.attempts()[since:]
    assert later, "no attempt reached the resource server"
    for status, _, length, digest in later:
        assert status in (200, 401)
        assert length == BODY_SIZE
        assert digest in sent
    assert Counter(status for status, *_ in later)[200] == CALLS


def _fingerprints(resource: Resource, status: int) -> set[str]:
    return {f for s, f, _, _ in resource.attempts() if s == status}


def _send_from_here(client: str, auth: Any, url: str, body: Any) -> tuple[int, list[int], str]:
    if client == "requests":
        import requests

        with requests.Session() as session:
            session.auth = auth
            answer = session.post(url, data=body, timeout=60)
            history = [r.status_code for r in answer.history]
            return answer.status_code, history, answer.json()["sha256"] if answer.ok else ""
    import httpx

    with httpx.Client(auth=auth, timeout=60) as client_:
        reply = client_.post(url, content=body)
        history = [r.status_code for r in reply.history]
        return reply.status_code, history, reply.json()["sha256"] if reply.is_success else ""


@pytest.mark.parametrize("client", ["requests", "httpx"])
def test_threads_here_share_one_new_grant(
    resource: Resource, token_server: MockOAuthServer, client: str
) -> None:
    """32 threads, 256 POSTs after a refusal: one new grant, all 200, whole bodies."""
    source = Rejecting(token_server.token_url)
    auth = RequestsAuth(source) if client == "requests" else HttpxAuth(source)
    url = f"{resource.url}/data"
    assert _send_from_here(client, auth, url, b"warm-up")[0] == 200
    resource.refuse_current_tokens()
    since = len(resource.attempts())
    bodies = [os.urandom(BODY_SIZE) for _ in range(CALLS)]

    with ThreadPoolExecutor(THREADS) as pool:
        answers = list(pool.map(lambda body: _send_from_here(client, auth, url, body), bodies))

    assert source.grants == 2  # the warm-up's, and one after the refusal
    assert [status for status, _, _ in answers] == [200] * CALLS
    assert [echoed for _, _, echoed in answers] == [hashlib.sha256(b).hexdigest() for b in bodies]
    _check_attempts(resource, since, {hashlib.sha256(b).hexdigest() for b in bodies})
    assert len(_fingerprints(resource, 200)) == 2

    def generator() -> Iterator[bytes]:
        yield b"x" * 3000

    resource.refuse_current_tokens()
    status, history, _ = _send_from_here(client, auth, url, generator())
    assert (status, history) == (401, [])
    assert resource.attempts()[-1][2] == 3000  # sent once, whole
    assert source.grants == 2  # rejected; the next request fetches


@contextmanager
def _caller(
    token_server: MockOAuthServer, resource: Resource, tmp_path: Path
) -> Iterator[tuple[str, Path]]:
    state = tmp_path / "caller"
    state.mkdir()
    port = _free_port()
    env = {
        "CALLER_STATE": str(state),
        "CALLER_TOKEN_URL": token_server.token_url,
        "CALLER_RESOURCE": resource.url,
    }
    command = _gunicorn("http_e2e.caller:app", port, workers=4, threads=8)
    with _serve("caller", command, port, tmp_path, env) as server:
        _wait_until_up(server, "/")
        yield f"http://127.0.0.1:{port}", state


@pytest.mark.skipif(not hasattr(SharedToken, "reject"), reason="needs SharedToken.reject")
@pytest.mark.parametrize("client", ["requests", "httpx"])
def test_gunicorn_workers_share_one_new_grant(
    resource: Resource, token_server: MockOAuthServer, tmp_path: Path, client: str
) -> None:
    """Flask under gunicorn, 4 workers x 8 threads, FileStore: one new grant for 256 POSTs."""
    with _caller(token_server, resource, tmp_path) as (caller, state):
        grants = state / "grants.log"
        assert _post(f"{caller}/call/{client}")["status"] == 200
        assert len(grants.read_text().splitlines()) == 1
        resource.refuse_current_tokens()
        since = len(resource.attempts())

        with ThreadPoolExecutor(CALLS) as pool:
            answers = list(pool.map(lambda _: _post(f"{caller}/call/{client}"), range(CALLS)))

        assert len(grants.read_text().splitlines()) == 2  # exactly one new grant
        assert [a["status"] for a in answers] == [200] * CALLS
        assert all(a["echoed"] == a["sent"] for a in answers)
        assert len({a["pid"] for a in answers}) > 1  # more than one worker took part
        _check_attempts(resource, since, {a["sent"] for a in answers})

        resource.refuse_current_tokens()
        generator = _post(f"{caller}/generator/{client}")
        assert (generator["status"], generator["history"]) == (401, [])
        assert resource.attempts()[-1][2] == 3000
