"""Concurrent 401 recovery: token_refresh.http beside google-auth and Authlib.

A token server and a resource server (standard library, on 127.0.0.1) run in
this process. Each client first makes one call, so that it holds a token;
then the resource server refuses every token issued so far (revoked an hour
before its expiry), and THREADS threads send one POST each, all at once,
through one client. Per round and client, it counts:

- token requests the recovery made (one is what is needed),
- calls that failed (anything but a 200 in the end),
- bytes re-sent (what retries carried; a whole body each is right),

and, for one POST with a 3,000-byte generator body, what the retry carried
and what the caller was told. The contenders are google-auth's
``AuthorizedSession`` and Authlib's ``OAuth2Session`` when they are installed
(the ``bench`` extra); a missing one is reported, not measured::

    python benchmarks/http401.py            # 32 threads, 5 rounds
    python benchmarks/http401.py --smoke    # 8 threads, 1 round: a few seconds

token_refresh's source is a ``SharedToken``; before ``SharedToken.reject``
exists (issue 18), a stand-in source with the same ``reject`` rule is used,
and the output says so.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import itertools
import json
import os
import statistics
import threading
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import requests

from token_refresh.http import HttpxAuth, RequestsAuth
from token_refresh.shared import Grant, SharedToken

BODY_SIZE = 3000
CALL_ID = "X-Bench-Call"


@dataclass
class World:
    """The two servers' state: tokens issued, tokens refused, what each call brought."""

    serials: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    issued: int = 0
    refused_up_to: int = 0  # tokens with a serial up to this one are refused
    #: Holds each call's first refusal until every call's first attempt has come, so that
    #: all of them carry the refused token, as THREADS requests in flight together do.
    gate: threading.Barrier | None = None
    received: dict[str, list[int]] = field(default_factory=dict)  # call id -> bytes per attempt
    lock: threading.Lock = field(default_factory=threading.Lock)

    def issue(self) -> str:
        with self.lock:
            self.issued = next(self.serials)
            return f"tok-{self.issued}"

    def accepts(self, authorization: str) -> bool:
        serial = authorization.removeprefix("Bearer tok-")
        return serial.isdigit() and int(serial) > self.refused_up_to

    def refuse_all(self) -> None:
        with self.lock:
            self.refused_up_to = self.issued


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0], 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        self.rfile.readline()
        return b"".join(chunks)

    def _answer(self, status: int, body: bytes, **headers: str) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        world: World = self.server.world
        body = self._body()
        if self.path == "/token":
            grant = {"access_token": world.issue(), "token_type": "Bearer", "expires_in": 3600}
            self._answer(200, json.dumps(grant).encode(), Content_Type="application/json")
            return
        with world.lock:
            world.received.setdefault(self.headers.get(CALL_ID, ""), []).append(len(body))
            first = len(world.received[self.headers.get(CALL_ID, "")]) == 1
        if world.accepts(self.headers.get("Authorization", "")):
            self._answer(200, hashlib.sha256(body).hexdigest().encode())
            return
        if first and world.gate is not None:
            with contextlib.suppress(threading.BrokenBarrierError):
                world.gate.wait(timeout=5)
        self._answer(401, b"refused", WWW_Authenticate='Bearer error="invalid_token"')


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256


def fetch_token(url: str) -> str:
    data = b"grant_type=client_credentials&client_id=bench"
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=10) as answer:
        token: str = json.loads(answer.read())["access_token"]
        return token


class StandIn:
    """What SharedToken.reject will do, in one process: a rejected token is fetched once anew."""

    def __init__(self, fetch: Callable[[], str]) -> None:
        self._fetch = fetch
        self._current: str | None = None
        self._lock = threading.Lock()

    def __call__(self) -> str:
        with self._lock:
            if self._current is None:
                self._current = self._fetch()
            return self._current

    def reject(self, token: str) -> None:
        with self._lock:
            if token == self._current:
                self._current = None


def token_refresh_source(token_url: str) -> Callable[[], str | None]:
    if hasattr(SharedToken, "reject"):
        expiring = lambda: Grant(fetch_token(token_url), expires_at=time_now() + 3600)  # noqa: E731
        return SharedToken(expiring)
    return StandIn(lambda: fetch_token(token_url))


def time_now() -> float:
    return datetime.datetime.now(datetime.UTC).timestamp()


Send = Callable[[Any, str], int]  # (body, call id) -> final status


def tr_requests(base: str) -> Send:
    session = requests.Session()
    session.auth = RequestsAuth(token_refresh_source(f"{base}/token"))
    return lambda body, call: (
        session.post(f"{base}/data", data=body, headers={CALL_ID: call}, timeout=30).status_code
    )


