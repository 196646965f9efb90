"""Every request carries a good token: auth for ``requests`` and ``httpx``.

``RequestsAuth(source)`` (extra ``token_refresh[requests]``) and
``HttpxAuth(source)`` (extra ``token_refresh[httpx]``) put
``Authorization: Bearer <source()>`` on each request. ``source`` is a
:class:`~token_refresh.shared.SharedToken` or any ``() -> str``.

A 401 whose ``WWW-Authenticate`` is missing, or names a ``Bearer`` challenge
with no ``error`` or ``error="invalid_token"``, means the server refused the
token: the adapter calls ``source.reject(sent)`` (when the source has one),
asks the source again and, if the new token differs, sends the request once
more, provided its body can be sent again whole. A generator, a pipe or any
other one-shot stream is never buffered for that: its request gets the 401.

This module imports with either client installed, or none; building the
adapter of a missing client raises an ``ImportError`` naming the extra.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Generator, Iterable
from http.cookiejar import CookieJar
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import httpx
    import requests
    from httpx import Auth as _HttpxAuthBase
    from requests.auth import AuthBase as _RequestsAuthBase
    from requests.cookies import extract_cookies_to_jar
else:
    try:
        import requests
        from requests.auth import AuthBase as _RequestsAuthBase
        from requests.cookies import extract_cookies_to_jar
    except ImportError:
        requests = None
        _RequestsAuthBase = object
    try:
        import httpx
        from httpx import Auth as _HttpxAuthBase
    except ImportError:
        httpx = None
        _HttpxAuthBase = object

__all__ = ["HttpxAuth", "NoToken", "RequestsAuth", "TokenSource", "refused_token"]

#: A token source: a SharedToken, or any callable returning the token to send.
TokenSource = Callable[[], "str | None"]

# RFC 9110 §11: a challenge is a scheme, then a token68 or comma-separated auth-params.
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_PARAM = re.compile(rf"[\s,]*({_TOKEN})\s*=\s*({_TOKEN}|{_QUOTED})?\s*(?=,|$)")
_SCHEME = re.compile(rf"[\s,]*({_TOKEN})(?:\s+[A-Za-z0-9\-._~+/]+=*\s*(?=,|$))?")
_UNQUOTE = re.compile(r"\\(.)")
#: What a header value may hold: visible ASCII, so that no token splits or bends a header.
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")


class NoToken(RuntimeError):
    """The token source gave no token (None or an empty string): the request was not sent."""


def _challenges(header: str) -> list[tuple[str, dict[str, str]]]:
    """The challenges of a ``WWW-Authenticate`` value: (scheme in lower case, params)."""
    found: list[tuple[str, dict[str, str]]] = []
    position = 0
    while position < len(header.rstrip(", \t")):
        param = _PARAM.match(header, position) if found else None
        if param is not None:
            value = param.group(2) or ""
            if value.startswith('"'):
                value = _UNQUOTE.sub(r"\1", value[1:-1])
            found[-1][1][param.group(1).lower()] = value
            position = param.end()
            continue
        scheme = _SCHEME.match(header, position)
        if scheme is None:
            break  # not a challenge list: keep what was read
        found.append((scheme.group(1).lower(), {}))
        position = scheme.end()
    return found


def refused_token(status_code: int, www_authenticate: Iterable[str]) -> bool:
    """Whether a response says the server refused the bearer token the request carried.

    Only a 401: with no ``WWW-Authenticate`` at all, or with a ``Bearer``
    challenge that has no ``error`` or has ``error="invalid_token"``. Not a
    challenge of another scheme only, ``insufficient_scope`` or any other
    error, nor a 403.
    """
    if status_code != 401:
        return False
    values = [value for value in www_authenticate if value.strip()]
    if not values:
        return True
    challenges = [c for value in values for c in _challenges(value)]
    return any(
        params.get("error", "invalid_token") == "invalid_token"
        for scheme, params in challenges
        if scheme == "bearer"
    )


def _name(source: object) -> str:
    """A source's name for messages: never its repr, which may show a secret (a partial's args)."""
    name = getattr(source, "__qualname__", None)
    return name if isinstance(name, str) else type(source).__name__


def _missing(client: str) -> ImportError:
    return ImportError(
        f"token_refresh.http.{'RequestsAuth' if client == 'requests' else 'HttpxAuth'} "
        f'needs {client}: pip install "token_refresh[{client}]"'
    )


class _Bearer:
    """What both adapters share: the source, a token from it, and what a refusal does."""

    def __init__(self, source: TokenSource) -> None:
        if not callable(source):
            raise TypeError(f"source must be callable, not {type(source).__name__}")
        self.source = source

    def __repr__(self) -> str:
        return f"{type(self).__name__}({_name(self.source)})"

    def token(self) -> str:
        """A token from the source, checked; the source's own exception passes through."""
        token = self.source()
        if token is None or token == "":
            raise NoToken(f"{_name(self.source)} gave no token: the request was not sent")
        if not isinstance(token, str):
            raise TypeError(f"the token source returned {type(token).__name__}, not str")
        if _HEADER_SAFE.fullmatch(token) is None:
            raise ValueError("the token holds characters an HTTP header cannot carry")
        return token

    def reject(self, sent: str) -> None:
        """Tell the source that a server refused ``sent``, when the source can hear it."""
        reject = getattr(self.source, "reject", None)
        if reject is not None:
            reject(sent)

    def refused(
        self, status_code: int, authorization: object, challenges: list[str], sent: str
    ) -> bool:
        """Whether a response refused the token ``sent``; if so, the source hears of it.

        ``authorization`` is the header the answered request carried: after a
        redirect to another host it no longer holds our token, and that
        host's 401 is not a refusal of it.
        """
        if authorization != f"Bearer {sent}" or not refused_token(status_code, challenges):
            return False
        self.reject(sent)
        return True

    def replacement(self, sent: str) -> str | None:
        """A token to retry with after ``sent`` was refused, or None when it is the same one."""
        token = self.token()
        return None if token == sent else token


