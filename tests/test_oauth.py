"""token_refresh.oauth: token requests against a strict token server and oauth2-mock-server.

The strict server (tests/strict_oauth.py, stdlib http.server on 127.0.0.1)
decodes Basic credentials as RFC 6749, 2.3.1 says, has client_secret_post-only
clients, token exchange, JWT bearer and rotating refresh tokens that refuse a
second use. oauth2-mock-server (tests/e2e) is the real third-party server for
what it supports.
"""

from __future__ import annotations

import base64
import email.utils
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import pytest

import token_refresh
from token_refresh import oauth
from token_refresh.oauth import (
    ClientCredentials,
    JwtBearer,
    OAuthError,
    RefreshTokenGrant,
    ServerMetadata,
    TokenExchange,
    discover,
)
from token_refresh.shared import FileStore, Grant, InvalidGrant, RateLimited, SharedToken

from conftest import MockOAuthServer, ReraisingThread
from strict_oauth import JWT_BEARER, TOKEN_EXCHANGE, Answer, Client, StrictTokenServer, answer

#: A client secret with every character that URL and Basic encodings treat specially.
SECRET = "s3cr+t/=:%x ?#[]@!$&'()*,;~"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"


@pytest.fixture
def server() -> Iterator[StrictTokenServer]:
    """The strict token server, with clients of each authentication method."""
    strict = StrictTokenServer(
        clients={
            "basic-client": Client(SECRET, "basic"),
            "post-client": Client(SECRET, "post"),
            "public-client": Client(None, "none"),
            "jwt-client": Client(None, "jwt"),
            "client:with/odd+id": Client(SECRET, "basic"),
        }
    )
    with strict:
        yield strict


def form_of(server: StrictTokenServer, index: int = -1) -> dict[str, list[str]]:
    return server.seen[index].form


def http_date(unix_seconds: float) -> str:
    return email.utils.formatdate(unix_seconds, usegmt=True)


