"""Real pre-fork servers: gunicorn --preload and uWSGI's default mode, the Scheduler made at import.

Each test starts a real server on a free loopback port with the app in
``tests/prefork/app.py``: the master imports it (creating the Scheduler and
scheduling a "master" session), then forks two workers, each of which schedules
a session of its own. The test polls ``GET /status`` until both workers have
refreshed their own session at least twice and the master has gone on
refreshing its own; checks that no worker refreshes or even lists the master's
session, and that each worker logged one WARNING about it; then sends SIGTERM to
the master and times its exit.

The variants cover each way a worker's scheduler learns it was forked: gunicorn
with and without its ``post_fork`` hook (os.fork() runs the at-fork hook), and
uWSGI, whose C fork() runs no Python at-fork hook, with nothing but the
scheduler's pid check, with the ``@postfork`` hook, and with
``--py-call-uwsgi-fork-hooks``; and one of each with the heap timer backend.

One more test runs four gunicorn workers (``tests/prefork/oauth_app.py``) that
share one rotating ``RefreshTokenGrant`` through ``FileStore`` against the strict
token server of tests/strict_oauth.py: 50 rotations, no refresh token spent twice.

They need the ``prefork`` extra (Flask, gunicorn, uWSGI; uWSGI builds from
source). Without it these tests skip with the reason, except when ``CI=true``:
then a missing server is a failure, so CI cannot pass without running them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import token_refresh

pytestmark = [
    pytest.mark.realclock,
    pytest.mark.timeout(90),
    pytest.mark.skipif(not hasattr(os, "fork"), reason="pre-fork servers need os.fork()"),
]

TESTS_DIR = Path(__file__).resolve().parent
PREFORK_DIR = TESTS_DIR / "prefork"
#: Where the token_refresh this test imported lives: the servers must run the same one.
LIBRARY_ROOT = Path(token_refresh.__file__).resolve().parent.parent
APP = "prefork.app:app"
# Kept in step with tests/prefork/app.py, which the test process does not import
# (it would create a Scheduler and schedule a session here).
MASTER_SESSION = "master"
REFRESH_LOG_ENV = "PREFORK_REFRESH_LOG"
UWSGI_POSTFORK_ENV = "PREFORK_UWSGI_POSTFORK"
TIMERS_ENV = "PREFORK_TIMERS"

WORKERS = 2
MIN_REFRESHES = 2  # of each worker's own session, and of the master's after the fork
STARTUP_DEADLINE = 45.0  # seconds for all of that to be seen
SHUTDOWN_LIMIT = 2.0  # seconds from SIGTERM to the master's exit
SHUTDOWN_WAIT = 15.0  # how long to wait before giving up, so a slow exit is measured
#: Seconds each /status request keeps its worker busy, so that the request sent
#: alongside it is accepted by another worker: left alone, one idle worker tends
#: to win every accept() and the other is never seen.
HOLD = 0.25


def _require(what: str, available: bool) -> None:
    """Skip when ``what`` is missing, or fail when running in CI."""
    if available:
        return
    message = f"{what} is not installed: pip install '.[prefork]' (uWSGI needs a C compiler)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI=true, so this is a failure, not a skip", pytrace=False)
    pytest.skip(message)


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _uwsgi_binary() -> str | None:
    """The uwsgi executable built for this interpreter (``pip install uwsgi``), else one on PATH."""
    beside = Path(sys.executable).with_name("uwsgi")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("uwsgi")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Server:
    """A server started by :func:`_serve`: its master process, port and logs."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path  # the server's stdout and stderr
    refresh_log: Path  # "<time> <pid> <session>" for every delivery, in every process

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def deliveries(self) -> list[tuple[float, int, str]]:
        if not self.refresh_log.exists():
            return []
        lines = self.refresh_log.read_text(encoding="utf-8").splitlines()
        return [(float(t), int(pid), session) for t, pid, session in map(str.split, lines)]

    def context(self) -> str:
        """The server's output, for assertion messages."""
        return f"\n--- {self.name} output ({self.log_path}) ---\n{self.log()}"


