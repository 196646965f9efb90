"""Token requests done right, with the standard library only: each grant is a ``fetch``.

``ClientCredentials``, ``RefreshTokenGrant``, ``TokenExchange`` (RFC 8693) and
``JwtBearer`` (RFC 7523) each make one token request per call and return a
:class:`~token_refresh.shared.Grant`, so any of them can be the ``fetch`` of a
:class:`~token_refresh.shared.SharedToken`. ``discover(issuer)`` finds the token
endpoint in the issuer's metadata. No secret, assertion or token ever reaches a
message, an exception, a log line or a repr.
"""

from __future__ import annotations

import base64
import email.utils
import functools
import http.client
import io
import ipaddress
import json
import os
import re
import socket
import ssl
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal, cast

from . import __version__, _validate
from ._expiry import lifetime_end, measured_skew
from .shared import Grant, InvalidGrant, RateLimited

__all__ = [
    "TIMEOUT",
    "ClientCredentials",
    "JwtBearer",
    "OAuthError",
    "RefreshTokenGrant",
    "ServerMetadata",
    "TokenExchange",
    "discover",
]

#: Seconds one token or metadata request may take in all: connect, TLS, headers and body.
TIMEOUT = 10.0
#: Bytes read of an answer at most: token responses and metadata documents are small.
MAX_RESPONSE = 1 << 20
#: The longest ``Retry-After`` honoured, in seconds: a server's typo must not stop a fleet for days.
MAX_RETRY_AFTER = 3600.0
USER_AGENT = f"token_refresh/{__version__} Python/{sys.version_info[0]}.{sys.version_info[1]}"

_ERROR_CHARS = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749's charset for error codes
_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"

ClientAuth = Literal["basic", "post", "none", "auto"] | Callable[[str], str]
#: A token given as itself, as a file re-read before each request, or as a function.
SubjectToken = str | os.PathLike[str] | Callable[[], str]
Assertion = str | os.PathLike[str] | Callable[[str], str]


class OAuthError(OSError):
    """A token endpoint (or an issuer's metadata) answered wrong, or not at all.

    ``error`` is the OAuth error code (``invalid_client``, ...) and
    ``description`` its ``error_description``, when the server sent usable
    ones; ``status`` is the HTTP status, or None when no HTTP answer came
    (refused, reset, timed out). The message never holds a secret or a token.
    """

    def __init__(
        self,
        message: str,
        *,
        error: str | None = None,
        description: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.error = error
        self.description = description
        self.status = status


# -- URLs ------------------------------------------------------------------------------------


def _shown(url: str) -> str:
    """``url`` for a message: no ``user:password@``, no query (either may hold a credential)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(
        (parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", "")
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


def _checked_url(url: object, what: str, *, query: bool = True) -> str:
    """``url`` if it is https, or http to loopback, with no userinfo; else ValueError.

    The URL is never quoted in the message: it may hold a password.
    """
    if not isinstance(url, str):
        raise TypeError(f"{what} must be a str, not {type(url).__name__}")
    parts = _secure_parts(url)
    if parts is None:
        raise ValueError(f"{what} must be an https:// URL with a host (http:// only to loopback)")
    if "@" in parts.netloc:
        raise ValueError(f"{what} must not hold a user name or password")
    if not query and (parts.query or parts.fragment):
        raise ValueError(f"{what} must have no query or fragment (RFC 8414, 2)")
    return url


def _secure_parts(url: str) -> urllib.parse.SplitResult | None:
    """``url`` split, if it has a host and a port that are fine for https (or http to loopback)."""
    try:
        parts = urllib.parse.urlsplit(url)
        host, _ = parts.hostname, parts.port  # .port raises ValueError when it is no port
    except ValueError:
        return None
    if host and (parts.scheme == "https" or (parts.scheme == "http" and _is_loopback(host))):
        return parts
    return None


# -- one HTTP exchange under one deadline -----------------------------------------------------


class _DeadlineSocket:
    """A connected socket whose every send and receive ends by one deadline.

    A per-read timeout would let a server that sends a byte every few seconds
    hold a token request for ever; this bounds the whole exchange. Like a
    socket, it closes only once the connection and its response have let go.
    """

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock, self._deadline = sock, deadline
        self._readers = 0
        self._closed = False

    def _arm(self) -> None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        self._sock.settimeout(left)

    def sendall(self, data: bytes) -> None:
        self._arm()
        self._sock.sendall(data)

    def recv_into(self, buffer: memoryview, nbytes: int = 0) -> int:
        self._arm()
        return self._sock.recv_into(buffer, nbytes)

    def makefile(self, mode: str) -> io.BufferedReader:
        self._readers += 1
        return io.BufferedReader(socket.SocketIO(cast(socket.socket, self), "rb"))

    def _decref_socketios(self) -> None:
        """Called by SocketIO.close(): a response is done reading."""
        self._readers -= 1
        if self._closed and self._readers <= 0:
            self._sock.close()

    def close(self) -> None:
        """http.client closes the connection before its response is read: wait for the reader."""
        self._closed = True
        if self._readers <= 0:
            self._sock.close()


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    received: float  # wall time the answer came


@functools.cache
def _default_context() -> ssl.SSLContext:
    """The system's trusted CAs, loaded once: an SSLContext may serve many threads."""
    return ssl.create_default_context()


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.001)