def secret_free(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text


# -- client authentication --------------------------------------------------------------------


class TestClientAuthentication:
    def test_basic_form_encodes_before_base64(self, server: StrictTokenServer) -> None:
        """Basic sends id and secret form-encoded, then Base64 (RFC 6749, 2.3.1): accepted."""
        fetch = ClientCredentials(server.token_url, "client:with/odd+id", SECRET)

        grant = fetch()

        assert grant.access_token.startswith("at-")
        seen = server.seen[-1]
        assert (seen.outcome, seen.method) == ("ok", "basic")
        encoded = seen.headers["Authorization"].removeprefix("Basic ")
        pair = base64.b64decode(encoded).decode()
        assert (
            pair == "client%3Awith%2Fodd%2Bid:"
            "s3cr%2Bt%2F%3D%3A%25x+%3F%23%5B%5D%40%21%24%26%27%28%29%2A%2C%3B~"
        )
        assert form_of(server) == {"grant_type": ["client_credentials"]}

    def test_the_strict_server_refuses_raw_basic(self, server: StrictTokenServer) -> None:
        """The server is strict: Basic without the form-encoding (most libraries') fails."""
        raw = base64.b64encode(f"basic-client:{SECRET}".encode()).decode()
        request = urllib.request.Request(
            server.token_url,
            data=b"grant_type=client_credentials",
            headers={"Authorization": f"Basic {raw}"},
        )

        with pytest.raises(urllib.error.HTTPError) as error_info:
            urllib.request.urlopen(request, timeout=5)

        error_info.value.close()
        assert error_info.value.code == 401
        assert server.seen[-1].outcome == "invalid_client"

    def test_post_sends_the_secret_in_the_form(self, server: StrictTokenServer) -> None:
        """client_auth="post": client_id and client_secret in the form, no Authorization."""
        ClientCredentials(server.token_url, "post-client", SECRET, client_auth="post")()

        seen = server.seen[-1]
        assert (seen.outcome, seen.method) == ("ok", "post")
        assert "Authorization" not in seen.headers
        assert seen.form["client_secret"] == [SECRET]

    def test_auto_learns_post_once_and_remembers(self, server: StrictTokenServer) -> None:
        """With "auto": Basic; on a 401 invalid_client, the form once, and from then on."""
        fetch = ClientCredentials(server.token_url, "post-client", SECRET, client_auth="auto")
        assert fetch.client_auth == "auto"

        fetch()
        fetch()

        assert [(seen.method, seen.outcome) for seen in server.seen] == [
            (None, "invalid_client"),
            ("post", "ok"),
            ("post", "ok"),
        ]
        assert fetch.client_auth == "post"
        assert "client_auth='post'" in repr(fetch)

    def test_auto_stays_on_basic_where_basic_works(self, server: StrictTokenServer) -> None:
        """client_auth="auto" against a Basic client: one request per call."""
        fetch = ClientCredentials(server.token_url, "basic-client", SECRET, client_auth="auto")

        fetch()

        assert [(seen.method, seen.outcome) for seen in server.seen] == [("basic", "ok")]
        assert fetch.client_auth == "auto"

    def test_auto_with_a_wrong_secret_learns_nothing(self, server: StrictTokenServer) -> None:
        """A secret wrong both ways is invalid_client, and the next call probes again."""
        fetch = ClientCredentials(server.token_url, "post-client", "wrong", client_auth="auto")

        for _ in range(2):
            with pytest.raises(OAuthError) as error_info:
                fetch()
            assert (error_info.value.status, error_info.value.error) == (401, "invalid_client")

        assert len(server.seen) == 4
        assert fetch.client_auth == "auto"

    def test_auto_does_not_probe_on_other_errors(self, server: StrictTokenServer) -> None:
        """Only a 401 invalid_client makes client_auth="auto" try the form."""
        server.queue(answer(400, {"error": "invalid_scope"}))
        fetch = ClientCredentials(server.token_url, "post-client", SECRET, client_auth="auto")

        with pytest.raises(OAuthError, match="invalid_scope"):
            fetch()

        assert len(server.seen) == 1

    @pytest.mark.parametrize("client_auth", ["none", "basic", "post", "auto"])
    def test_a_public_client_sends_its_id(
        self, server: StrictTokenServer, client_auth: Any
    ) -> None:
        """Without a secret, the client_id goes in the form (a public client), whatever the mode."""
        fetch = ClientCredentials(server.token_url, "public-client", client_auth=client_auth)

        fetch()

        seen = server.seen[-1]
        assert (seen.method, seen.outcome) == ("none", "ok")
        assert "Authorization" not in seen.headers
        assert fetch.client_auth == "none"
        assert len(server.seen) == 1

    def test_callable_sends_a_client_assertion(self, server: StrictTokenServer) -> None:
        """A callable client_auth is called with the endpoint; its assertion authenticates."""
        calls: list[str] = []

        def sign(endpoint: str) -> str:
            calls.append(endpoint)
            assertion = f"signed-{len(calls)}"
            server.assertions.add(assertion)
            return assertion

        fetch = ClientCredentials(server.token_url, "jwt-client", client_auth=sign)
        fetch()
        fetch()

        assert calls == [server.token_url] * 2
        form = form_of(server)
        assert form["client_assertion"] == ["signed-2"]
        assert form["client_assertion_type"] == [
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        ]
        assert form["client_id"] == ["jwt-client"]
        assert fetch.client_auth == "private_key_jwt"
        assert [seen.outcome for seen in server.seen] == ["ok", "ok"]

    def test_user_agent_names_the_library(self, server: StrictTokenServer) -> None:
        """Every request says who sends it."""
        ClientCredentials(server.token_url, "public-client")()

        agent = server.seen[-1].headers["User-Agent"]
        assert agent.startswith(f"token_refresh/{token_refresh.__version__}")


class TestConfiguration:
    @pytest.mark.parametrize(
        "url",
        ["http://auth.example.com/token", "http://10.0.0.1/t", "ftp://127.0.0.1/t", "x", "https://",
         "http://127.0.0.1:99999/t", "http://[::1"],
    )  # fmt: skip
    def test_plain_http_beyond_loopback_is_refused_when_built(self, url: str) -> None:
        """Plain http:// to another host (or no URL at all) raises ValueError before any request."""
        for build in (
            lambda: ClientCredentials(url, "c", "s"),
            lambda: RefreshTokenGrant(url, "c", refresh_token="r"),
            lambda: TokenExchange(url, subject_token="t", subject_token_type=JWT_TYPE),
            lambda: JwtBearer(url, assertion="a"),
        ):
            with pytest.raises(ValueError, match="must be an https:// URL"):
                build()

    @pytest.mark.parametrize(
        "url",
        ["https://auth.example.com/t?realm=1", "http://localhost:8080/t", "http://127.0.0.2/t",
         "http://[::1]/t"],
    )  # fmt: skip
    def test_https_and_loopback_are_accepted(self, url: str) -> None:
        """https anywhere, http to loopback; a token endpoint may have a query (RFC 6749, 3.2)."""
        assert ClientCredentials(url, "c").token_endpoint == url

    def test_userinfo_is_refused_and_not_quoted(self) -> None:
        """A password in the URL is a ValueError that does not repeat it."""
        with pytest.raises(ValueError, match="user name or password") as error_info:
            ClientCredentials("https://me:hunter2@auth.example.com/t", "c")

        assert "hunter2" not in str(error_info.value)

    def test_url_must_be_a_str(self) -> None:
        """A token endpoint that is not a str is a TypeError."""
        with pytest.raises(TypeError, match="token_endpoint must be a str"):
            ClientCredentials(b"https://a/t", "c")  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        ("options", "error", "message"),
        [
            ({"client_auth": "jwt"}, ValueError, "client_auth must be"),
            ({"client_auth": "none", "client_secret": "s"}, ValueError, "sends no client_secret"),
            ({"client_auth": lambda url: "a", "client_secret": "s"}, ValueError, "give no client_"),
            ({"client_secret": ""}, TypeError, "client_secret must be a non-empty str"),
            ({"client_id": ""}, TypeError, "client_id must be a non-empty str"),
            ({"timeout": 0}, ValueError, "timeout must be a positive"),
            ({"timeout": True}, TypeError, "timeout must be a number of seconds"),
            ({"ssl_context": object()}, TypeError, "ssl_context must be"),
        ],
    )
    def test_mistakes_are_refused_when_built(
        self, options: dict[str, Any], error: type[Exception], message: str
    ) -> None:
        """A configuration that cannot work raises when the object is built."""
        arguments: dict[str, Any] = {"client_id": "c", **options}
        with pytest.raises(error, match=message):
            ClientCredentials("https://auth.example.com/t", **arguments)

    def test_refresh_token_grant_refuses_auto(self) -> None:
        """client_auth="auto" could spend a rotating refresh token on its probe: refused."""
        auto: Any = "auto"  # not even the type allows it
        with pytest.raises(ValueError, match="a probe could spend a rotating refresh token"):
            RefreshTokenGrant("https://a.example/t", "c", "s", refresh_token="r", client_auth=auto)

    def test_refresh_token_is_required(self) -> None:
        """RefreshTokenGrant needs a first refresh token."""
        with pytest.raises(TypeError, match="refresh_token must be a non-empty str"):
            RefreshTokenGrant("https://a.example/t", "c", refresh_token="")

    def test_a_secret_needs_a_client_id(self) -> None:
        """A client_secret without its client_id is a ValueError."""
        with pytest.raises(ValueError, match="a client_secret needs its client_id"):
            JwtBearer("https://a.example/t", assertion="a", client_secret="s")

    @pytest.mark.parametrize("token", [b"bytes", 7, ""])
    def test_subject_token_kinds(self, token: object) -> None:
        """subject_token is a non-empty str, an os.PathLike or a callable."""
        with pytest.raises(TypeError, match="subject_token must be"):
            TokenExchange("https://a.example/t", subject_token=token, subject_token_type=JWT_TYPE)  # type: ignore[arg-type]

    def test_actor_token_needs_its_type(self) -> None:
        """An actor_token without actor_token_type is refused (RFC 8693, 2.1)."""
        with pytest.raises(ValueError, match="actor_token and actor_token_type go together"):
            TokenExchange(
                "https://a.example/t",
                subject_token="s",
                subject_token_type=JWT_TYPE,
                actor_token="a",
            )

    def test_reprs_hold_no_secret(self, tmp_path: Path) -> None:
        """reprs show the endpoint (without query or password), the client id and the auth mode."""
        objects: list[object] = [
            ClientCredentials("https://a.example/t?k=hidden", "c", SECRET),
            RefreshTokenGrant("https://a.example/t", "c", SECRET, refresh_token="rt-hidden"),
            TokenExchange(
                "https://a.example/t", subject_token="st-hidden", subject_token_type=JWT_TYPE
            ),
            JwtBearer(
                "https://a.example/t", assertion="as-hidden", client_id="c", client_auth="none"
            ),
        ]
        text = " ".join(map(repr, objects))

        assert (
            "ClientCredentials(token_endpoint='https://a.example/t', client_id='c', "
            "client_auth='basic')" in text
        )
        assert (
            "JwtBearer(token_endpoint='https://a.example/t', client_id='c', client_auth='none')"
            in text
        )
        secret_free(text, SECRET, "hidden")


