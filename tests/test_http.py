"""token_refresh.http: RequestsAuth and HttpxAuth against a real HTTP server on 127.0.0.1.

The server (standard library, one thread per connection) checks the bearer
token of each request against the tokens it accepts, answers 401 with the
challenge a test sets, and records every attempt: the Authorization header it
carried and the body it brought, whole.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import importlib.util
import io
import os
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import token_refresh.http
from token_refresh.http import HttpxAuth, NoToken, RequestsAuth, refused_token

from conftest import ReraisingThread

try:
    import httpx
    import requests
except ImportError as missing:  # pragma: no cover - the test extra installs both
    if os.environ.get("CI") == "true":
        raise
    pytest.skip(f'{missing.name} is not installed: pip install ".[test]"', allow_module_level=True)

BODY = bytes(range(256)) * 64  # 16 KiB, every byte value


@dataclass
class Attempt:
    authorization: str | None
    path: str
    body: bytes


@dataclass
class ResourceServer:
    """What the handler answers, and what it saw."""

    accepted: set[str] = field(default_factory=set)
    challenge: list[str] = field(default_factory=list)  # WWW-Authenticate values on a 401
    status: int = 401  # what a refused token gets
    set_cookie: str | None = None  # a Set-Cookie the 401 carries
    attempts: list[Attempt] = field(default_factory=list)
    cookies: list[str | None] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0
    redirect_to: str = ""  # where /elsewhere redirects (307, body kept)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the test reads the attempts, not a log."""

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _answer(self, status: int, body: bytes, headers: dict[str, list[str]]) -> None:
        self.send_response(status)
        for name, values in headers.items():
            for value in values:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _serve(self) -> None:
        state: ResourceServer = self.server.state
        authorization = self.headers.get("Authorization")
        body = self._body()
        with state.lock:
            state.attempts.append(Attempt(authorization, self.path, body))
            state.cookies.append(self.headers.get("Cookie"))
        if self.path == "/elsewhere":
            self._answer(307, b"", {"Location": [state.redirect_to]})
        elif authorization in {f"Bearer {token}" for token in state.accepted}:
            self._answer(200, hashlib.sha256(body).hexdigest().encode(), {})
        else:
            headers = {"WWW-Authenticate": state.challenge}
            if state.set_cookie:
                headers["Set-Cookie"] = [state.set_cookie]
            self._answer(state.status, b"refused", headers)

    do_GET = do_POST = do_PUT = _serve


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # 32 clients connect at once in TestConcurrency


def _start(state: ResourceServer) -> Callable[[], None]:
    httpd = Server(("127.0.0.1", 0), Handler)
    httpd.state = state  # type: ignore[attr-defined]
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, name="resource-server", daemon=True)
    thread.start()

    def stop() -> None:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)

    return stop


@pytest.fixture
def server() -> Iterator[ResourceServer]:
    state = ResourceServer()
    stop = _start(state)
    try:
        yield state
    finally:
        stop()


class Source:
    """A token source like SharedToken: reject(token) replaces the current token, if it is it."""

    def __init__(self, prefix: str = "tok") -> None:
        self.prefix = prefix
        self.serial = 1
        self.calls = 0
        self.rejected: list[str] = []
        self.lock = threading.Lock()

    def __call__(self) -> str:
        with self.lock:
            self.calls += 1
            return f"{self.prefix}{self.serial}"

    def reject(self, token: str) -> None:
        with self.lock:
            self.rejected.append(token)
            if token == f"{self.prefix}{self.serial}":
                self.serial += 1


class Plain:
    """A plain ``() -> str`` with no reject: hands out the tokens given, then repeats the last."""

    def __init__(self, *tokens: str | None) -> None:
        self.tokens = list(tokens)
        self.calls = 0

    def __call__(self) -> str | None:
        self.calls += 1
        return self.tokens[min(self.calls, len(self.tokens)) - 1]


@dataclass
class Reply:
    status: int
    body: bytes
    history: list[int]


def send_requests(auth: Any, url: str, body: Any = BODY, **options: Any) -> Reply:
    options.pop("follow_redirects", None)  # requests follows redirects by default
    with requests.Session() as session:
        session.auth = auth
        response = session.post(url, data=body, timeout=10, **options)
        return Reply(
            response.status_code, response.content, [r.status_code for r in response.history]
        )