def _connect(
    parts: urllib.parse.SplitResult, deadline: float, context: ssl.SSLContext | None
) -> http.client.HTTPConnection:
    host = parts.hostname or ""
    https = parts.scheme == "https"
    sock = socket.create_connection(
        (host, parts.port or (443 if https else 80)), timeout=_left(deadline)
    )
    connection = http.client.HTTPConnection(host, parts.port)
    if https:
        context = context or _default_context()
        try:
            sock.settimeout(_left(deadline))  # CPython bounds the whole handshake by it
            sock = context.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
        # Only for its Host header (no port for 443): the socket is connected already.
        connection = http.client.HTTPSConnection(host, parts.port, context=context)
    connection.sock = cast(socket.socket, _DeadlineSocket(sock, deadline))
    return connection


def _exchange(
    url: str,
    *,
    form: Mapping[str, str | list[str]] | None,
    headers: Mapping[str, str],
    timeout: float,
    context: ssl.SSLContext | None,
) -> _Answer:
    """POST ``form`` (or GET when None) to ``url``; the answer, read within ``timeout`` seconds.

    Raises OAuthError for no answer, a timeout or an answer over MAX_RESPONSE.
    """
    parts = urllib.parse.urlsplit(url)
    target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    body, all_headers = _prepare(form, headers)
    deadline = time.monotonic() + timeout
    connection: http.client.HTTPConnection | None = None
    try:
        connection = _connect(parts, deadline, context)
        connection.request("GET" if body is None else "POST", target, body, all_headers)
        with connection.getresponse() as response:
            return _read(response)
    except _TooLarge:
        raise OAuthError(f"{_shown(url)} answered more than {MAX_RESPONSE} bytes") from None
    except TimeoutError:
        raise OAuthError(f"no answer from {_shown(url)} within {timeout:g}s") from None
    except (OSError, http.client.HTTPException, ValueError) as error:
        # Refused, reset, a TLS failure, not HTTP, or a URL http.client cannot send.
        text = getattr(error, "strerror", None) or str(error) or type(error).__name__
        raise OAuthError(f"no answer from {_shown(url)}: {text}") from None
    finally:
        if connection is not None:
            connection.close()


def _prepare(
    form: Mapping[str, str | list[str]] | None, headers: Mapping[str, str]
) -> tuple[bytes | None, dict[str, str]]:
    """The request's body and headers: the form url-encoded, and who is asking."""
    body = None if form is None else urllib.parse.urlencode(form, doseq=True).encode()
    all_headers = {"User-Agent": USER_AGENT, "Accept": "application/json", "Connection": "close"}
    if body is not None:
        all_headers["Content-Type"] = "application/x-www-form-urlencoded"
    return body, {**all_headers, **headers}