@contextmanager
def _serve(
    name: str, command: list[str], port: int, tmp_path: Path, env: dict[str, str]
) -> Iterator[Server]:
    """Start ``command`` in a new process group; whatever happens, kill the group afterwards."""
    log_path = tmp_path / f"{name}.log"
    refresh_log = tmp_path / f"{name}-refreshes.log"
    pythonpath = [str(LIBRARY_ROOT), str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]
    full_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, pythonpath)),
        "PYTHONUNBUFFERED": "1",
        REFRESH_LOG_ENV: str(refresh_log),
        **env,
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            cwd=TESTS_DIR,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so the workers die with it
        )
    try:
        yield Server(name, process, port, log_path, refresh_log)
    finally:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def _fetch_status(port: int) -> dict[str, Any] | None:
    """One GET /status, or None if the server did not answer (yet)."""
    url = f"http://127.0.0.1:{port}/status?hold={HOLD}"
    try:
        with urllib.request.urlopen(url, timeout=5.0) as response:
            status: dict[str, Any] = json.loads(response.read())
            return status
    except urllib.error.HTTPError as error:
        error.close()
        return None
    except (OSError, ValueError):
        return None


def _master_refreshes_since(server: Server, since: float) -> int:
    master = server.process.pid
    return sum(
        1
        for when, pid, session in server.deliveries()
        if pid == master and session == MASTER_SESSION and when > since
    )


def _wait_for_workers(server: Server) -> dict[int, dict[str, Any]]:
    """Poll /status until every worker has refreshed its own session MIN_REFRESHES times.

    Also waits until the master has refreshed its own session MIN_REFRESHES
    times since the last worker's session began: the parent keeps its sessions.
    Returns the latest status of each worker seen, by pid.
    """
    latest: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + STARTUP_DEADLINE
    with ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="poll") as pool:
        while True:
            if server.process.poll() is not None:
                pytest.fail(
                    f"{server.name} exited with {server.process.returncode} before its workers "
                    f"were seen refreshing; statuses {latest}{server.context()}",
                    pytrace=False,
                )
            answers = list(pool.map(_fetch_status, [server.port] * WORKERS))
            for status in answers:
                if status is not None:
                    latest[status["pid"]] = status
            if len(latest) >= WORKERS and all(
                status["refreshes"] >= MIN_REFRESHES for status in latest.values()
            ):
                started = max(status["session_started_at"] for status in latest.values())
                if _master_refreshes_since(server, started) >= MIN_REFRESHES:
                    return latest
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{server.name}: not every worker refreshed its own session {MIN_REFRESHES} "
                    f"times, with the master refreshing too, within {STARTUP_DEADLINE}s; "
                    f"statuses {latest}; deliveries {Counter(server.deliveries())}"
                    f"{server.context()}",
                    pytrace=False,
                )
            if not any(answers):
                time.sleep(0.05)  # not up yet: poll again shortly, without spinning


