"""A tiny OAuth 2.0 client for the demo: the client_credentials grant over urllib."""

from __future__ import annotations

import base64
import http.client
import ipaddress
import json
import math
import re
import urllib.error
import urllib.parse
import urllib.request

#: Seconds to wait for the token endpoint, per request.
TIMEOUT = 10.0
_MAX_BODY = 1 << 20  # bytes read from a response: token and metadata documents are small
_ERROR_CODE = re.compile(r"[\x20-\x21\x23-\x5b\x5d-\x7e]{1,64}")  # RFC 6749's charset for "error"


class TokenRequestError(OSError):
    """The token endpoint could not be reached, refused, or answered something unusable.

    ``status`` is the HTTP status (None if there was no HTTP answer) and
    ``error`` the OAuth error code the server gave (``invalid_grant``, ...),
    if any. The message never carries a token or a credential.
    """

    def __init__(self, message: str, *, status: int | None = None, error: str | None = None):
        super().__init__(message)
        self.status = status
        self.error = error


def check_url(url: str, what: str) -> str:
    """Return ``url`` if it is https, or http to this machine; raise ValueError if not.

    Credentials and tokens never travel in the clear beyond loopback.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        host, _ = parts.hostname, parts.port  # .port raises ValueError if it is no port
    except ValueError:
        host = None
    if host and (parts.scheme == "https" or (parts.scheme == "http" and _is_loopback(host))):
        return url
    # The URL is not quoted: it may hold a password.
    raise ValueError(f"{what} must be an https:// URL with a host (http:// only to localhost)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


def discover_token_endpoint(issuer: str, *, timeout: float = TIMEOUT) -> str:
    """Find the issuer's token endpoint in its published metadata.

    Tries OpenID Connect Discovery (``<issuer>/.well-known/openid-configuration``),
    then RFC 8414 (``/.well-known/oauth-authorization-server<path>``). The metadata's
    ``issuer`` must be ``issuer`` exactly (RFC 8414, 3.3; OpenID Connect Discovery,
    4.3), else it is not used: a TokenRequestError says what the server calls itself.
    """
    parts = urllib.parse.urlsplit(check_url(issuer, "the issuer"))
    path = parts.path.rstrip("/")
    candidates = (
        f"{parts.scheme}://{parts.netloc}{path}/.well-known/openid-configuration",
        f"{parts.scheme}://{parts.netloc}/.well-known/oauth-authorization-server{path}",
    )
    for url in candidates:
        try:
            metadata = _json_from(urllib.request.Request(url), timeout)
        except TokenRequestError as error:
            if error.status == 404:
                continue
            raise
        _check_issuer(metadata.get("issuer"), issuer, url)
        endpoint = metadata.get("token_endpoint")
        if not isinstance(endpoint, str):
            raise TokenRequestError(f"{_without_secrets(url)} names no token_endpoint")
        try:
            return check_url(endpoint, "the token endpoint")
        except ValueError as error:
            raise TokenRequestError(str(error)) from None
    raise TokenRequestError(
        f"{_without_secrets(issuer)} publishes no OAuth metadata (HTTP 404 at .well-known/)"
    )


def _check_issuer(named: object, issuer: str, url: str) -> None:
    """Raise TokenRequestError unless the metadata at ``url`` names ``issuer`` as its issuer."""
    if named == issuer:
        return
    where = _without_secrets(url)
    if not isinstance(named, str):
        raise TokenRequestError(f"{where} names no issuer")
    shown = repr(named) if len(named) <= 200 else "another issuer"
    raise TokenRequestError(
        f"{where} names the issuer {shown}, not {_without_secrets(issuer)!r}: metadata for "
        "another issuer is not used (RFC 8414, 3.3); give the issuer URL exactly as it names itself"
    )


def fetch_token(
    token_url: str,
    *,
    client_id: str,
    client_secret: str | None = None,
    timeout: float = TIMEOUT,
) -> tuple[str, float | None]:
    """POST a client_credentials grant; return the access token and its ``expires_in``.

    With a secret the client authenticates with HTTP Basic (RFC 6749, 2.3.1);
    without one it sends its ``client_id`` in the form, as a public client.
    ``expires_in`` is None when the response has no usable one.
    """
    form = {"grant_type": "client_credentials"}
    headers = {"Accept": "application/json"}
    if client_secret is None:
        form["client_id"] = client_id
    else:
        # Form-encoded first, as RFC 6749 (2.3.1) asks.
        pair = f"{urllib.parse.quote_plus(client_id)}:{urllib.parse.quote_plus(client_secret)}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
    request = urllib.request.Request(
        token_url, data=urllib.parse.urlencode(form).encode(), headers=headers, method="POST"
    )
    response = _json_from(request, timeout)
    token = response.get("access_token")
    if not isinstance(token, str) or not token:
        raise TokenRequestError("the token response has no access_token")
    expires_in = response.get("expires_in")
    if isinstance(expires_in, bool) or not isinstance(expires_in, (int, float, str)):
        return token, None
    try:
        seconds = float(expires_in)  # a str too: some servers send it quoted
    except (ValueError, OverflowError):
        return token, None
    return token, seconds if math.isfinite(seconds) and seconds > 0 else None


def _json_from(request: urllib.request.Request, timeout: float) -> dict[str, object]:
    """Send ``request``; return the JSON object it answers, or raise TokenRequestError."""
    where = _without_secrets(request.full_url)
    try:
        with _opener.open(request, timeout=timeout) as response:
            body = response.read(_MAX_BODY)
    except urllib.error.HTTPError as error:
        with error:
            code = _error_code(error.read(_MAX_BODY))
        detail = f" ({code})" if code else ""
        raise TokenRequestError(
            f"{where} answered HTTP {error.code}{detail}", status=error.code, error=code
        ) from None
    except (OSError, http.client.HTTPException, ValueError) as error:
        # Refused, reset, timed out, not HTTP, or a URL http.client cannot send (ValueError);
        # URLError wraps what happens while sending.
        reason = error.reason if isinstance(error, urllib.error.URLError) else error
        text = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
        raise TokenRequestError(f"no answer from {where}: {text}") from None
    document = _parse_json(body)
    if not isinstance(document, dict):
        raise TokenRequestError(f"{where} did not answer a JSON object")
    return document


def _parse_json(body: bytes) -> object:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def _error_code(body: bytes) -> str | None:
    """The ``error`` code of an OAuth error response, if it has a well-formed one."""
    document = _parse_json(body)
    code = document.get("error") if isinstance(document, dict) else None
    return code if isinstance(code, str) and _ERROR_CODE.fullmatch(code) else None


def _without_secrets(url: str) -> str:
    """``url`` for a message: no user:password@, no query (either may hold a credential)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Answer a redirect with its HTTPError: credentials must not follow it elsewhere."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirects)
