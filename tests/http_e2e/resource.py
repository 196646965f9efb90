"""A resource server for tests/test_http_e2e.py: checks bearer tokens, echoes the body's SHA-256.

It accepts a JWT from the issuer in ``RESOURCE_ISSUER`` that has not
expired and was issued at or after the cutoff. ``POST /admin/refuse`` refuses
every token issued before now: the cutoff becomes the next whole second (a
JWT's ``iat`` counts seconds) and the call answers once that second has come,
so that every token issued afterwards is accepted. It reads no signature: the
tokens come from the test's own token server over loopback.

Every attempt on ``/data`` is appended to ``RESOURCE_STATE/attempts.log`` as
``<status> <token fingerprint> <body length> <body sha256>``, from every worker.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from pathlib import Path

from flask import Flask, Response, jsonify, request

from token_refresh import decode_jwt_payload

STATE = Path(os.environ["RESOURCE_STATE"])
ISSUER = os.environ["RESOURCE_ISSUER"]
CUTOFF = STATE / "cutoff"

app = Flask(__name__)


def fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def _cutoff() -> float:
    try:
        return float(CUTOFF.read_text(encoding="ascii"))
    except FileNotFoundError:
        return 0.0


def _accepts(authorization: str) -> bool:
    scheme, _, token = authorization.partition(" ")
    payload = decode_jwt_payload(token) if scheme == "Bearer" else None
    if not isinstance(payload, dict) or payload.get("iss") != ISSUER:
        return False
    return bool(payload.get("exp", 0) > time.time() and payload.get("iat", 0) >= _cutoff())


def _log(line: str) -> None:
    fd = os.open(STATE / "attempts.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{line}\n".encode())  # one small O_APPEND write: lines never interleave
    finally:
        os.close(fd)


@app.post("/admin/refuse")
def refuse() -> Response:
    cutoff = math.floor(time.time()) + 1
    temporary = STATE / f"cutoff.{os.getpid()}"
    temporary.write_text(str(cutoff), encoding="ascii")
    os.replace(temporary, CUTOFF)
    while time.time() < cutoff:
        time.sleep(0.01)
    return jsonify(cutoff=cutoff)


@app.route("/data", methods=["GET", "POST"])
def data() -> Response:
    body = request.get_data()
    digest = hashlib.sha256(body).hexdigest()
    authorization = request.headers.get("Authorization", "")
    status = 200 if _accepts(authorization) else 401
    _log(f"{status} {fingerprint(authorization)} {len(body)} {digest}")
    if status == 401:
        return Response("refused", 401, {"WWW-Authenticate": 'Bearer error="invalid_token"'})
    return jsonify(sha256=digest, length=len(body))