def _worker_alive(pid: int) -> bool:
    """Whether ``pid`` is still a live process (a zombie awaiting its reaper is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: fall back on kill(0), which counts zombies as alive
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _check_workers(
    server: Server, statuses: dict[int, dict[str, Any]], *, at_fork_hooks: bool, timers: str
) -> None:
    """The checks common to every server: pre-fork, own sessions only, one WARNING each."""
    master = server.process.pid
    context = f"statuses {statuses}{server.context()}"
    assert len(statuses) == WORKERS, (
        f"expected {WORKERS} workers, saw {sorted(statuses)}; {context}"
    )
    assert master not in statuses, context
    for pid, status in statuses.items():
        # Imported in the master and inherited: the pre-fork case, not --lazy-apps.
        assert status["imported_in_pid"] == master, context
        assert status["session"] == f"worker-{pid}", context
        assert status["sessions"] == [status["session"]], context
        assert set(status["refreshes_by_session"]) == {status["session"]}, context
        assert status["stats"]["sessions"] == 1, context
        assert status["at_fork_hook_ran"] is at_fork_hooks, context
        assert status["timers"] == timers, context
    refreshed_master = {pid for _, pid, session in server.deliveries() if session == MASTER_SESSION}
    assert refreshed_master == {master}, (
        f"master session refreshed in {refreshed_master}; {context}"
    )
    warnings = Counter(
        line.split("pid=", 1)[1].split()[0]
        for line in server.log().splitlines()
        if line.startswith("WARNING token_refresh pid=")
    )
    assert warnings == Counter({str(pid): 1 for pid in statuses}), (
        f"expected one token_refresh WARNING from each worker and none from the master, "
        f"got {dict(warnings)}; {context}"
    )


def _stop(server: Server, worker_pids: list[int]) -> None:
    """SIGTERM the master; check it exits cleanly, workers and all, within SHUTDOWN_LIMIT."""
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    try:
        returncode = server.process.wait(timeout=SHUTDOWN_WAIT)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"{server.name} master still running {SHUTDOWN_WAIT}s after SIGTERM{server.context()}",
            pytrace=False,
        )
    elapsed = time.monotonic() - started
    print(f"{server.name}: master exited {elapsed:.3f}s after SIGTERM, status {returncode}")
    assert returncode == 0, f"{server.name} exited with {returncode}{server.context()}"
    left = [pid for pid in worker_pids if _worker_alive(pid)]
    assert not left, f"workers {left} outlived the {server.name} master{server.context()}"
    assert elapsed < SHUTDOWN_LIMIT, (
        f"{server.name} master took {elapsed:.2f}s to exit after SIGTERM "
        f"(limit {SHUTDOWN_LIMIT}s){server.context()}"
    )


@pytest.mark.parametrize(
    ("config", "timers"),
    [
        # The documented hook: post_fork calls after_fork() (a no-op by then).
        pytest.param("gunicorn.conf.py", "thread", id="post-fork-hook"),
        # No hook: the scheduler's os.register_at_fork hook alone; the first
        # request schedules the worker's session.
        pytest.param("gunicorn_no_post_fork.conf.py", "thread", id="at-fork-only"),
        pytest.param("gunicorn.conf.py", "heap", id="post-fork-hook-heap-timers"),
    ],
)
def test_gunicorn_preload_workers_refresh_only_their_own_sessions(
    tmp_path: Path, config: str, timers: str
) -> None:
    """Under gunicorn --preload each worker refreshes its own session, never the master's."""
    _require("flask", _has_module("flask"))
    _require("gunicorn", _has_module("gunicorn"))
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "--preload",
        "--workers",
        str(WORKERS),
        "--bind",
        f"127.0.0.1:{port}",
        "--config",
        str(PREFORK_DIR / config),
        "--chdir",
        str(TESTS_DIR),
        APP,
    ]
    with _serve("gunicorn", command, port, tmp_path, {TIMERS_ENV: timers}) as server:
        statuses = _wait_for_workers(server)
        # os.fork() runs the at-fork hooks, so post_fork's after_fork() finds nothing to do.
        _check_workers(server, statuses, at_fork_hooks=True, timers=timers)
        _stop(server, list(statuses))


@pytest.mark.parametrize(
    ("postfork", "fork_hooks", "timers"),
    [
        # Nothing calls after_fork() and no at-fork hook runs: the pid check alone.
        pytest.param(False, False, "thread", id="pid-check"),
        # The documented hook: uwsgidecorators' @postfork calls after_fork().
        pytest.param(True, False, "thread", id="postfork-hook"),
        # --py-call-uwsgi-fork-hooks: uWSGI takes the GIL around fork() and runs
        # CPython's at-fork hooks, os.register_at_fork's included.
        pytest.param(False, True, "thread", id="uwsgi-fork-hooks"),
        # Heap timers: the heap thread, started at import, must be parked (not
        # starting up) when uWSGI forks without taking the GIL; it once was not
        # (about 1 start in 6 hung). A thread backend's alarm thread that
        # schedule() had woken hung about half the starts of pid-check, hence
        # Parking: a call returns once the threads it started or woke parked.
        pytest.param(False, False, "heap", id="pid-check-heap-timers"),
        pytest.param(False, True, "heap", id="uwsgi-fork-hooks-heap-timers"),
    ],
)
def test_uwsgi_prefork_workers_refresh_only_their_own_sessions(
    tmp_path: Path, postfork: bool, fork_hooks: bool, timers: str
) -> None:
    """Under uWSGI's default mode each worker refreshes its own session, never the master's."""
    _require("flask", _has_module("flask"))
    uwsgi = _uwsgi_binary()
    _require("uwsgi", uwsgi is not None)
    assert uwsgi is not None
    port = _free_port()
    command = [
        uwsgi,
        "--strict",
        "--master",
        "--processes",
        str(WORKERS),
        "--http-socket",
        f"127.0.0.1:{port}",
        # Python threads: always on since uWSGI 2.0.27 (a stub option now);
        # needed before that, or the app's threads do not run.
        "--enable-threads",
        "--die-on-term",  # SIGTERM stops uWSGI 2.0 rather than reloading it
        "--need-app",
        "--home",
        sys.prefix,
        "--chdir",
        str(TESTS_DIR),
        "--pythonpath",
        str(TESTS_DIR),
        "--module",
        APP,
        "--disable-logging",  # no request lines
        *(["--py-call-uwsgi-fork-hooks"] if fork_hooks else []),
    ]
    env = {UWSGI_POSTFORK_ENV: "1" if postfork else "0", TIMERS_ENV: timers}
    with _serve("uwsgi", command, port, tmp_path, env) as server:
        statuses = _wait_for_workers(server)
        # uWSGI forks in C: unless told to, it runs no Python at-fork hook.
        _check_workers(server, statuses, at_fork_hooks=fork_hooks, timers=timers)
        for status in statuses.values():
            assert status["uwsgi_postfork_ran"] is postfork, f"{statuses}{server.context()}"
        _stop(server, list(statuses))


