"""A Flask app whose worker processes each keep a service token fresh, and use it.

The app calls an upstream API with a short-lived service token (an OAuth2
client-credentials token, say). A :class:`~token_refresh.Scheduler` refreshes
it five minutes before it expires, on a background thread, so no request ever
waits for the token server. :class:`~token_refresh.http.RequestsAuth` puts it
on every call, and when the API refuses it (revoked before its expiry), asks
``ServiceToken.reject()`` for a new one and sends the call once more.

The upstream API is ``app.config["UPSTREAM"]`` (from ``TOKEN_REFRESH_EXAMPLE_UPSTREAM``);
unset, the app calls its own ``/api/whoami``, which stands in for one and
accepts the tokens the stand-in ``AuthServer`` issued and has not revoked.

Run it under gunicorn with the settings beside it (``gunicorn.conf.py``)::

    gunicorn -c docs/examples/gunicorn.conf.py

or under uWSGI::

    uwsgi --http 127.0.0.1:8000 --master --processes 2 --enable-threads \\
          --chdir docs/examples --module flask_app:app

Both import this module once, in the master, and fork the workers from it.
The scheduler is created here, at import, which starts no thread. Each worker
then fetches a token of its own and schedules its refresh: gunicorn's
``post_fork`` hook and uWSGI's ``@postfork`` do that as soon as the worker
starts; without them, the first request does. A token the master scheduled
before forking would stay the master's: a scheduler starts empty in a child.

``TOKEN_REFRESH_EXAMPLE_FAST=1`` makes the tokens live seconds, not an hour.
"""

from __future__ import annotations

import base64
import importlib
import itertools
import json
import os
import threading
import time
from collections.abc import Callable

import requests
from flask import Flask, Response, jsonify, request

from token_refresh import Scheduler, decode_jwt_payload
from token_refresh.http import RequestsAuth
from token_refresh.testing import ManualClock

FAST = os.environ.get("TOKEN_REFRESH_EXAMPLE_FAST") == "1"
#: Seconds each service token lives, and how long before expiry it is refreshed.
TOKEN_LIFETIME, REFRESH_BUFFER = (3.0, 1.0) if FAST else (3600.0, 300.0)
#: The scheduler's name for this process's service token (one per process).
SESSION = "service"


class AuthServer:
    """Stands in for the token endpoint: issues numbered, unsigned JWTs."""

    def __init__(self, now: Callable[[], float] = time.time) -> None:
        self._now = now
        self._serials = itertools.count(1)
        self.revoked: set[int] = set()  # serials refused before their exp

    def issue_token(self) -> str:
        payload = {
            "sub": "my-service",
            "n": next(self._serials),
            "exp": self._now() + TOKEN_LIFETIME,
        }
        body = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")
        return f"e30.{body}.unsigned"

    def check(self, token: str) -> int | None:
        """What the upstream API does: the token's serial if it is valid, else None."""
        payload = decode_jwt_payload(token)
        if not isinstance(payload, dict) or payload["n"] in self.revoked:
            return None
        return int(payload["n"]) if payload["exp"] > self._now() else None


class ServiceToken:
    """This process's service token, which its scheduler keeps fresh."""

    def __init__(self, auth: AuthServer, *, clock: ManualClock | None = None) -> None:
        self._auth = self.auth_server = auth
        self._token: str | None = None
        self._started_in: int | None = None  # the pid that fetched the current token
        self._lock = threading.Lock()
        self._now = time.time if clock is None else clock.time
        self.scheduler = Scheduler(
            auth.issue_token,  # get_access_token: called on a scheduler thread
            self._store,  # on_refresh
            label="web",
            refresh_buffer=REFRESH_BUFFER,
            clock=clock,
        )

    def start(self) -> None:
        """Fetch this process's first token and schedule its refresh; once per process."""
        with self._lock:
            if self._started_in == os.getpid():
                return
            self._started_in = os.getpid()
            self._token = token = self._auth.issue_token()
        self.scheduler.schedule(SESSION, token)

    def get(self) -> str:
        """The current token, for a request handler (fetching the first one if need be)."""
        self.start()
        with self._lock:
            assert self._token is not None
            return self._token

    __call__ = get  # a token source for RequestsAuth

    def reject(self, token: str) -> None:
        """The API refused ``token``: if it is still this process's, fetch its replacement now."""
        with self._lock:
            if token != self._token:
                return  # another thread replaced it already
            self._token = new = self._auth.issue_token()
        self.scheduler.schedule(SESSION, new)

    def next_refresh_in(self) -> float | None:
        due = self.scheduler.next_refresh_at(SESSION)
        return None if due is None else round(due - self._now(), 3)

    def _store(self, session_id: str, token: str) -> None:
        with self._lock:
            self._token = token
        # Refresh again before *this* token expires, rather than after the fixed
        # 30-minute follow-up: schedule() from on_refresh replaces the follow-up.
        self.scheduler.schedule(session_id, token)


def create_app(service_token: ServiceToken) -> Flask:
    """The Flask app; tests pass a ServiceToken whose scheduler runs on a ManualClock."""
    app = Flask(__name__)
    app.config["UPSTREAM"] = os.environ.get("TOKEN_REFRESH_EXAMPLE_UPSTREAM")
    upstream = requests.Session()  # made before the fork, it holds no connection yet
    upstream.auth = RequestsAuth(service_token)

    @app.get("/")
    def index() -> Response:
        base = app.config["UPSTREAM"] or request.host_url.rstrip("/")
        answer = upstream.get(f"{base}/api/whoami", timeout=10)
        answer.raise_for_status()
        return jsonify(
            pid=os.getpid(),
            token_number=answer.json()["token_number"],
            refused_first=len(answer.history),  # 1: a refused token was replaced once
        )

    @app.get("/api/whoami")
    def whoami() -> Response | tuple[str, int, dict[str, str]]:
        """Stands in for the upstream API: it checks the bearer token, as a real one would."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        serial = service_token.auth_server.check(token) if scheme == "Bearer" else None
        if serial is None:
            return "refused", 401, {"WWW-Authenticate": 'Bearer error="invalid_token"'}
        return jsonify(token_number=serial)

    @app.get("/healthz")
    def healthz() -> Response:
        stats = service_token.scheduler.stats()
        return jsonify(
            pid=os.getpid(),
            sessions=sorted(service_token.scheduler.sessions()),
            next_refresh_in=service_token.next_refresh_in(),
            refreshes=stats.refreshes,
            failures=stats.failures,
        )

    return app


service_token = ServiceToken(AuthServer())
app = create_app(service_token)

# uWSGI runs no Python at-fork hook by default, but has its own. The module
# uwsgidecorators can only be imported inside a uWSGI process.
try:
    uwsgidecorators = importlib.import_module("uwsgidecorators")
except ImportError:
    pass
else:
    uwsgidecorators.postfork(service_token.start)