class _TooLarge(Exception):
    """The answer is longer than MAX_RESPONSE."""


def _read(response: http.client.HTTPResponse) -> _Answer:
    length = response.getheader("Content-Length", "")
    if length.isdigit() and int(length) > MAX_RESPONSE:
        raise _TooLarge
    data = response.read(MAX_RESPONSE + 1)
    if len(data) > MAX_RESPONSE:
        raise _TooLarge
    return _Answer(response.status, response.headers, data, time.time())


# -- reading answers --------------------------------------------------------------------------


def _json(answer: _Answer) -> object:
    try:
        return json.loads(answer.body)
    except (ValueError, RecursionError):
        return None


def _safe(text: object, secrets: Iterable[str], limit: int = 300) -> str | None:
    """A server's ``error`` or ``error_description`` fit for a message, or None.

    RFC 6749's characters only (no control characters, no quotes), cut short,
    and anything the request sent as a secret (an echoing server) redacted.
    """
    if not isinstance(text, str) or not _ERROR_CHARS.fullmatch(text):
        return None
    for secret in secrets:
        if len(secret) >= 4:  # as sent, and as the form (or Basic) encoded it
            for sent in (secret, urllib.parse.quote_plus(secret)):
                text = text.replace(sent, "[redacted]")
    return text if len(text) <= limit else text[:limit] + "..."


def _retry_after(answer: _Answer) -> float | None:
    """The answer's Retry-After in seconds (delta-seconds or an HTTP-date), or None."""
    value = (answer.headers.get("Retry-After") or "").strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    when = _http_date(value)
    if when is None:
        return None
    # Against the server's own clock when it tells it: a host whose clock is off waits as long.
    now = _http_date(answer.headers.get("Date", ""))
    return min(max(when - (answer.received if now is None else now), 0.0), MAX_RETRY_AFTER)


def _http_date(text: str) -> float | None:
    """An HTTP-date (RFC 9110, 5.6.7) as Unix seconds, or None."""
    try:
        return email.utils.parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _failure(answer: _Answer, url: str, secrets: Iterable[str]) -> Exception:
    """The exception for an answer that carries no token."""
    where = _shown(url)
    if 300 <= answer.status < 400:
        return OAuthError(
            f"{where} answered a redirect (HTTP {answer.status}); redirects are not followed",
            status=answer.status,
        )
    wait = _retry_after(answer) if answer.status in (429, 503) else None
    if wait is not None:
        return RateLimited(wait)
    document = _json(answer)
    document = document if isinstance(document, dict) else {}
    code = _safe(document.get("error"), secrets, limit=64)
    description = _safe(document.get("error_description"), secrets)
    detail = f" ({code}{': ' + description if description else ''})" if code else ""
    message = f"{where} answered HTTP {answer.status}{detail}"
    if code == "invalid_grant":
        return InvalidGrant(message)
    if not detail and _is_html(answer):
        message += ": an HTML page, not an OAuth answer (a login page or a proxy?)"
    return OAuthError(message, error=code, description=description, status=answer.status)


def _is_html(answer: _Answer) -> bool:
    kind = answer.headers.get_content_type()
    return kind == "text/html" or answer.body.lstrip()[:1] == b"<"


def _document(answer: _Answer, url: str, secrets: Iterable[str]) -> dict[str, object]:
    """The JSON object a successful answer holds, or raise."""
    if not 200 <= answer.status < 300:
        raise _failure(answer, url, secrets)
    document = _json(answer)
    if isinstance(document, dict):
        if "error" in document and "access_token" not in document:  # an error with a 200
            raise _failure(answer, url, secrets)
        return document
    what = "an HTML page" if _is_html(answer) else "something"
    raise OAuthError(f"{_shown(url)} answered {what}, not a JSON object", status=answer.status)