# -- the grants -------------------------------------------------------------------------------


class TestClientCredentials:
    def test_scope_audience_and_resources(self, server: StrictTokenServer) -> None:
        """A scope list is joined with spaces; each resource is its own parameter (RFC 8707)."""
        fetch = ClientCredentials(
            server.token_url,
            "basic-client",
            SECRET,
            scope=["read", "write"],
            audience="https://api.example.com",
            resource=["https://a.example", "https://b.example"],
        )

        fetch()

        assert form_of(server) == {
            "grant_type": ["client_credentials"],
            "scope": ["read write"],
            "audience": ["https://api.example.com"],
            "resource": ["https://a.example", "https://b.example"],
        }

    def test_lifetime_counts_from_when_the_request_was_sent(
        self, server: StrictTokenServer
    ) -> None:
        """expires_at is the time the request was sent plus expires_in."""
        server.lifetime = 600
        before = time.time()
        grant = ClientCredentials(server.token_url, "basic-client", SECRET, scope="x")()
        after = time.time()

        assert grant.expires_at is not None
        assert before + 600 <= grant.expires_at <= after + 600
        assert grant.refresh_token is None

    @pytest.mark.parametrize(
        ("expires_in", "has_expiry"),
        [(3600, True), ("120", True), ("soon", False), ("1e999", False), (10**400, False),
         (True, False), (-5, False), (None, False), ([60], False)],
    )  # fmt: skip
    def test_expires_in(
        self, server: StrictTokenServer, expires_in: object, has_expiry: bool
    ) -> None:
        """expires_in is a positive number of seconds (quoted is fine); anything else: None."""
        server.queue(answer(200, {"access_token": "t", "expires_in": expires_in}))

        grant = ClientCredentials(server.token_url, "public-client")()

        assert (grant.expires_at is not None) == has_expiry


