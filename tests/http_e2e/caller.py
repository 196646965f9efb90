"""A service that calls the resource server, as users run one: Flask under gunicorn.

One SharedToken with a FileStore in ``CALLER_STATE`` serves every worker and
thread; its fetch is a client_credentials request to ``CALLER_TOKEN_URL`` and
appends a line to ``CALLER_STATE/grants.log``, so the test counts token
requests across processes. ``POST /call/<client>`` sends the resource server a
64 KiB body with ``requests`` or ``httpx`` and reports what came back;
``POST /generator/<client>`` does the same with a generator body.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import requests
from flask import Flask, Response, jsonify

from token_refresh.http import HttpxAuth, RequestsAuth
from token_refresh.oauth import ClientCredentials
from token_refresh.shared import FileStore, SharedToken

STATE = Path(os.environ["CALLER_STATE"])
TOKEN_URL = os.environ["CALLER_TOKEN_URL"]
RESOURCE = os.environ["CALLER_RESOURCE"]
BODY_SIZE = 64 * 1024


def fetch() -> str:
    fd = os.open(STATE / "grants.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)
    return ClientCredentials(TOKEN_URL, "e2e", timeout=5)().access_token


token = SharedToken(fetch, FileStore(STATE / "tokens"), key="resource")
_local = threading.local()
app = Flask(__name__)


def _post(client: str, body: Any) -> tuple[int, list[int], dict[str, Any] | None]:
    if client == "requests":
        if not hasattr(_local, "session"):
            _local.session = requests.Session()
            _local.session.auth = RequestsAuth(token)
        answer = _local.session.post(f"{RESOURCE}/data", data=body, timeout=30)
        history = [r.status_code for r in answer.history]
        return answer.status_code, history, answer.json() if answer.ok else None
    with httpx.Client(auth=HttpxAuth(token), timeout=30) as session:
        reply = session.post(f"{RESOURCE}/data", content=body)
        history = [r.status_code for r in reply.history]
        return reply.status_code, history, reply.json() if reply.is_success else None


@app.post("/call/<client>")
def call(client: str) -> Response:
    body = os.urandom(BODY_SIZE)
    status, history, echoed = _post(client, body)
    return jsonify(
        pid=os.getpid(),
        status=status,
        history=history,
        sent=hashlib.sha256(body).hexdigest(),
        echoed=None if echoed is None else echoed["sha256"],
    )


@app.post("/generator/<client>")
def generator(client: str) -> Response:
    def chunks() -> Iterator[bytes]:
        yield b"x" * 3000

    status, history, _ = _post(client, chunks())
    return jsonify(status=status, history=history)
