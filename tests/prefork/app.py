"""A tiny Flask app whose Scheduler is created at import, for the real pre-fork servers.

Under ``gunicorn --preload`` or uWSGI's default (non-lazy) mode this module is
imported once, in the master, and every worker is a fork of it: the master's
Scheduler, with the master's "master" session pending, is inherited by each
worker. Each worker then schedules a session of its own, ``worker-<pid>``:

- gunicorn: the ``post_fork`` hook in ``gunicorn.conf.py`` calls
  ``scheduler.after_fork()`` and :func:`start_worker_session`
  (``gunicorn_no_post_fork.conf.py`` has no hook: the at-fork hook suffices);
- uWSGI with ``PREFORK_UWSGI_POSTFORK=1``: a ``@postfork`` hook (uwsgidecorators)
  does the same;
- otherwise the first request starts the session lazily, and nothing here calls
  ``after_fork()``: the scheduler must notice the new pid by itself.

``PREFORK_TIMERS=heap`` selects the Scheduler's heap timer backend (one timer
thread) instead of a ``threading.Timer`` per session.

``GET /status`` reports what this worker sees. With ``PREFORK_REFRESH_LOG`` set,
every delivery in every process is also appended to that file as
``<time> <pid> <session id>``, so the test can see the master's deliveries too.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
import json
import logging
import os
import sys
import threading
import time
from collections import Counter

from flask import Flask, Response, jsonify, request

from token_refresh import Scheduler, _scheduler, events

#: Seconds each minted token lives; with REFRESH_BUFFER, a new session refreshes 0.5 s in.
TOKEN_LIFETIME = 1.0
#: The master's first token lives longer, so that its first refresh comes well after
#: the workers are forked: uWSGI's default mode forks in C without taking the GIL,
#: and a worker forked while a master thread holds the GIL hangs for ever.
MASTER_TOKEN_LIFETIME = 2.0
REFRESH_BUFFER = 0.5
#: Then a follow-up refresh every FOLLOW_UP_INTERVAL seconds, for as long as the process lives.
FOLLOW_UP_INTERVAL = 0.5
RETRY_DELAY = 0.5

MASTER_SESSION = "master"
UWSGI_POSTFORK_ENV = "PREFORK_UWSGI_POSTFORK"
REFRESH_LOG_ENV = "PREFORK_REFRESH_LOG"
TIMERS_ENV = "PREFORK_TIMERS"  # the Scheduler's timer backend: "thread" (default) or "heap"

#: The process that imported the app: the master, in pre-fork mode.
IMPORTED_IN_PID = os.getpid()

_handler = logging.StreamHandler(sys.stderr)
_handler.setFormatter(logging.Formatter("%(levelname)s %(name)s pid=%(process)d %(message)s"))
_library_log = logging.getLogger("token_refresh")
_library_log.addHandler(_handler)
_library_log.setLevel(logging.WARNING)

# Per-process state, keyed by pid. Under uWSGI's default mode no at-fork hook
# runs, so a lock that a master thread held at the moment of the fork would stay
# held in the worker for ever: each process takes a lock of its own instead
# (dict.setdefault is atomic under the GIL).
_locks: dict[int, threading.Lock] = {}
_refreshes: Counter[tuple[int, str]] = Counter()  # (pid, session id) -> deliveries
_events: Counter[tuple[int, str]] = Counter()  # (pid, event type) -> count
_worker_started_at: dict[int, float] = {}  # pid -> when its session was first scheduled
_at_fork_hook_ran_in: set[int] = set()  # pids in which os.register_at_fork hooks ran
_uwsgi_postfork_ran_in: set[int] = set()
_minted: Counter[int] = Counter()  # pid -> tokens minted


def _process_lock() -> threading.Lock:
    return _locks.setdefault(os.getpid(), threading.Lock())


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def mint_token(lifetime: float = TOKEN_LIFETIME) -> str:
    """A fresh unsigned JWT-like token that expires ``lifetime`` seconds from now."""
    pid = os.getpid()
    with _process_lock():
        _minted[pid] += 1
        serial = _minted[pid]
    payload = {"sub": "prefork-test", "pid": pid, "n": serial, "exp": time.time() + lifetime}
    header = _b64url(b'{"alg":"none","typ":"JWT"}')
    body = _b64url(json.dumps(payload).encode("utf-8"))
    return f"{header}.{body}.unsigned"


def on_refresh(session_id: str, token: str) -> None:
    """Count the delivery for this process, and log it to the shared file if asked to."""
    pid = os.getpid()
    with _process_lock():
        _refreshes[(pid, session_id)] += 1
    path = os.environ.get(REFRESH_LOG_ENV)
    if path:
        line = f"{time.time():.6f} {pid} {session_id}\n".encode()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one small O_APPEND write: lines never interleave
        finally:
            os.close(fd)


def on_event(event: events.Event) -> None:
    """Count the scheduler's events by type, per process."""
    with _process_lock():
        _events[(os.getpid(), type(event).__name__)] += 1