class TestRefreshTokenGrant:
    def test_uses_the_previous_grants_refresh_token(self, server: StrictTokenServer) -> None:
        """fetch(None) spends refresh_token=; fetch(previous) spends previous.refresh_token."""
        first = server.issue_refresh_token()
        fetch = RefreshTokenGrant(
            server.token_url, "post-client", SECRET, refresh_token=first, client_auth="post"
        )

        one = fetch(None)
        two = fetch(one)

        assert server.presented == [first, one.refresh_token]
        assert two.refresh_token not in (first, one.refresh_token)
        assert [seen.outcome for seen in server.seen] == ["ok", "ok"]

    def test_a_spent_refresh_token_is_invalid_grant(self, server: StrictTokenServer) -> None:
        """Spending a rotated refresh token again raises InvalidGrant, with the server's reason."""
        fetch = RefreshTokenGrant(
            server.token_url, "basic-client", SECRET, refresh_token=server.issue_refresh_token()
        )
        fetch()

        with pytest.raises(
            InvalidGrant, match=r"answered HTTP 400 \(invalid_grant: the refresh token is spent"
        ) as error_info:
            fetch()

        secret_free(str(error_info.value), SECRET, *server.presented)

    def test_keeps_the_refresh_token_when_none_comes_back(self, server: StrictTokenServer) -> None:
        """A server that does not rotate sends no refresh_token: the one spent is kept."""
        server.queue(answer(200, {"access_token": "at", "refresh_token": ""}))
        fetch = RefreshTokenGrant(server.token_url, "public-client", refresh_token="rt-keep")

        grant = fetch(Grant("old", refresh_token=None))

        # The response's Date (whole seconds) says how far the server's clock is from ours.
        assert grant.clock_skew is not None
        assert abs(grant.clock_skew) < 2
        assert replace(grant, clock_skew=None) == Grant("at", refresh_token="rt-keep")

    def test_no_access_token(self, server: StrictTokenServer) -> None:
        """A refresh answer without an access_token is an OAuthError."""
        server.queue(answer(200, {"refresh_token": "x"}))
        fetch = RefreshTokenGrant(server.token_url, "public-client", refresh_token="r")

        with pytest.raises(OAuthError, match="answered no access_token"):
            fetch()

    def test_shared_token_rotates_without_spending_twice(
        self, server: StrictTokenServer, tmp_path: Path
    ) -> None:
        """Threads sharing a rotating grant through FileStore never present a token twice."""
        server.lifetime = 1  # each call finds the grant within min_ttl of expiry: it rotates
        fetch = RefreshTokenGrant(
            server.token_url, "basic-client", SECRET, refresh_token=server.issue_refresh_token()
        )
        tokens = [
            SharedToken(fetch, FileStore(tmp_path), "k", max_age=None, rotating=True)
            for _ in range(4)
        ]
        got: list[str | None] = []

        def work(token: SharedToken) -> None:
            for _ in range(5):
                got.append(token())

        threads = [ReraisingThread(lambda t=t: work(t)) for t in tokens]  # type: ignore[misc]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert len(got) == 20
        assert None not in got
        assert len(server.presented) == len(set(server.presented)) >= 5
        assert {seen.outcome for seen in server.seen} == {"ok"}


class TestTokenExchange:
    def test_a_str_subject_token(self, server: StrictTokenServer) -> None:
        """The form holds the subject token, its type and the optional RFC 8693 parameters."""
        server.subject_tokens.add("st-1")
        fetch = TokenExchange(
            server.token_url,
            "basic-client",
            SECRET,
            subject_token="st-1",
            subject_token_type=JWT_TYPE,
            requested_token_type="urn:ietf:params:oauth:token-type:access_token",
            audience="api",
            scope="read",
        )

        grant = fetch()

        assert grant.access_token.startswith("at-")
        assert form_of(server) == {
            "grant_type": [TOKEN_EXCHANGE],
            "subject_token": ["st-1"],
            "subject_token_type": [JWT_TYPE],
            "requested_token_type": ["urn:ietf:params:oauth:token-type:access_token"],
            "audience": ["api"],
            "scope": ["read"],
        }

    def test_a_subject_token_file_is_read_before_each_request(
        self, server: StrictTokenServer, tmp_path: Path
    ) -> None:
        """A projected service-account token rotated on disk: each request reads the new one."""
        path = tmp_path / "token"
        path.write_text("st-old\n")
        server.subject_tokens.update({"st-old", "st-new"})
        fetch = TokenExchange(
            server.token_url, "public-client", subject_token=path, subject_token_type=JWT_TYPE
        )

        fetch()
        path.write_text("  st-new\n")
        fetch()

        assert [seen.form["subject_token"] for seen in server.seen] == [["st-old"], ["st-new"]]

    def test_an_empty_file_is_an_error(self, server: StrictTokenServer, tmp_path: Path) -> None:
        """An empty subject token file is a ValueError, and nothing is sent."""
        path = tmp_path / "token"
        path.write_text("\n")
        fetch = TokenExchange(server.token_url, subject_token=path, subject_token_type=JWT_TYPE)

        with pytest.raises(ValueError, match="is empty"):
            fetch()
        assert server.seen == []

    def test_a_callable_subject_and_actor(self, server: StrictTokenServer) -> None:
        """Callables are called before each request; an actor token goes with its type."""
        server.subject_tokens.add("st-called")
        fetch = TokenExchange(
            server.token_url,
            "public-client",
            subject_token=lambda: "st-called",
            subject_token_type=JWT_TYPE,
            actor_token=lambda: "actor-1",
            actor_token_type=JWT_TYPE,
        )

        fetch()

        form = form_of(server)
        assert (form["subject_token"], form["actor_token"]) == (["st-called"], ["actor-1"])
        assert form["actor_token_type"] == [JWT_TYPE]

    def test_a_callable_returning_nothing(self, server: StrictTokenServer) -> None:
        """A subject_token callable that returns no token is a TypeError."""
        fetch = TokenExchange(
            server.token_url, subject_token=lambda: "", subject_token_type=JWT_TYPE
        )

        with pytest.raises(TypeError, match=r"subject_token\(\) must return a non-empty str"):
            fetch()

    def test_a_refused_subject_token(self, server: StrictTokenServer) -> None:
        """A subject token the server refuses: InvalidGrant, whose message does not hold it."""
        fetch = TokenExchange(
            server.token_url,
            "public-client",
            subject_token="st-unknown",
            subject_token_type=JWT_TYPE,
        )

        with pytest.raises(InvalidGrant) as error_info:
            fetch()

        assert "st-unknown" not in str(error_info.value)