def send_httpx(auth: Any, url: str, body: Any = BODY, **options: Any) -> Reply:
    with httpx.Client(auth=auth, timeout=10, **options) as client:
        response = client.post(url, content=body)
        return Reply(
            response.status_code, response.content, [r.status_code for r in response.history]
        )


CLIENTS = {"requests": (RequestsAuth, send_requests), "httpx": (HttpxAuth, send_httpx)}


@pytest.fixture(params=sorted(CLIENTS))
def client(request: pytest.FixtureRequest) -> tuple[Any, Callable[..., Reply]]:
    return CLIENTS[request.param]


def sha(body: bytes) -> bytes:
    return hashlib.sha256(body).hexdigest().encode()


class TestRefusedToken:
    @pytest.mark.parametrize(
        "challenges",
        [
            [],
            [""],
            ["Bearer"],
            ['Bearer realm="api"'],
            ['Bearer realm="a, b", error="invalid_token", error_description="expired"'],
            ["Bearer error=invalid_token"],
            ['Basic realm="x", Bearer realm="api"'],
            ['Basic realm="x"', 'bearer error="invalid_token"'],
            ['Newauth abc==, Bearer realm="api", scope="a"'],
            ['Bearer realm="x\\"y", error="invalid_token"'],
        ],
    )
    def test_a_refused_token(self, challenges: list[str]) -> None:
        """No challenge, or a Bearer one with no error or invalid_token: the token was refused."""
        assert refused_token(401, challenges)

    @pytest.mark.parametrize(
        "challenges",
        [
            ['Bearer error="insufficient_scope", scope="admin"'],
            ['Bearer realm="api", error="invalid_request"'],
            ['Basic realm="x"'],
            ["Negotiate"],
            ['Basic realm="x", Digest realm="y", nonce="z"'],
            ["==="],
            ['Bearer error="insufficient_scope", Basic realm="x"'],
        ],
    )
    def test_not_a_refused_token(self, challenges: list[str]) -> None:
        """insufficient_scope, another error, or another scheme only: not a refused token."""
        assert not refused_token(401, challenges)

    @pytest.mark.parametrize("status", [200, 400, 403, 404, 500])
    def test_only_a_401(self, status: int) -> None:
        """A 403 (or anything but 401) is never a refused token, whatever its challenge."""
        assert not refused_token(status, [])
        assert not refused_token(status, ['Bearer error="invalid_token"'])


class TestEveryRequest:
    def test_carries_the_sources_token(
        self, server: ResourceServer, client: tuple[Any, Callable[..., Reply]]
    ) -> None:
        """A request carries Authorization: Bearer with the source's token; a 200 is left alone."""
        make, send = client
        source = Source()
        server.accepted = {"tok1"}

        reply = send(make(source), server.url)

        assert (reply.status, reply.body, reply.history) == (200, sha(BODY), [])
        assert [a.authorization for a in server.attempts] == ["Bearer tok1"]
        assert (source.calls, source.rejected) == (1, [])

    @pytest.mark.parametrize("token", [None, ""])
    def test_no_token_raises_before_sending(
        self, server: ResourceServer, client: tuple[Any, Callable[..., Reply]], token: str | None
    ) -> None:
        """A source that gives None or "" makes the call raise NoToken; nothing is sent."""
        make, send = client
        with pytest.raises(NoToken, match="the request was not sent"):
            send(make(Plain(token)), server.url)
        assert server.attempts == []

    def test_a_failing_source_raises_its_own_error(
        self, server: ResourceServer, client: tuple[Any, Callable[..., Reply]]
    ) -> None:
        """A source that raises makes the call raise that error; nothing is sent."""
        make, send = client

        def broken() -> str:
            raise TimeoutError("token server down")

        with pytest.raises(TimeoutError, match="token server down"):
            send(make(broken), server.url)
        assert server.attempts == []

    @pytest.mark.parametrize(
        ("token", "error"),
        [(b"bytes", TypeError), ("two words", ValueError), ("line\r\nX-Evil: 1", ValueError)],
    )
    def test_a_token_a_header_cannot_carry_is_refused(
        self,
        server: ResourceServer,
        client: tuple[Any, Callable[..., Reply]],
        token: Any,
        error: type[Exception],
    ) -> None:
        """A non-str token, or one that would split the header, raises without showing it."""
        make, send = client
        with pytest.raises(error) as raised:
            send(make(lambda: token), server.url)
        assert "X-Evil" not in str(raised.value)
        assert "words" not in str(raised.value)
        assert server.attempts == []

    def test_source_must_be_callable(self, client: tuple[Any, Callable[..., Reply]]) -> None:
        """Building an adapter on something that cannot be called is a TypeError at once."""
        make, _ = client
        with pytest.raises(TypeError, match="source must be callable"):
            make("tok1")

    def test_repr_and_errors_name_the_source_never_its_secrets(
        self, server: ResourceServer, client: tuple[Any, Callable[..., Reply]]
    ) -> None:
        """The repr and NoToken name the source's type or function, not a token or its args."""
        make, send = client
        source = Source(prefix="secret-")
        server.accepted = {"secret-1"}
        auth = make(source)
        send(auth, server.url)
        assert repr(auth) == f"{type(auth).__name__}(Source)"

        def no_token(client_secret: str) -> None:
            return None

        with pytest.raises(NoToken) as raised:
            send(make(functools.partial(no_token, client_secret="s3cr3t")), server.url)
        assert str(raised.value) == "partial gave no token: the request was not sent"
        assert "s3cr3t" not in repr(make(functools.partial(no_token, client_secret="s3cr3t")))