_timers = os.environ.get(TIMERS_ENV, "thread")
if _timers not in ("thread", "heap"):
    raise RuntimeError(f"{TIMERS_ENV} must be 'thread' or 'heap', not {_timers!r}")

# Half-second follow-ups keep these tests short: under the library's 1 s floor,
# which this test app lowers (its tokens live a second; no server is hammered).
_scheduler.MIN_DELAY = 0.1

scheduler = Scheduler(
    mint_token,
    on_refresh,
    label="prefork",
    refresh_buffer=REFRESH_BUFFER,
    retry_delay=RETRY_DELAY,
    follow_up_interval=FOLLOW_UP_INTERVAL,
    on_event=on_event,
    timers="heap" if _timers == "heap" else "thread",
)
scheduler.schedule(MASTER_SESSION, mint_token(MASTER_TOKEN_LIFETIME))


def _note_at_fork() -> None:
    _at_fork_hook_ran_in.add(os.getpid())


# Registered after token_refresh's own hook, so this records whether the
# server's fork ran Python's at-fork hooks at all (os.fork() does; uWSGI's C
# fork() does not, unless --py-call-uwsgi-fork-hooks).
os.register_at_fork(after_in_child=_note_at_fork)


def worker_session_id() -> str:
    """This worker's own session."""
    return f"worker-{os.getpid()}"


def start_worker_session() -> None:
    """Schedule this process's own session, once per process (post-fork hook or first request)."""
    pid = os.getpid()
    with _process_lock():
        if pid in _worker_started_at:
            return
        _worker_started_at[pid] = time.time()
    scheduler.schedule(worker_session_id(), mint_token())


def _uwsgi_postfork() -> None:
    _uwsgi_postfork_ran_in.add(os.getpid())
    scheduler.after_fork()
    start_worker_session()


if os.environ.get(UWSGI_POSTFORK_ENV) == "1":
    try:
        # Importable only inside a uWSGI process (it imports the embedded uwsgi module).
        _uwsgidecorators = importlib.import_module("uwsgidecorators")
    except ImportError:
        pass
    else:
        _uwsgidecorators.postfork(_uwsgi_postfork)


app = Flask(__name__)


@app.before_request
def _ensure_worker_session() -> None:
    start_worker_session()


@app.get("/status")
def status() -> Response:
    """What this worker sees: its pid, its own session's refreshes, the scheduler's state.

    ``?hold=<seconds>`` (at most 2) keeps the worker busy that long first, so
    that a request sent alongside this one is accepted by another worker.
    """
    hold = min(max(request.args.get("hold", 0.0, type=float), 0.0), 2.0)
    time.sleep(hold)
    pid = os.getpid()
    session_id = worker_session_id()
    with _process_lock():
        by_session = {s: n for (p, s), n in _refreshes.items() if p == pid}
        event_counts = {e: n for (p, e), n in _events.items() if p == pid}
        started_at = _worker_started_at.get(pid)
    return jsonify(
        pid=pid,
        imported_in_pid=IMPORTED_IN_PID,
        timers=_timers,
        session=session_id,
        session_started_at=started_at,
        refreshes=by_session.get(session_id, 0),
        refreshes_by_session=by_session,
        sessions=sorted(scheduler.sessions()),
        stats=dataclasses.asdict(scheduler.stats()),
        events=event_counts,
        next_refresh_at=scheduler.next_refresh_at(session_id),
        at_fork_hook_ran=pid in _at_fork_hook_ran_in,
        uwsgi_postfork_ran=pid in _uwsgi_postfork_ran_in,
        threads=sorted(thread.name for thread in threading.enumerate()),
    )
