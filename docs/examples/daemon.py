"""A daemon that keeps many sessions' tokens fresh, and stops cleanly on SIGTERM.

    python docs/examples/daemon.py                # until SIGTERM or Ctrl-C
    python docs/examples/daemon.py --run-for 60   # or for a minute

It stands for a bridge that holds one connection per session (a WebSocket, a
child process) and must hand each a new token before the old one expires. The
main thread sets things up, then only waits: refreshes happen on the
scheduler's threads. On SIGTERM or SIGINT it closes the scheduler, waiting a
bounded time for a refresh already running, and exits 0 if nothing was left.

``TOKEN_REFRESH_EXAMPLE_FAST=1`` makes tokens live seconds, not an hour, so you
can watch the refreshes.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import logging
import math
import os
import queue
import signal
import sys
import threading
import time

from token_refresh import Scheduler, decode_jwt_payload

FAST = os.environ.get("TOKEN_REFRESH_EXAMPLE_FAST") == "1"
# Seconds. Without FAST: hour-long tokens and the library's defaults.
TOKEN_LIFETIME = 3.0 if FAST else 3600.0
REFRESH_BUFFER = 1.0 if FAST else 300.0
FOLLOW_UP_INTERVAL = 2.0 if FAST else 1800.0
RETRY_DELAY = 1.0 if FAST else 60.0
HEALTH_EVERY = 1.0 if FAST else 600.0  # how often to log the scheduler's stats
SHUTDOWN_TIMEOUT = 10.0  # how long close() may wait for a refresh already running

log = logging.getLogger("bridge")


class AuthServer:
    """Stands in for the token endpoint (a network call): issues numbered, unsigned JWTs."""

    def __init__(self) -> None:
        self._serials = itertools.count(1)

    def issue_token(self) -> str:
        payload = {"n": next(self._serials), "exp": time.time() + TOKEN_LIFETIME}
        body = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")
        return f"e30.{body}.unsigned"


class Connection:
    """Stands in for what uses a session's token: a WebSocket, a child process's stdin."""

    def __init__(self, token: str) -> None:
        self.token = token

    def send_token(self, token: str) -> None:
        self.token = token


class Bridge:
    """One connection per session, each kept supplied with a fresh token."""

    def __init__(self, auth: AuthServer) -> None:
        self._auth = auth
        self._connections: dict[str, Connection] = {}
        self._lock = threading.Lock()  # on_refresh runs on the scheduler's threads
        self.scheduler = Scheduler(
            auth.issue_token,
            self._on_refresh,
            label="bridge",
            refresh_buffer=REFRESH_BUFFER,
            follow_up_interval=FOLLOW_UP_INTERVAL,
            retry_delay=RETRY_DELAY,
        )

    def open(self, session_id: str) -> None:
        token = self._auth.issue_token()
        with self._lock:
            self._connections[session_id] = Connection(token)
        self.scheduler.schedule(session_id, token)

    def close_session(self, session_id: str) -> None:
        self.scheduler.cancel(session_id)  # frees the session's state in the scheduler
        with self._lock:
            self._connections.pop(session_id, None)

    def _on_refresh(self, session_id: str, token: str) -> None:
        with self._lock:
            connection = self._connections.get(session_id)
        if connection is None:
            return
        connection.send_token(token)
        payload = decode_jwt_payload(token)
        number = payload.get("n") if isinstance(payload, dict) else "?"
        log.info("session %s: token #%s delivered", session_id, number)


def wait_for_stop(signals: queue.SimpleQueue[int], run_for: float | None, bridge: Bridge) -> str:
    """Log the scheduler's stats now and then until a signal comes or ``run_for`` passes.

    Returns why the daemon stops.
    """
    deadline = math.inf if run_for is None else time.monotonic() + run_for
    while (left := deadline - time.monotonic()) > 0:
        try:
            return signal.Signals(signals.get(timeout=min(left, HEALTH_EVERY))).name
        except queue.Empty:
            log.info("health: %s", bridge.scheduler.stats())
    return f"ran for {run_for:g}s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=3, help="how many sessions (3)")
    parser.add_argument(
        "--run-for", type=float, metavar="SECONDS", help="stop after this long, as on SIGTERM"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(name)s %(message)s"
    )

    # A signal handler runs on the main thread, between two steps of whatever that
    # thread was doing: if that was a call into the scheduler, close() would wait
    # for a lock the interrupted call holds. So the handler only passes the signal
    # on, through a SimpleQueue (whose put() is safe there), and the main thread
    # shuts down outside it.
    signals: queue.SimpleQueue[int] = queue.SimpleQueue()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: signals.put(signum))

    bridge = Bridge(AuthServer())
    for number in range(1, args.sessions + 1):
        bridge.open(f"s{number}")
    log.info("running with %d sessions; stop with SIGTERM or Ctrl-C", args.sessions)

    reason = wait_for_stop(signals, args.run_for, bridge)
    log.info("stopping: %s", reason)
    if bridge.scheduler.close(timeout=SHUTDOWN_TIMEOUT):
        log.info("stopped cleanly")
        return 0
    log.error("a refresh was still running after %gs; exiting all the same", SHUTDOWN_TIMEOUT)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