class TestRefusal:
    @pytest.mark.parametrize(
        "challenge", [[], ['Bearer realm="api"'], ['Bearer error="invalid_token"']]
    )
    def test_rejects_and_resends_once_with_the_new_token(
        self,
        server: ResourceServer,
        client: tuple[Any, Callable[..., Reply]],
        challenge: list[str],
    ) -> None:
        """A refused token is rejected, and the request sent again, whole, with the new token."""
        make, send = client
        source = Source()
        server.accepted, server.challenge = {"tok2"}, challenge

        reply = send(make(source), server.url)

        assert (reply.status, reply.body, reply.history) == (200, sha(BODY), [401])
        assert [a.authorization for a in server.attempts] == ["Bearer tok1", "Bearer tok2"]
        assert [a.body for a in server.attempts] == [BODY, BODY]
        assert source.rejected == ["tok1"]

    @pytest.mark.parametrize(
        ("status", "challenge"),
        [
            (401, ['Bearer error="insufficient_scope"']),
            (401, ['Basic realm="api"']),
            (403, []),
            (403, ['Bearer error="invalid_token"']),
        ],
    )
    def test_other_refusals_are_returned_as_they_are(
        self,
        server: ResourceServer,
        client: tuple[Any, Callable[..., Reply]],
        status: int,
        challenge: list[str],
    ) -> None:
        """insufficient_scope, another scheme or a 403: no reject, no retry, the answer as is."""
        make, send = client
        source = Source()
        server.status, server.challenge = status, challenge

        reply = send(make(source), server.url)

        assert (reply.status, reply.body, reply.history) == (status, b"refused", [])
        assert len(server.attempts) == 1
        assert (source.calls, source.rejected) == (1, [])

    def test_at_most_one_retry(
        self, server: ResourceServer, client: tuple[Any, Callable[..., Reply]]
    ) -> None:
        """A server that refuses every token gets two attempts, and both tokens are rejected."""
        make, send = client
        source = Source()

        reply = send(make(source), server.url)

        assert (reply.status, reply.history) == (401, [401])
        assert [a.authorization for a in server.attempts] == ["Bearer tok1", "Bearer tok2"]
        assert source.rejected == ["tok1", "tok2"]

    def test_a_plain_callable_is_simply_called_again(
        self, server: ResourceServer, client: tuple[Any, Callable[..., Reply]]
    ) -> None:
        """A source with no reject is asked again; a different token is sent once more."""
        make, send = client
        source = Plain("old", "new")
        server.accepted = {"new"}

        reply = send(make(source), server.url)

        assert (reply.status, reply.history) == (200, [401])
        assert [a.authorization for a in server.attempts] == ["Bearer old", "Bearer new"]

    def test_the_same_token_again_is_not_resent(
        self, server: ResourceServer, client: tuple[Any, Callable[..., Reply]]
    ) -> None:
        """When the source gives back the token just refused, the 401 is the answer."""
        make, send = client
        source = Plain("same")

        reply = send(make(source), server.url)

        assert (reply.status, reply.history) == (401, [])
        assert len(server.attempts) == 1
        assert source.calls == 2

    def test_a_source_failing_on_the_retry_raises(
        self, server: ResourceServer, client: tuple[Any, Callable[..., Reply]]
    ) -> None:
        """No token for the retry: the call raises NoToken, and the retry is never sent."""
        make, send = client
        with pytest.raises(NoToken):
            send(make(Plain("old", None)), server.url)
        assert len(server.attempts) == 1

    def test_a_401_from_another_host_after_a_redirect_is_not_ours(
        self, server: ResourceServer, client: tuple[Any, Callable[..., Reply]]
    ) -> None:
        """A redirect to another host drops the token; that host's 401 rejects nothing."""
        make, send = client
        other = ResourceServer()
        stop = _start(other)
        try:
            server.accepted, server.redirect_to = {"tok1"}, f"{other.url}/data"
            source = Source()

            reply = send(make(source), f"{server.url}/elsewhere", follow_redirects=True)
        finally:
            stop()

        assert reply.status == 401
        assert [a.authorization for a in other.attempts] == [None]
        assert (source.calls, source.rejected) == (1, [])


