"""The client_credentials grant behind ``token-refresh token`` and ``token-refresh agent``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from token_refresh._jwt import decode_jwt_expiry
from token_refresh.oauth import ClientCredentials, OAuthError, discover
from token_refresh.shared import Grant, InvalidGrant, Store

#: Exit status of ``token-refresh token``: the server refused (an OAuth error answer).
EXIT_REFUSED = 1
#: Exit status: no usable answer from the token server (or a 5xx, a 429), or the store failed.
EXIT_UNREACHABLE = 3


ClientAuthName = Literal["basic", "post", "none", "auto"]
CLIENT_AUTH: tuple[ClientAuthName, ...] = ("basic", "post", "none", "auto")


@dataclass(frozen=True)
class GrantOptions:
    """Where and as whom a client_credentials grant asks: the issuer or its token endpoint."""

    client_id: str
    issuer: str | None = None
    token_endpoint: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    scope: str | list[str] | None = None
    audience: str | None = None
    client_auth: ClientAuthName = "basic"


class Fetcher:
    """A SharedToken's ``fetch``: one client_credentials request per call.

    With an issuer, its token endpoint is discovered on the first call only, so
    a token the store already holds costs no request at all. It remembers the
    lifetime the server told for the last token it fetched (an opaque token's).
    """

    def __init__(self, options: GrantOptions) -> None:
        self._options = options
        self._grant: ClientCredentials | None = None
        if options.token_endpoint is not None:  # checked now, before any connection
            self._grant = self._build(options.token_endpoint)
        self.expires: dict[str, float] = {}  # the last fetched token -> its expires_at

    def _build(self, token_endpoint: str) -> ClientCredentials:
        options = self._options
        return ClientCredentials(
            token_endpoint,
            options.client_id,
            options.client_secret,
            scope=options.scope,
            audience=options.audience,
            client_auth=options.client_auth,
        )

    def __call__(self) -> Grant:
        if self._grant is None:
            assert self._options.issuer is not None  # GrantOptions holds one or the other
            self._grant = self._build(discover(self._options.issuer).token_endpoint)
        grant = self._grant()
        if grant.expires_at is not None:
            self.expires = {grant.access_token: grant.expires_at}
        return grant


def expiry(token: str, fetcher: Fetcher, store: Store, key: str) -> float | None:
    """When ``token`` expires (Unix seconds): the earlier of its ``exp`` and ``expires_in``.

    ``expires_in`` is known for a token this process fetched, or from the
    store's record when another process fetched it; None when neither tells.
    """
    told = fetcher.expires.get(token)
    if told is None:
        record = store.read(key)
        if record is not None and record.grant is not None and record.grant.access_token == token:
            told = record.grant.expires_at
    times = [float(when) for when in (decode_jwt_expiry(token), told) if when]
    return min(times) if times else None


def exit_status(error: BaseException) -> int:
    """1 when the token server refused the request; 3 when it or the store could not serve."""
    if isinstance(error, InvalidGrant):
        return EXIT_REFUSED
    if isinstance(error, OAuthError) and error.status is not None and error.status < 500:
        return EXIT_REFUSED
    return EXIT_UNREACHABLE  # no answer, a 5xx, RateLimited, StoreUnavailable, FetchTimeout


def read_secret(path: str | Path) -> str:
    """A client secret from a file, surrounding whitespace stripped (ValueError if empty)."""
    secret = Path(path).read_text(encoding="utf-8").strip()
    if not secret:
        raise ValueError("the file is empty")
    return secret


def whole_seconds(when: float) -> int:
    """Unix seconds rounded down: a reader never believes a token lives longer than it does."""
    return math.floor(when)