class TestJwtBearer:
    def test_assertion_from_a_callable(self, server: StrictTokenServer) -> None:
        """The assertion is made per request, for the endpoint; no client: no client_id."""
        made: list[str] = []

        def assertion(endpoint: str) -> str:
            made.append(endpoint)
            server.assertions.add(f"jwt-{len(made)}")
            return f"jwt-{len(made)}"

        fetch = JwtBearer(server.token_url, assertion=assertion)
        fetch()
        fetch()

        assert made == [server.token_url] * 2
        assert form_of(server) == {"grant_type": [JWT_BEARER], "assertion": ["jwt-2"]}

    def test_assertion_from_a_file_with_a_client(
        self, server: StrictTokenServer, tmp_path: Path
    ) -> None:
        """An assertion file is read per request; a client authenticates too."""
        (tmp_path / "a").write_text("jwt-file\n")
        server.assertions.add("jwt-file")
        fetch = JwtBearer(
            server.token_url,
            assertion=tmp_path / "a",
            client_id="basic-client",
            client_secret=SECRET,
        )

        fetch()

        assert server.seen[-1].method == "basic"
        assert form_of(server)["assertion"] == ["jwt-file"]

    def test_a_refused_assertion(self, server: StrictTokenServer) -> None:
        """An assertion the server refuses is InvalidGrant, without the assertion."""
        with pytest.raises(InvalidGrant) as error_info:
            JwtBearer(server.token_url, assertion="eyJhbGciOi.refused")()

        assert "eyJhbGciOi" not in str(error_info.value)


# -- what goes wrong --------------------------------------------------------------------------