def chunks() -> Iterator[bytes]:
    yield BODY[:1000]
    yield BODY[1000:]


class TestBodies:
    @pytest.mark.parametrize(
        ("body", "sent"),
        [(BODY, BODY), (BODY.decode("latin-1"), BODY.decode("latin-1").encode()), (b"", b"")],
        ids=["bytes", "str", "empty"],
    )
    def test_bytes_and_str_are_resent_whole(
        self,
        server: ResourceServer,
        client: tuple[Any, Callable[..., Reply]],
        body: bytes | str,
        sent: bytes,
    ) -> None:
        """Bytes and str bodies reach the server whole on both attempts."""
        make, send = client
        server.accepted = {"tok2"}
        reply = send(make(Source()), server.url, body)
        assert reply.status == 200
        assert [a.body for a in server.attempts] == [sent, sent]

    def test_a_generator_body_gets_its_401_unretried(
        self, server: ResourceServer, client: tuple[Any, Callable[..., Reply]]
    ) -> None:
        """A generator is never buffered for a retry: the token is rejected, the 401 returned."""
        make, send = client
        source = Source()
        server.accepted = {"tok2"}

        reply = send(make(source), server.url, chunks())

        assert (reply.status, reply.history) == (401, [])
        assert [a.body for a in server.attempts] == [BODY]
        assert source.rejected == ["tok1"]
        assert source() == "tok2"  # the next request carries the new token

    def test_requests_resends_a_file_from_where_it_began(self, server: ResourceServer) -> None:
        """A seekable file is rewound to its position when the request was made, not to 0."""
        server.accepted = {"tok2"}
        body = io.BytesIO(b"HEADER" + BODY)
        body.seek(6)

        reply = send_requests(RequestsAuth(Source()), server.url, body)

        assert (reply.status, reply.history) == (200, [401])
        assert [a.body for a in server.attempts] == [BODY, BODY]

    def test_requests_does_not_resend_a_pipe(self, server: ResourceServer) -> None:
        """A pipe cannot be read twice: its request gets the 401, and the token is rejected."""
        source = Source()
        server.accepted = {"tok2"}
        read_end, write_end = os.pipe()
        with open(write_end, "wb") as writer:
            writer.write(BODY[:4096])
        with open(read_end, "rb") as pipe:
            reply = send_requests(RequestsAuth(source), server.url, pipe)

        assert (reply.status, reply.history) == (401, [])
        assert [a.body for a in server.attempts] == [BODY[:4096]]
        assert source.rejected == ["tok1"]

    def test_requests_does_not_resend_a_file_that_cannot_tell(self, server: ResourceServer) -> None:
        """A file that says seekable but cannot tell its position gets its 401."""

        class NoTell(io.BytesIO):
            def tell(self) -> int:
                raise OSError("no position")

        server.accepted = {"tok2"}
        reply = send_requests(RequestsAuth(Source()), server.url, NoTell(BODY))
        assert (reply.status, reply.history) == (401, [])
        assert len(server.attempts) == 1

    def test_requests_does_not_resend_a_file_that_cannot_rewind(
        self, server: ResourceServer
    ) -> None:
        """A file whose seek fails once it was read gets its 401, never a partial resend."""

        class OneWay(io.BytesIO):
            read_from = False

            def read(self, size: int | None = -1) -> bytes:
                self.read_from = True
                return super().read(size)

            def seek(self, offset: int, whence: int = 0) -> int:
                if self.read_from:
                    raise OSError("cannot rewind")
                return super().seek(offset, whence)

        server.accepted = {"tok2"}
        reply = send_requests(RequestsAuth(Source()), server.url, OneWay(BODY))
        assert (reply.status, reply.history) == (401, [])
        assert len(server.attempts) == 1

    def test_httpx_does_not_resend_a_file(self, server: ResourceServer) -> None:
        """httpx streams a file: it is not read ahead for a retry, so the 401 comes back."""
        source = Source()
        server.accepted = {"tok2"}
        reply = send_httpx(HttpxAuth(source), server.url, io.BytesIO(BODY))
        assert (reply.status, reply.history) == (401, [])
        assert [a.body for a in server.attempts] == [BODY]
        assert source.rejected == ["tok1"]

    def test_httpx_resends_json(self, server: ResourceServer) -> None:
        """httpx's json= is bytes content: resent whole."""
        server.accepted = {"tok2"}
        with httpx.Client(auth=HttpxAuth(Source()), timeout=10) as session:
            response = session.post(server.url, json={"a": 1})
        assert response.status_code == 200
        assert [a.body for a in server.attempts] == [b'{"a":1}', b'{"a":1}']

    def test_requests_retry_carries_cookies_the_401_set(self, server: ResourceServer) -> None:
        """As with HTTPDigestAuth, a cookie set by the 401 goes along with the retry."""
        server.accepted, server.set_cookie = {"tok2"}, "affinity=node-7; Path=/"
        reply = send_requests(RequestsAuth(Source()), server.url)
        assert reply.status == 200
        assert server.cookies == [None, "affinity=node-7"]