def tr_httpx(base: str) -> Send:
    client = httpx.Client(auth=HttpxAuth(token_refresh_source(f"{base}/token")), timeout=30)
    return lambda body, call: (
        client.post(f"{base}/data", content=body, headers={CALL_ID: call}).status_code
    )


def google_auth(base: str) -> Send:
    from google.auth import credentials
    from google.auth.transport.requests import AuthorizedSession

    class ClientCredentials(credentials.Credentials):
        def refresh(self, request: Any) -> None:
            self.token = fetch_token(f"{base}/token")
            naive_utc = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
            self.expiry = naive_utc + datetime.timedelta(hours=1)

    untyped = ClientCredentials()  # type: ignore[no-untyped-call]
    session = AuthorizedSession(untyped)  # type: ignore[no-untyped-call]
    return lambda body, call: int(
        session.post(f"{base}/data", data=body, headers={CALL_ID: call}, timeout=30).status_code
    )


def authlib(base: str) -> Send:
    os.environ.setdefault("AUTHLIB_INSECURE_TRANSPORT", "1")  # plain http on loopback
    from authlib.integrations.requests_client import (  # type: ignore[import-untyped]
        OAuth2Session,
    )

    session = OAuth2Session(
        "bench", "secret", token_endpoint=f"{base}/token", grant_type="client_credentials"
    )
    session.fetch_token()
    return lambda body, call: int(
        session.post(f"{base}/data", data=body, headers={CALL_ID: call}, timeout=30).status_code
    )


CONTENDERS: dict[str, Callable[[str], Send]] = {
    "token_refresh + requests": tr_requests,
    "token_refresh + httpx": tr_httpx,
    "google-auth AuthorizedSession": google_auth,
    "Authlib OAuth2Session": authlib,
}


@dataclass
class Round:
    token_requests: int
    failed: int
    resent: int
    generator_retry_bytes: int | None  # None: no retry was sent
    generator_status: int


def one_round(make: Callable[[str], Send], threads: int) -> Round:
    world = World()
    server = Server(("127.0.0.1", 0), Handler)
    server.world = world  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        send = make(f"http://127.0.0.1:{server.server_address[1]}")
        assert send(b"warm-up", "warm-up") == 200
        world.refuse_all()
        world.gate = threading.Barrier(threads)
        before = world.issued
        bodies = [os.urandom(BODY_SIZE) for _ in range(threads)]
        with ThreadPoolExecutor(threads) as pool:
            statuses = list(pool.map(send, bodies, [f"call-{n}" for n in range(threads)]))
        token_requests = world.issued - before
        resent = sum(sum(world.received[f"call-{n}"][1:]) for n in range(threads))
        world.refuse_all()
        world.gate = None

        def generator() -> Iterator[bytes]:
            yield b"g" * BODY_SIZE

        generator_status = send(generator(), "generator")
        attempts = world.received["generator"]
    finally:
        server.shutdown()
        server.server_close()
    return Round(
        token_requests,
        sum(status != 200 for status in statuses),
        resent,
        attempts[1] if len(attempts) > 1 else None,
        generator_status,
    )


def available(name: str) -> str | None:
    module = {"google-auth": "google.auth", "Authlib": "authlib"}.get(name.split()[0])
    if module is None:
        return None
    try:
        __import__(module)
    except ImportError:
        return 'not installed (pip install ".[bench]")'
    return None


def report(name: str, rounds: list[Round], threads: int) -> str:
    def median(values: list[int]) -> str:
        return f"{statistics.median(values):g}"

    last = rounds[-1]
    if last.generator_retry_bytes is None:
        generator = f"not resent, caller got {last.generator_status}"
    else:
        lost = last.generator_status == 200 and last.generator_retry_bytes < BODY_SIZE
        generator = (
            f"retry sent {last.generator_retry_bytes} of {BODY_SIZE} bytes, caller got "
            f"{last.generator_status}{' (data lost, silently)' if lost else ''}"
        )
    return (
        f"| {name} | {median([r.token_requests for r in rounds])} "
        f"| {median([r.failed for r in rounds])} of {threads} "
        f"| {median([r.resent for r in rounds])} | {generator} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--smoke", action="store_true", help="8 threads, one round")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    threads = args.threads or (8 if args.smoke else 32)
    runs = 1 if args.smoke else 5
    source = "SharedToken" if hasattr(SharedToken, "reject") else "a stand-in with reject"
    print(f"{threads} threads, {runs} round(s), {BODY_SIZE}-byte bodies; token_refresh: {source}")
    print("| client | token requests | calls failed | bytes re-sent | generator body |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, make in CONTENDERS.items():
        missing = available(name)
        if missing is not None:
            print(f"| {name} | {missing} | | | |")
            continue
        rounds = [one_round(make, threads) for _ in range(runs)]
        print(report(name, rounds, threads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