def _age(answer: _Answer) -> float:
    """The answer's ``Age`` header (RFC 9111, 5.1): seconds it spent in a cache; 0 if none."""
    value = (answer.headers.get("Age") or "").strip()
    return float(value) if value.isdigit() else 0.0


@dataclass(frozen=True, slots=True)
class _Reply:
    """A successful token response: its JSON object, and when its request left (wall time)."""

    document: dict[str, object]
    sent: float
    answer: _Answer


# -- the grants -------------------------------------------------------------------------------


def _text(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{what} must be a non-empty str")
    return value


def _scope(scope: str | Iterable[str] | None) -> str | None:
    if scope is None or isinstance(scope, str):
        return scope
    return " ".join(scope)


def _token_source(value: object, what: str) -> object:
    """Check a token given as a str, an os.PathLike or a callable; return it unchanged."""
    if isinstance(value, str):
        _text(value, what)
    elif not isinstance(value, os.PathLike) and not callable(value):
        raise TypeError(f"{what} must be a str, an os.PathLike or a callable")
    return value


def _read_token(value: object, what: str, *args: str) -> str:
    """The token itself: the str, the file's stripped content (read now), or the call's result."""
    if isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        with open(value, encoding="utf-8") as file:
            token = file.read().strip()
        if not token:
            raise ValueError(f"{what}: the file {os.fspath(value)!r} is empty")
        return token
    called = cast(Callable[..., object], value)(*args)
    if not isinstance(called, str) or not called:
        raise TypeError(f"{what}() must return a non-empty str")
    return called


def _check_client(client_id: object, client_secret: object, client_auth: object) -> None:
    """Raise TypeError or ValueError for a client that cannot authenticate as configured."""
    if client_id is not None:
        _text(client_id, "client_id")
    if client_secret is not None:
        _text(client_secret, "client_secret")
        if client_id is None:
            raise ValueError("a client_secret needs its client_id")
    if callable(client_auth):
        if client_secret is not None:
            raise ValueError("client_auth is a client assertion: give no client_secret")
    elif client_auth not in ("basic", "post", "none", "auto"):
        raise ValueError("client_auth must be 'basic', 'post', 'none', 'auto' or a callable")
    elif client_auth == "none" and client_secret is not None:
        raise ValueError("client_auth='none' sends no client_secret: give none")


class _TokenRequest:
    """What every grant shares: the endpoint, client authentication and the request itself."""

    _grant_type = ""

    def __init__(
        self,
        token_endpoint: str,
        client_id: str | None,
        client_secret: str | None,
        *,
        client_auth: ClientAuth,
        scope: str | Iterable[str] | None,
        timeout: float,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self.token_endpoint = _checked_url(token_endpoint, "token_endpoint")
        _check_client(client_id, client_secret, client_auth)
        timeout = _validate.positive(timeout, "timeout")
        if ssl_context is not None and not isinstance(ssl_context, ssl.SSLContext):
            raise TypeError("ssl_context must be an ssl.SSLContext")
        self.client_id = client_id
        self._secret = client_secret
        self._client_auth = client_auth
        self._scope = _scope(scope)
        self._timeout = float(timeout)
        self._ssl_context = ssl_context
        self._post_learned = False  # "auto": this server wants client_secret_post

    @property
    def client_auth(self) -> str:
        """How the client authenticates, as a name (``"private_key_jwt"`` for a callable)."""
        if callable(self._client_auth):
            return "private_key_jwt"
        if self._secret is None:
            return "none"
        return "post" if self._post_learned else self._client_auth

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(token_endpoint={_shown(self.token_endpoint)!r}, "
            f"client_id={self.client_id!r}, client_auth={self.client_auth!r})"
        )

    def _authenticated(
        self, form: dict[str, str | list[str]], mode: str
    ) -> tuple[dict[str, str | list[str]], dict[str, str], list[str]]:
        """The form and headers with the client's authentication; and the secrets they hold."""
        form = dict(form)
        headers: dict[str, str] = {}
        secrets: list[str] = []
        if callable(self._client_auth):
            assertion = _read_token(self._client_auth, "client_auth", self.token_endpoint)
            form.update(client_assertion_type=_ASSERTION_TYPE, client_assertion=assertion)
            secrets.append(assertion)
            mode = "none"
        if self.client_id is None:
            return form, headers, secrets
        if self._secret is None or mode == "none":
            form["client_id"] = self.client_id
        elif mode == "post":
            form.update(client_id=self.client_id, client_secret=self._secret)
        else:  # RFC 6749, 2.3.1: each form-encoded before they are joined and Base64-encoded
            pair = (
                f"{urllib.parse.quote_plus(self.client_id)}:{urllib.parse.quote_plus(self._secret)}"
            )
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        if self._secret is not None:
            secrets.append(self._secret)
        return form, headers, secrets

    def _request(self, form: dict[str, str | list[str]], secrets: list[str]) -> _Reply:
        """Send the grant; its JSON document, when it was sent (wall time) and the answer."""
        form = {"grant_type": self._grant_type, **form}
        if self._scope is not None:
            form["scope"] = self._scope
        mode = self._client_auth if isinstance(self._client_auth, str) else "none"
        mode = "post" if self._post_learned else mode
        sent = time.time()
        answer = self._send(form, mode, secrets)
        if mode == "auto" and self._secret is not None and _is_invalid_client(answer):
            # This server takes client_secret_post only: ask once more that way, and remember.
            sent = time.time()
            retried = self._send(form, "post", secrets)
            if not _is_invalid_client(retried):
                self._post_learned, answer = True, retried
        return _Reply(_document(answer, self.token_endpoint, secrets), sent, answer)

    def _send(self, form: dict[str, str | list[str]], mode: str, secrets: list[str]) -> _Answer:
        authenticated, headers, sent_secrets = self._authenticated(form, mode)
        secrets.extend(sent_secrets)
        return _exchange(
            self.token_endpoint,
            form=authenticated,
            headers=headers,
            timeout=self._timeout,
            context=self._ssl_context,
        )

    def _grant(self, form: dict[str, str | list[str]], secrets: list[str]) -> Grant:
        return _to_grant(self._request(form, secrets), self.token_endpoint)


def _is_invalid_client(answer: _Answer) -> bool:
    if answer.status != 401:
        return False
    document = _json(answer)
    return isinstance(document, dict) and document.get("error") == "invalid_client"


def _extend(form: dict[str, str | list[str]], **values: str | Iterable[str] | None) -> None:
    """Add the given parameters (a list sends the parameter once per item)."""
    for name, value in values.items():
        if isinstance(value, str):
            form[name] = value
        elif value is not None:
            form[name] = list(value)


class ClientCredentials(_TokenRequest):
    """The client_credentials grant (RFC 6749, 4.4): a service's own token."""

    _grant_type = "client_credentials"

    def __init__(
        self,
        token_endpoint: str,
        client_id: str,
        client_secret: str | None = None,
        *,
        scope: str | Iterable[str] | None = None,
        audience: str | None = None,
        resource: str | Iterable[str] | None = None,
        client_auth: ClientAuth = "basic",
        timeout: float = TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(
            token_endpoint,
            _text(client_id, "client_id"),
            client_secret,
            client_auth=client_auth,
            scope=scope,
            timeout=timeout,
            ssl_context=ssl_context,
        )
        self._form: dict[str, str | list[str]] = {}
        _extend(self._form, audience=audience, resource=resource)

    def __call__(self) -> Grant:
        """One token request: its Grant; RateLimited, InvalidGrant or OAuthError if it fails."""
        return self._grant(self._form, [])


class RefreshTokenGrant(_TokenRequest):
    """The refresh_token grant (RFC 6749, 6), for ``SharedToken(fetch, rotating=True)``.

    Called as ``fetch(previous)``: it spends ``previous.refresh_token`` (the
    ``refresh_token=`` given at first, when there is no previous grant) and
    returns the new grant with the server's new refresh token, or the one it
    spent when the server sends none. ``client_auth="auto"`` is refused: its
    probe could spend a rotating refresh token on a request that fails.
    """

    _grant_type = "refresh_token"

    def __init__(
        self,
        token_endpoint: str,
        client_id: str,
        client_secret: str | None = None,
        *,
        refresh_token: str,
        scope: str | Iterable[str] | None = None,
        client_auth: Literal["basic", "post", "none"] | Callable[[str], str] = "basic",
        timeout: float = TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if cast(object, client_auth) == "auto":
            raise ValueError(
                "RefreshTokenGrant does not take client_auth='auto': a probe could spend a "
                "rotating refresh token; say 'basic' or 'post'"
            )
        super().__init__(
            token_endpoint,
            _text(client_id, "client_id"),
            client_secret,
            client_auth=client_auth,
            scope=scope,
            timeout=timeout,
            ssl_context=ssl_context,
        )
        self._refresh_token = _text(refresh_token, "refresh_token")

    def __call__(self, previous: Grant | None = None) -> Grant:
        """Spend ``previous``'s refresh token (or the first one); the new Grant."""
        spent = self._refresh_token
        if previous is not None and previous.refresh_token:
            spent = previous.refresh_token
        reply = self._request({"refresh_token": spent}, [spent])
        grant = _to_grant(reply, self.token_endpoint)
        new = reply.document.get("refresh_token")
        return replace(grant, refresh_token=new if isinstance(new, str) and new else spent)


def _to_grant(reply: _Reply, url: str) -> Grant:
    """The response as a Grant: lifetimes from when it was sent less its Age, and the skew seen.

    ``expires_in`` and ``refresh_in`` count from ``reply.sent``; the skew is
    the token's ``iat`` (else the response's ``Date``) against its receipt.
    """
    document, answer = reply.document, reply.answer
    token = document.get("access_token")
    if not isinstance(token, str) or not token:
        raise OAuthError(f"{_shown(url)} answered no access_token", status=200)
    age = _age(answer)
    return Grant(
        token,
        expires_at=lifetime_end(reply.sent, document.get("expires_in"), age),
        refresh_at=lifetime_end(reply.sent, document.get("refresh_in"), age),
        clock_skew=measured_skew(
            token, answer.received, _http_date(answer.headers.get("Date", ""))
        ),
    )


class TokenExchange(_TokenRequest):
    """RFC 8693 token exchange: trade a token you hold (``subject_token``) for one to use.

    ``subject_token`` (and ``actor_token``): a ``str`` is the token itself; an
    ``os.PathLike`` is a file read again (whitespace stripped) before each
    request, as a projected service-account token needs; a callable is called
    before each request.
    """

    _grant_type = _TOKEN_EXCHANGE

    def __init__(
        self,
        token_endpoint: str,
        client_id: str | None = None,
        client_secret: str | None = None,
        *,
        subject_token: SubjectToken,
        subject_token_type: str,
        actor_token: SubjectToken | None = None,
        actor_token_type: str | None = None,
        requested_token_type: str | None = None,
        audience: str | Iterable[str] | None = None,
        resource: str | Iterable[str] | None = None,
        scope: str | Iterable[str] | None = None,
        client_auth: ClientAuth = "basic",
        timeout: float = TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(
            token_endpoint,
            client_id,
            client_secret,
            client_auth=client_auth,
            scope=scope,
            timeout=timeout,
            ssl_context=ssl_context,
        )
        self._subject = _token_source(subject_token, "subject_token")
        if (actor_token is None) != (actor_token_type is None):
            raise ValueError("actor_token and actor_token_type go together (RFC 8693, 2.1)")
        self._actor = None if actor_token is None else _token_source(actor_token, "actor_token")
        self._form: dict[str, str | list[str]] = {
            "subject_token_type": _text(subject_token_type, "subject_token_type")
        }
        _extend(
            self._form,
            actor_token_type=actor_token_type,
            requested_token_type=requested_token_type,
            audience=audience,
            resource=resource,
        )

    def __call__(self) -> Grant:
        """Read the subject (and actor) token, exchange it; the Grant."""
        subject = _read_token(self._subject, "subject_token")
        form = {**self._form, "subject_token": subject}
        secrets = [subject]
        if self._actor is not None:
            form["actor_token"] = actor = _read_token(self._actor, "actor_token")
            secrets.append(actor)
        return self._grant(form, secrets)


class JwtBearer(_TokenRequest):
    """RFC 7523 JWT bearer grant: an assertion you sign (or are given) for an access token.

    ``assertion``: a ``str``, an ``os.PathLike`` read again before each
    request, or a callable called as ``assertion(token_endpoint)`` before each
    request (sign a short-lived JWT there). The library signs nothing itself.
    """

    _grant_type = _JWT_BEARER

    def __init__(
        self,
        token_endpoint: str,
        *,
        assertion: Assertion,
        client_id: str | None = None,
        client_secret: str | None = None,
        scope: str | Iterable[str] | None = None,
        client_auth: ClientAuth = "basic",
        timeout: float = TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(
            token_endpoint,
            client_id,
            client_secret,
            client_auth=client_auth,
            scope=scope,
            timeout=timeout,
            ssl_context=ssl_context,
        )
        self._assertion = _token_source(assertion, "assertion")

    def __call__(self) -> Grant:
        """Make or read the assertion, present it; the Grant."""
        assertion = _read_token(self._assertion, "assertion", self.token_endpoint)
        return self._grant({"assertion": assertion}, [assertion])


# -- discovery --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerMetadata:
    """An authorization server's metadata (RFC 8414 / OpenID Connect Discovery), checked."""

    issuer: str
    token_endpoint: str
    #: The whole document as the server sent it.
    document: Mapping[str, object] = field(repr=False)


def discover(
    issuer: str, *, timeout: float = TIMEOUT, ssl_context: ssl.SSLContext | None = None
) -> ServerMetadata:
    """Fetch and check ``issuer``'s metadata: RFC 8414 first, then OpenID Connect Discovery.

    The document's ``issuer`` must be ``issuer`` character for character (RFC
    8414, 3.3), and its ``token_endpoint`` https (or http to loopback); else
    OAuthError. A 404 moves on to the next well-known URL.
    """
    parts = urllib.parse.urlsplit(_checked_url(issuer, "the issuer", query=False))
    path = parts.path.rstrip("/")
    for url in (
        f"{parts.scheme}://{parts.netloc}/.well-known/oauth-authorization-server{path}",
        f"{parts.scheme}://{parts.netloc}{path}/.well-known/openid-configuration",
    ):
        answer = _exchange(url, form=None, headers={}, timeout=timeout, context=ssl_context)
        if answer.status == 404:
            continue
        document = _document(answer, url, [])
        _check_issuer(document.get("issuer"), issuer, url)
        endpoint = document.get("token_endpoint")
        if not isinstance(endpoint, str):
            raise OAuthError(f"{_shown(url)} names no token_endpoint")
        try:
            _checked_url(endpoint, "its token_endpoint")
        except ValueError as error:
            raise OAuthError(f"{_shown(url)}: {error}") from None
        return ServerMetadata(issuer, endpoint, document)
    raise OAuthError(f"{_shown(issuer)} publishes no OAuth metadata (HTTP 404 at .well-known/)")


def _check_issuer(named: object, issuer: str, url: str) -> None:
    """Raise OAuthError unless the metadata at ``url`` names ``issuer`` as its issuer."""
    if named == issuer:
        return
    if not isinstance(named, str):
        raise OAuthError(f"{_shown(url)} names no issuer")
    shown = repr(named) if len(named) <= 200 else "another issuer"
    raise OAuthError(
        f"{_shown(url)} names the issuer {shown}, not {issuer!r}: metadata for another issuer "
        "is not used (RFC 8414, 3.3); give the issuer URL exactly as it names itself"
    )