class _Sent:
    """One request's attempt as RequestsAuth saw it: its token, where its body began."""

    __slots__ = ("position", "replayable", "retried", "token")

    def __init__(self, token: str, body: object) -> None:
        self.token = token
        self.retried = False
        self.position: int | None = None
        self.replayable = body is None or isinstance(body, (bytes, str))
        if not self.replayable and _seekable(body):
            try:
                self.position = body.tell()  # type: ignore[attr-defined]
            except OSError:  # a pipe or a socket: it says seekable but cannot tell
                return
            self.replayable = True

    def rewind(self, body: object) -> bool:
        """Put the body back where it began; False if it cannot be."""
        if self.position is None:
            return self.replayable
        try:
            body.seek(self.position)  # type: ignore[attr-defined]
        except OSError:
            return False
        return True


def _seekable(body: object) -> bool:
    """Whether ``body`` is a file that says it can seek (one without ``seekable()`` is not)."""
    try:
        return bool(body.seekable())  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):  # not a file, or a closed one
        return False


class RequestsAuth(_Bearer, _RequestsAuthBase):
    """``requests`` auth: a bearer token from ``source`` on each request, one retry on refusal.

    ``session.auth = RequestsAuth(token)``. On a refused token the request is
    sent again through the same connection adapter (as requests' own
    ``HTTPDigestAuth`` does) and the 401 is kept in ``response.history``.
    Bodies of bytes or str, and seekable files (rewound to where they
    began), are sent again; a generator or any other stream is not.
    """

    def __init__(self, source: TokenSource) -> None:
        if requests is None:
            raise _missing("requests")
        super().__init__(source)

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        sent = _Sent(self.token(), request.body)
        request.headers["Authorization"] = f"Bearer {sent.token}"

        def on_response(response: requests.Response, **send: Any) -> requests.Response:
            return self._handle_401(response, sent, send)

        request.register_hook("response", on_response)
        return request

    def _handle_401(
        self, response: requests.Response, sent: _Sent, send: dict[str, Any]
    ) -> requests.Response:
        if not self._refused(response, sent.token) or sent.retried:
            return response
        if not sent.rewind(response.request.body):
            return response
        # Read and release the 401 so that the retry may reuse its connection.
        response.content  # noqa: B018
        response.close()
        token = self.replacement(sent.token)
        if token is None:
            return response
        sent.token, sent.retried = token, True
        retry = response.request.copy()
        retry.headers["Authorization"] = f"Bearer {token}"
        # As HTTPDigestAuth.handle_401: cookies the 401 set go along. A request a
        # Session prepared (the only kind whose response hooks run) has its jar.
        jar = cast("CookieJar", retry._cookies)
        extract_cookies_to_jar(jar, response.request, response.raw)
        retry.prepare_cookies(jar)
        again: requests.Response = response.connection.send(retry, **send)
        again.history.append(response)
        again.request = retry
        self._refused(again, token)
        return again

    def _refused(self, response: requests.Response, sent: str) -> bool:
        return self.refused(
            response.status_code,
            response.request.headers.get("Authorization"),
            [response.headers.get("WWW-Authenticate", "")],
            sent,
        )


class HttpxAuth(_Bearer, _HttpxAuthBase):
    """``httpx`` auth: a bearer token from ``source`` on each request, one retry on refusal.

    ``httpx.Client(auth=HttpxAuth(token))``. On a refused token a request
    whose content is bytes or str (``content=``, ``data=``, ``json=``) is
    sent again, and the 401 is kept in ``response.history``; a streamed body
    (a generator, a file, multipart) is never read ahead for that, so its
    request gets the 401. With an ``httpx.AsyncClient`` it works too, but
    asking the source for a token blocks the event loop while it fetches.
    """

    requires_request_body = False  # True would read a streamed body into memory first
    requires_response_body = False

    def __init__(self, source: TokenSource) -> None:
        if httpx is None:
            raise _missing("httpx")
        super().__init__(source)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        sent = self.token()
        request.headers["Authorization"] = f"Bearer {sent}"
        response = yield request
        if not self._refused(response, sent) or not isinstance(request.stream, httpx.ByteStream):
            return
        token = self.replacement(sent)
        if token is not None:
            request.headers["Authorization"] = f"Bearer {token}"
            self._refused((yield request), token)

    def _refused(self, response: httpx.Response, sent: str) -> bool:
        return self.refused(
            response.status_code,
            response.request.headers.get("Authorization"),
            response.headers.get_list("WWW-Authenticate"),
            sent,
        )