class TestAsyncClient:
    def test_httpx_auth_works_with_an_async_client(self, server: ResourceServer) -> None:
        """With httpx.AsyncClient the same flow runs: a refused token is replaced once."""
        source = Source()
        server.accepted = {"tok2"}

        async def call() -> httpx.Response:
            async with httpx.AsyncClient(auth=HttpxAuth(source), timeout=10) as client:
                return await client.post(server.url, content=BODY)

        response = asyncio.run(call())

        assert (response.status_code, response.content) == (200, sha(BODY))
        assert [a.authorization for a in server.attempts] == ["Bearer tok1", "Bearer tok2"]
        assert source.rejected == ["tok1"]


class TestConcurrency:
    def test_many_threads_share_one_rejection(
        self, server: ResourceServer, client: tuple[Any, Callable[..., Reply]]
    ) -> None:
        """32 threads whose token is refused at once all end with a 200 and one replacement."""
        make, send = client
        source = Source()
        auth = make(source)
        server.accepted = {"tok2"}
        barrier = threading.Barrier(32)
        replies: list[Reply] = []

        def one() -> None:
            barrier.wait(timeout=10)
            replies.append(send(auth, server.url))

        threads = [ReraisingThread(one) for _ in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)

        assert [r.status for r in replies] == [200] * 32
        assert source.serial == 2  # one token replaced, however many rejected it
        assert {a.authorization for a in server.attempts} <= {"Bearer tok1", "Bearer tok2"}
        assert all(a.body == BODY for a in server.attempts)


class TestWithoutTheClient:
    @pytest.mark.parametrize(
        ("missing", "name"), [("requests", "RequestsAuth"), ("httpx", "HttpxAuth")]
    )
    def test_imports_alone_and_names_the_extra(
        self, monkeypatch: pytest.MonkeyPatch, missing: str, name: str
    ) -> None:
        """With one client missing the module imports; that client's adapter names its extra."""
        for loaded in list(sys.modules):
            if loaded == missing or loaded.startswith(f"{missing}."):
                monkeypatch.delitem(sys.modules, loaded)
        monkeypatch.setitem(sys.modules, missing, None)  # import fails as if not installed
        path = Path(token_refresh.http.__file__)
        spec = importlib.util.spec_from_file_location("token_refresh._http_probe", path)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)

        with pytest.raises(ImportError, match=rf"token_refresh\[{missing}\]"):
            getattr(module, name)(Source())
        other = {"RequestsAuth": "HttpxAuth", "HttpxAuth": "RequestsAuth"}[name]
        assert getattr(module, other)(Source()).source() == "tok1"
