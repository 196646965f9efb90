"""A strict OAuth 2.0 token server on 127.0.0.1 (stdlib http.server), for tests and docs.

It refuses what a strict server (oidc-provider, say) refuses, which
oauth2-mock-server accepts:

- HTTP Basic credentials are decoded as RFC 6749, 2.3.1 says: Base64, split at
  the first colon, then each half form-decoded. A client that does not
  form-encode a secret with ``+``, ``%`` or ``:`` in it is ``invalid_client``.
- Each client has one authentication method (``basic``, ``post``, ``none`` or
  ``jwt``, a client assertion); any other is ``invalid_client`` (401), and two
  at once are ``invalid_request`` (RFC 6749, 2.3).
- A request body must be ``application/x-www-form-urlencoded``, with no
  parameter twice (RFC 6749, 3.2).
- Refresh tokens rotate: each is good once; a second use is ``invalid_grant``
  (every one presented is recorded, so a token spent twice shows).
- Token exchange (RFC 8693) and JWT bearer (RFC 7523) take the subject tokens
  and assertions the test lists as good.
- ``answers`` holds canned answers that go first (a 429 with an HTTP-date
  ``Retry-After``, a redirect, HTML, ...).

Tokens are opaque (``at-N``, ``rt-N``) and live ``lifetime`` seconds.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import ssl
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"

#: An answer the test queues: called with the handler, it writes the whole response.
Answer = Callable[[BaseHTTPRequestHandler], None]


def answer(status: int, body: object, **headers: str) -> Answer:
    """An HTTP answer: a JSON body, or raw bytes."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()

    def send(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response_only(status)  # the Date header is the answer's own, if it has one
        defaults = {"Content-Type": "application/json", "Date": handler.date_time_string()}
        for name, value in {**defaults, **headers}.items():
            handler.send_header(name.replace("_", "-"), value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    return send


class Refused(Exception):
    """An OAuth error answer: status, error code, description."""

    def __init__(self, status: int, error: str, description: str = "") -> None:
        super().__init__(error)
        self.status, self.error, self.description = status, error, description


@dataclass
class Client:
    """A registered client: its secret and its one authentication method."""

    secret: str | None
    method: str  # "basic", "post", "none" or "jwt"


@dataclass
class Seen:
    """One token request, as the server saw it."""

    path: str
    headers: dict[str, str]
    form: dict[str, list[str]]
    client: str | None = None
    method: str | None = None  # how the client authenticated
    outcome: str = ""  # "ok", or the error code


@dataclass
class StrictTokenServer:
    """The server; ``start()`` it, ``stop()`` it (or use it as a context manager)."""

    lifetime: float = 3600.0
    #: Serve https with this context (a client certificate too, if it requires one).
    ssl_context: ssl.SSLContext | None = None
    clients: dict[str, Client] = field(default_factory=dict)
    subject_tokens: set[str] = field(default_factory=set)  # good for token exchange
    assertions: set[str] = field(default_factory=set)  # good for JWT bearer and client auth
    #: Or a check of each assertion (a JWT's signature, say): True if it is good.
    assertion_check: Callable[[str], bool] | None = None
    answers: list[Answer] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    #: Every refresh token presented, in order: a token spent twice shows twice.
    presented: list[str] = field(default_factory=list)
    #: Refresh tokens issued and not yet used.
    live_refresh_tokens: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._serials = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # -- running ----------------------------------------------------------------------------

    def start(self) -> StrictTokenServer:
        strict = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                strict._handle(self)

            def do_GET(self) -> None:
                strict._metadata(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # no noise on stderr

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        scheme = "http"
        if self.ssl_context is not None:
            scheme = "https"
            self._server.socket = self.ssl_context.wrap_socket(
                self._server.socket, server_side=True
            )
        self.url = f"{scheme}://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.01,), name="strict-token-server"
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        assert self._thread is not None
        self._thread.join(timeout=10)

    def __enter__(self) -> StrictTokenServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def token_url(self) -> str:
        return f"{self.url}/token"

    def queue(self, *answers: Answer) -> None:
        with self._lock:
            self.answers.extend(answers)

    def issue_refresh_token(self) -> str:
        """A refresh token good for one use, as an authorization-code flow would hand out."""
        with self._lock:
            token = f"rt-{next(self._serials)}"
            self.live_refresh_tokens.add(token)
        return token

    # -- requests ---------------------------------------------------------------------------

    def _canned(self, handler: BaseHTTPRequestHandler, body: str) -> Seen | None:
        """Record the request; answer it with the first canned answer if there is one."""
        form = urllib.parse.parse_qs(body, keep_blank_values=True)
        seen = Seen(handler.path, dict(handler.headers), form)
        with self._lock:
            self.seen.append(seen)
            canned = self.answers.pop(0) if self.answers else None
        if canned is None:
            return seen
        seen.outcome = "canned"
        canned(handler)
        return None

    def _metadata(self, handler: BaseHTTPRequestHandler) -> None:
        """RFC 8414 metadata (and no OpenID Connect document)."""
        if self._canned(handler, "") is None:
            return
        if handler.path == "/.well-known/oauth-authorization-server":
            answer(200, {"issuer": self.url, "token_endpoint": self.token_url})(handler)
        else:
            answer(404, {"error": "not_found"})(handler)

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length", "0"))
        seen = self._canned(handler, handler.rfile.read(length).decode("utf-8", "replace"))
        if seen is None:
            return
        try:
            document = self._token(handler, seen)
        except Refused as refused:
            seen.outcome = refused.error
            error = {"error": refused.error, "error_description": refused.description}
            extra = {"WWW-Authenticate": 'Basic realm="token"'} if refused.status == 401 else {}
            answer(refused.status, error, **extra)(handler)
            return
        seen.outcome = "ok"
        answer(200, document, Cache_Control="no-store")(handler)

    def _token(self, handler: BaseHTTPRequestHandler, seen: Seen) -> dict[str, object]:
        if handler.path != "/token":
            raise Refused(404, "not_found")
        if handler.headers.get_content_type() != "application/x-www-form-urlencoded":
            raise Refused(400, "invalid_request", "the body must be form-encoded")
        repeatable = ("resource", "audience")  # RFC 8707, 2; RFC 8693, 2.1
        if any(len(v) > 1 for name, v in seen.form.items() if name not in repeatable):
            raise Refused(400, "invalid_request", "a parameter appears twice")
        form = {name: values[0] for name, values in seen.form.items()}
        seen.client, seen.method = self._authenticate(handler, form)
        grant = form.get("grant_type")
        if grant == "client_credentials":
            return self._mint()
        if grant == "refresh_token":
            return self._rotate(form)
        if grant == TOKEN_EXCHANGE:
            return self._exchange(form)
        if grant == JWT_BEARER:
            if not self._good_assertion(form.get("assertion")):
                raise Refused(400, "invalid_grant", "the assertion is not good")
            return self._mint()
        raise Refused(400, "unsupported_grant_type")

    def _authenticate(
        self, handler: BaseHTTPRequestHandler, form: dict[str, str]
    ) -> tuple[str | None, str | None]:
        """The client and the method it used; Refused for anything a strict server refuses."""
        methods: list[tuple[str, str | None, str | None]] = []
        header = handler.headers.get("Authorization")
        if header is not None:
            methods.append(("basic", *_basic(header)))
        if "client_secret" in form:
            methods.append(("post", form.get("client_id"), form["client_secret"]))
        if "client_assertion" in form:
            if form.get("client_assertion_type") != ASSERTION_TYPE:
                raise Refused(400, "invalid_request", "unknown client_assertion_type")
            methods.append(("jwt", form.get("client_id"), form["client_assertion"]))
        if len(methods) > 1:
            raise Refused(400, "invalid_request", "more than one client authentication")
        if not methods:
            if "client_id" not in form:
                return None, None  # no client at all (a JWT bearer grant may have none)
            methods.append(("none", form["client_id"], None))
        method, client_id, credential = methods[0]
        client = self.clients.get(client_id or "")
        if client is None or client.method != method:
            raise Refused(401, "invalid_client", "unknown client or authentication method")
        good = self._good_assertion(credential) if method == "jwt" else credential == client.secret
        if not good:
            raise Refused(401, "invalid_client", "bad client credentials")
        return client_id, method

    def _good_assertion(self, assertion: str | None) -> bool:
        if assertion is None:
            return False
        if self.assertion_check is not None:
            return self.assertion_check(assertion)
        return assertion in self.assertions

    def _mint(self, refresh: bool = False) -> dict[str, object]:
        with self._lock:
            serial = next(self._serials)
            document: dict[str, object] = {
                "access_token": f"at-{serial}",
                "token_type": "Bearer",
                "expires_in": self.lifetime,
            }
            if refresh:
                token = f"rt-{serial}"
                self.live_refresh_tokens.add(token)
                document["refresh_token"] = token
        return document

    def _rotate(self, form: dict[str, str]) -> dict[str, object]:
        token = form.get("refresh_token", "")
        with self._lock:
            self.presented.append(token)
            good = token in self.live_refresh_tokens
            self.live_refresh_tokens.discard(token)
        if not good:
            raise Refused(400, "invalid_grant", "the refresh token is spent or unknown")
        return self._mint(refresh=True)

    def _exchange(self, form: dict[str, str]) -> dict[str, object]:
        if not form.get("subject_token_type"):
            raise Refused(400, "invalid_request", "subject_token_type is required")
        if form.get("subject_token") not in self.subject_tokens:
            raise Refused(400, "invalid_grant", "the subject token is not good")
        return {
            **self._mint(),
            "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
        }


def _basic(header: str) -> tuple[str | None, str | None]:
    """The client id and secret of a Basic header, decoded as RFC 6749, 2.3.1 says."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        raise Refused(401, "invalid_client", "not Basic")
    try:
        decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise Refused(400, "invalid_request", "malformed Basic credentials") from None
    client_id, colon, secret = decoded.partition(":")
    if not colon:
        raise Refused(400, "invalid_request", "malformed Basic credentials")
    return urllib.parse.unquote_plus(client_id), urllib.parse.unquote_plus(secret)