# -- one rotating refresh token, four gunicorn workers -------------------------------------

ROTATIONS = 50
ROTATION_WORKERS = 4
ROTATION_CLIENTS = 8  # concurrent requests, so that every worker takes some


def _rotate_once(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10.0) as response:
            answer: dict[str, Any] = json.loads(response.read())
            return answer
    except (OSError, ValueError):
        return None  # not up yet


def test_gunicorn_workers_share_one_rotating_refresh_token(tmp_path: Path) -> None:
    """4 gunicorn workers, one RefreshTokenGrant through FileStore: 50 rotations, none refused.

    The token server refuses a refresh token presented twice (invalid_grant) and
    records each one presented: none may show twice.
    """
    _require("gunicorn", _has_module("gunicorn"))
    from strict_oauth import Client, StrictTokenServer

    secret = "s3cr+t/=:%x"
    port = _free_port()
    tokens = StrictTokenServer(lifetime=600, clients={"rotating-client": Client(secret, "basic")})
    command = [
        *(sys.executable, "-m", "gunicorn", "--workers", str(ROTATION_WORKERS)),
        *("--bind", f"127.0.0.1:{port}", "--chdir", str(TESTS_DIR)),
        *("--config", str(PREFORK_DIR / "gunicorn_no_post_fork.conf.py"), "prefork.oauth_app:app"),
    ]
    answers: list[dict[str, Any]] = []
    with tokens:
        env = {
            "ROTATION_TOKEN_URL": tokens.token_url,
            "ROTATION_SECRET": secret,
            "ROTATION_REFRESH_TOKEN": tokens.issue_refresh_token(),
            "ROTATION_STORE": str(tmp_path / "store"),
        }
        with _serve("gunicorn-rotation", command, port, tmp_path, env) as server:
            deadline = time.monotonic() + STARTUP_DEADLINE
            with ThreadPoolExecutor(ROTATION_CLIENTS, thread_name_prefix="rotate") as pool:
                # Until 50 rotations are made and every worker has made some.
                while (
                    len(tokens.presented) < ROTATIONS
                    or len({answer["pid"] for answer in answers}) < ROTATION_WORKERS
                ):
                    assert time.monotonic() < deadline, f"{answers}{server.context()}"
                    got = list(pool.map(_rotate_once, [port] * ROTATION_CLIENTS))
                    answers += [answer for answer in got if answer is not None]
                    if not any(got):
                        time.sleep(0.05)  # not up yet: poll again shortly, without spinning
            _stop(server, sorted({answer["pid"] for answer in answers}))

    outcomes = Counter(seen.outcome for seen in tokens.seen)
    context = f"outcomes {outcomes}; answers {answers}{server.context()}"
    assert [answer for answer in answers if answer["error"]] == [], context
    assert outcomes == {"ok": len(tokens.presented)}, context
    assert len(tokens.presented) >= ROTATIONS, context
    assert len(set(tokens.presented)) == len(tokens.presented), context
    assert len({answer["pid"] for answer in answers}) == ROTATION_WORKERS, context