class TestErrors:
    def fetch(self, server: StrictTokenServer, *answers: Answer) -> Grant:
        server.queue(*answers)
        return ClientCredentials(server.token_url, "basic-client", SECRET)()

    def test_retry_after_as_an_http_date_against_the_servers_date(
        self, server: StrictTokenServer
    ) -> None:
        """A 429 whose Retry-After is a date: the wait is counted from the response's Date."""
        served = time.time() - 7200  # the server's clock is two hours behind this one
        headers = {"Retry-After": http_date(served + 120), "Date": http_date(served)}

        with pytest.raises(RateLimited) as error_info:
            self.fetch(server, answer(429, {"error": "slow_down"}, **headers))

        assert error_info.value.retry_after == 120

    def test_retry_after_as_a_date_without_date_header(self, server: StrictTokenServer) -> None:
        """Without a Date header, the date is read against this host's clock."""
        server.queue(answer(503, b"", Retry_After=http_date(time.time() + 60)))

        with pytest.raises(RateLimited) as error_info:
            ClientCredentials(server.token_url, "basic-client", SECRET)()

        assert 55 <= error_info.value.retry_after <= 60

    @pytest.mark.parametrize(
        ("status", "retry_after", "wait"),
        [(429, "7", 7), (503, "0", 0), (429, "99999999", 3600),
         (429, "Sun, 06 Nov 1994 08:49:37 GMT", 0)],
    )  # fmt: skip
    def test_retry_after_seconds(
        self, server: StrictTokenServer, status: int, retry_after: str, wait: float
    ) -> None:
        """Delta-seconds as given, at most an hour; a date in the past: no wait."""
        with pytest.raises(RateLimited) as error_info:
            self.fetch(server, answer(status, {}, Retry_After=retry_after))

        assert error_info.value.retry_after == wait

    @pytest.mark.parametrize("retry_after", [None, "soon", "-5"])
    def test_429_without_a_usable_retry_after(
        self, server: StrictTokenServer, retry_after: str | None
    ) -> None:
        """No usable Retry-After: an OAuthError with the status."""
        headers = {} if retry_after is None else {"Retry-After": retry_after}

        with pytest.raises(OAuthError) as error_info:
            self.fetch(server, answer(429, {"error": "slow_down"}, **headers))

        assert (error_info.value.status, error_info.value.error) == (429, "slow_down")

    def test_error_response(self, server: StrictTokenServer) -> None:
        """An OAuth error body: .error, .description and .status, all in the message."""
        with pytest.raises(OAuthError) as error_info:
            self.fetch(
                server,
                answer(400, {"error": "invalid_scope", "error_description": "no such scope"}),
            )

        error = error_info.value
        assert (error.error, error.description, error.status) == (
            "invalid_scope",
            "no such scope",
            400,
        )
        assert str(error) == f"{server.token_url} answered HTTP 400 (invalid_scope: no such scope)"
        assert isinstance(error, OSError)

    def test_an_error_with_status_200(self, server: StrictTokenServer) -> None:
        """Some servers send an error with a 200: it is still an error."""
        with pytest.raises(OAuthError, match=r"answered HTTP 200 \(access_denied\)"):
            self.fetch(server, answer(200, {"error": "access_denied"}))

    @pytest.mark.parametrize(
        ("body", "headers", "message"),
        [
            (b"<html>Sign in</html>", {"Content-Type": "text/html"},
             "answered an HTML page, not a JSON object"),
            (b"not json", {}, "answered something, not a JSON object"),
            (b"[1]", {}, "answered something, not a JSON object"),
            (b"[" * 100_000, {}, "answered something, not a JSON object"),
            (b'{"token_type": "Bearer"}', {}, "answered no access_token"),
            (b'{"access_token": 7}', {}, "answered no access_token"),
        ],
    )  # fmt: skip
    def test_unusable_success(
        self, server: StrictTokenServer, body: bytes, headers: dict[str, str], message: str
    ) -> None:
        """A 200 that holds no usable token is an OAuthError saying what came instead."""
        with pytest.raises(OAuthError, match=re.escape(message)):
            self.fetch(server, answer(200, body, **headers))

    @pytest.mark.parametrize(
        ("canned", "message", "code"),
        [
            (answer(500, b"<html>oops</html>", Content_Type="text/html"),
             "answered HTTP 500: an HTML page, not an OAuth answer", None),
            (answer(401, {"error": 'bad"code'}), "answered HTTP 401", None),
            (answer(400, {"error": "x", "error_description": "\u00e9\n"}),
             "answered HTTP 400 (x)", "x"),
            (answer(400, {"error": "x", "error_description": "d" * 400}), "d" * 300 + "...)", "x"),
            (answer(502, [1]), "answered HTTP 502", None),
        ],
    )  # fmt: skip
    def test_error_bodies(
        self, server: StrictTokenServer, canned: Answer, message: str, code: str | None
    ) -> None:
        """Codes and descriptions outside RFC 6749's characters are dropped, long ones cut."""
        with pytest.raises(OAuthError) as error_info:
            self.fetch(server, canned)

        assert message in str(error_info.value)
        assert error_info.value.error == code

    def test_redirects_are_not_followed(self, server: StrictTokenServer) -> None:
        """A redirect is an OAuthError: the credentials never follow it elsewhere."""
        with pytest.raises(
            OAuthError, match=r"answered a redirect \(HTTP 307\); redirects are not followed"
        ):
            self.fetch(server, answer(307, b"", Location=f"{server.url}/elsewhere"))

        assert [seen.path for seen in server.seen] == ["/token"]

    def test_an_answer_over_the_size_limit(self, server: StrictTokenServer) -> None:
        """Content-Length over the limit, or a body that runs past it, is an OAuthError."""
        big = b'{"access_token": "' + b"a" * oauth.MAX_RESPONSE + b'"}'

        def unsized(handler: BaseHTTPRequestHandler) -> None:
            handler.send_response(200)
            handler.send_header("Connection", "close")
            handler.end_headers()
            handler.wfile.write(big)
            handler.close_connection = True

        for canned in (answer(200, big), unsized):
            with pytest.raises(OAuthError, match=f"answered more than {oauth.MAX_RESPONSE} bytes"):
                self.fetch(server, canned)

    def test_nobody_listening(self) -> None:
        """A refused connection: an OAuthError with no status."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]

        with pytest.raises(
            OAuthError, match=f"no answer from http://127.0.0.1:{port}/t: Connection refused"
        ) as error_info:
            ClientCredentials(f"http://127.0.0.1:{port}/t", "c", SECRET)()

        assert error_info.value.status is None

    def test_a_hang_up(self, server: StrictTokenServer) -> None:
        """A server that closes without answering: an OAuthError."""

        def hang_up(handler: BaseHTTPRequestHandler) -> None:
            handler.close_connection = True

        with pytest.raises(OAuthError, match=r"no answer from .*: Remote end closed connection"):
            self.fetch(server, hang_up)

    def test_a_url_http_client_cannot_send(self) -> None:
        """A URL http.client refuses (not ASCII) is an OAuthError too."""
        with pytest.raises(OAuthError, match=re.escape("no answer from http://127.0.0.1:9/t")):
            ClientCredentials("http://127.0.0.1:9/t\u00f6ken", "c")()

    def test_echoed_secrets_are_redacted(self, server: StrictTokenServer) -> None:
        """A server that echoes what it got: the secret, token and assertion never show."""
        grants: list[tuple[str, Callable[[], object]]] = [
            (
                "rt-secret-1",
                RefreshTokenGrant(server.token_url, "c", SECRET, refresh_token="rt-secret-1"),
            ),
            (
                "jwt-assert-1",
                JwtBearer(
                    server.token_url, assertion="jwt-assert-1", client_id="c", client_secret=SECRET
                ),
            ),
            (
                "st-secret-1",
                TokenExchange(
                    server.token_url,
                    "c",
                    SECRET,
                    subject_token="st-secret-1",
                    subject_token_type=JWT_TYPE,
                ),
            ),
        ]
        for token, grant in grants:
            echo = f"got {SECRET}, {quote_plus(SECRET)} and {token}"
            server.queue(answer(400, {"error": "invalid_request", "error_description": echo}))
            with pytest.raises(OAuthError) as error_info:
                grant()
            error = error_info.value
            shown = f"{error} {error.args} {error.description} {error!r}"
            secret_free(shown, SECRET, quote_plus(SECRET), token)
            assert "[redacted]" in shown
            assert error.__cause__ is None


@pytest.mark.realclock
class TestDeadline:
    def test_one_deadline_for_the_whole_exchange(self) -> None:
        """A server that sends a byte every 50 ms is cut off at the deadline, not per read."""
        listener = socket.create_server(("127.0.0.1", 0))
        stop = threading.Event()

        def drip() -> None:
            connection, _ = listener.accept()
            with connection:
                connection.recv(65536)
                for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 1000:
                    if stop.wait(0.05):
                        return
                    connection.sendall(bytes([byte]))

        thread = ReraisingThread(drip, name="drip")
        thread.start()
        port = listener.getsockname()[1]
        began = time.monotonic()
        try:
            with pytest.raises(
                OAuthError, match=r"no answer from http://127.0.0.1:\d+/t within 0.5s"
            ):
                ClientCredentials(f"http://127.0.0.1:{port}/t", "c", SECRET, timeout=0.5)()
        finally:
            stop.set()
            thread.join()
            listener.close()
        assert time.monotonic() - began < 2

    def test_nothing_is_sent_or_read_past_the_deadline(self) -> None:
        """Once the deadline has passed, a send or a read fails at once, even with data waiting."""
        left, right = socket.socketpair()
        with left, right:
            right.sendall(b"HTTP/1.1 200 OK\r\n")
            late = oauth._DeadlineSocket(left, time.monotonic() - 0.001)
            with pytest.raises(TimeoutError):
                late.recv_into(memoryview(bytearray(10)))
            with pytest.raises(TimeoutError):
                late.sendall(b"x")


# -- TLS and mTLS (RFC 8705) ------------------------------------------------------------------


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(
        ["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True, timeout=30
    )


@pytest.fixture
def certificates(tmp_path: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made by openssl."""
    if shutil.which("openssl") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("openssl is not on PATH (CI=true: the TLS tests must run)", pytrace=False)
        pytest.skip("openssl is not on PATH: the TLS tests make their certificates with it")
    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=test-ca", cwd=tmp_path)  # fmt: skip
    (tmp_path / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=tmp_path)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile", "san.ext",
                 cwd=tmp_path)  # fmt: skip
    return tmp_path


@pytest.fixture
def tls_server(certificates: Path) -> Iterator[StrictTokenServer]:
    """The strict server behind TLS that requires a client certificate from the test CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=certificates / "ca.pem")
    context.load_cert_chain(certificates / "server.pem", certificates / "server.key")
    context.verify_mode = ssl.CERT_REQUIRED
    strict = StrictTokenServer(clients={"mtls": Client(None, "none")}, ssl_context=context)
    with strict:
        yield strict


class TestTls:
    def test_mutual_tls_with_an_ssl_context(
        self, tls_server: StrictTokenServer, certificates: Path
    ) -> None:
        """ssl_context carries the client certificate (RFC 8705) and the CA to trust."""
        context = ssl.create_default_context(cafile=certificates / "ca.pem")
        context.load_cert_chain(certificates / "client.pem", certificates / "client.key")

        grant = ClientCredentials(tls_server.token_url, "mtls", ssl_context=context)()

        assert grant.access_token.startswith("at-")
        assert tls_server.token_url.startswith("https://127.0.0.1:")

    def test_an_untrusted_server_is_refused(self, tls_server: StrictTokenServer) -> None:
        """The system's CAs do not know the test CA: the certificate check fails, clearly."""
        with pytest.raises(OAuthError, match=r"no answer from https://.*certificate verify failed"):
            ClientCredentials(tls_server.token_url, "mtls")()

    def test_no_client_certificate(self, tls_server: StrictTokenServer, certificates: Path) -> None:
        """A server that requires a client certificate refuses a client without one."""
        context = ssl.create_default_context(cafile=certificates / "ca.pem")

        with pytest.raises(OAuthError, match="no answer from https://"):
            ClientCredentials(tls_server.token_url, "mtls", ssl_context=context)()


# -- discovery --------------------------------------------------------------------------------


class TestDiscover:
    def test_rfc_8414_first(self, server: StrictTokenServer) -> None:
        """RFC 8414 metadata is asked for first; its issuer is checked."""
        metadata = discover(server.url)

        assert metadata == ServerMetadata(server.url, server.token_url, metadata.document)
        assert metadata.document["token_endpoint"] == server.token_url
        assert [seen.path for seen in server.seen] == ["/.well-known/oauth-authorization-server"]
        assert "document" not in repr(metadata)

    def test_openid_connect_after_a_404(self, server: StrictTokenServer) -> None:
        """A 404 at RFC 8414's URL moves on to OpenID Connect's, after the issuer's path."""
        issuer = f"{server.url}/realm"
        server.queue(
            answer(404, b"Not Found", Content_Type="text/plain"),
            answer(200, {"issuer": issuer, "token_endpoint": "https://auth.example.com/t"}),
        )

        metadata = discover(issuer)

        assert metadata.token_endpoint == "https://auth.example.com/t"
        assert [seen.path for seen in server.seen] == [
            "/.well-known/oauth-authorization-server/realm",
            "/realm/.well-known/openid-configuration",
        ]

    def test_no_metadata_at_all(self, server: StrictTokenServer) -> None:
        """An issuer with neither well-known document: an OAuthError naming it."""
        server.queue(answer(404, {}), answer(404, {}))

        with pytest.raises(OAuthError, match="publishes no OAuth metadata"):
            discover(server.url)

    @pytest.mark.parametrize(
        ("metadata", "message"),
        [
            ({"issuer": "{url}"}, "oauth-authorization-server names no token_endpoint"),
            ({"issuer": "{url}", "token_endpoint": "http://auth.example.com/t"},
             "its token_endpoint must be an https"),
            ({"token_endpoint": "{url}/token"}, "oauth-authorization-server names no issuer"),
            ({"issuer": ["x"]}, "names no issuer"),
            ({"issuer": "http://localhost"}, "names the issuer 'http://localhost', not '{url}': "
             "metadata for another issuer is not used (RFC 8414, 3.3)"),
            ({"issuer": "https://" + "a" * 300}, "names the issuer another issuer, not"),
        ],
    )  # fmt: skip
    def test_unusable_metadata(
        self, server: StrictTokenServer, metadata: dict[str, Any], message: str
    ) -> None:
        """Metadata without the token endpoint, an insecure one, or another issuer: OAuthError."""
        filled = {key: value.replace("{url}", server.url) if isinstance(value, str) else value
                  for key, value in metadata.items()}  # fmt: skip
        server.queue(answer(200, filled))

        with pytest.raises(OAuthError, match=re.escape(message.replace("{url}", server.url))):
            discover(server.url)

    def test_metadata_error_status(self, server: StrictTokenServer) -> None:
        """Metadata that answers an error is an OAuthError with the status."""
        server.queue(answer(500, {"error": "server_error"}))

        with pytest.raises(OAuthError, match=r"oauth-authorization-server answered HTTP 500"):
            discover(server.url)

    @pytest.mark.parametrize(
        ("issuer", "message"),
        [
            ("https://me:hunter2@auth.example.com", "must not hold a user name or password"),
            ("https://auth.example.com/?client_secret=hunter2", "must have no query or fragment"),
            ("https://auth.example.com/#hunter2", "must have no query or fragment"),
            ("http://auth.example.com", "must be an https:// URL"),
        ],
    )
    def test_issuers_refused_before_any_request(self, issuer: str, message: str) -> None:
        """A password, a query or plain http beyond loopback: ValueError, the URL not shown."""
        with pytest.raises(ValueError, match=message) as error_info:
            discover(issuer)

        assert "hunter2" not in str(error_info.value)


# -- against oauth2-mock-server ---------------------------------------------------------------


class TestAgainstOAuth2MockServer:
    def test_discovery_and_client_credentials(self, oauth_server: MockOAuthServer) -> None:
        """OpenID Connect metadata (after RFC 8414's 404) names the token endpoint; a JWT comes."""
        metadata = discover(oauth_server.issuer)
        before = time.time()

        grant = ClientCredentials(metadata.token_endpoint, "e2e", SECRET, scope="read")()

        assert metadata.token_endpoint == oauth_server.token_url
        assert grant.access_token.startswith("eyJ")
        assert grant.expires_at is not None
        assert grant.expires_at >= before + 3

    def test_refresh_tokens_rotate(self, oauth_server: MockOAuthServer) -> None:
        """Each refresh returns a new refresh token, used by the next."""
        fetch = RefreshTokenGrant(
            oauth_server.token_url, "e2e", SECRET, refresh_token="first", client_auth="post"
        )

        one = fetch(None)
        two = fetch(one)

        assert None not in (one.refresh_token, two.refresh_token)
        assert len({"first", one.refresh_token, two.refresh_token}) == 3

    def test_server_errors(self, oauth_server: MockOAuthServer) -> None:
        """The server's invalid_grant is InvalidGrant; its 500 is an OAuthError with the code."""
        fetch = RefreshTokenGrant(oauth_server.token_url, "e2e", refresh_token="r")
        oauth_server.fail(1, "invalid_grant")
        oauth_server.fail(1, "http500")

        with pytest.raises(InvalidGrant, match=r"\(invalid_grant: injected by the test\)"):
            fetch()
        with pytest.raises(OAuthError) as error_info:
            fetch()

        assert (error_info.value.status, error_info.value.error) == (500, "server_error")

    def test_a_shared_token_over_a_real_server(self, oauth_server: MockOAuthServer) -> None:
        """ClientCredentials as a SharedToken's fetch: one request serves many calls."""
        token = SharedToken(ClientCredentials(oauth_server.token_url, "e2e", SECRET), min_ttl=1)

        assert token() == token()
