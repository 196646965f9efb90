"""One refresher per host: ``token-refresh token``, ``token-refresh agent`` and readers."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from test_cli import FakeIssuer

from token_refresh.cli import main
from token_refresh.shared import FileStore, Grant, NoFreshToken, Record, SharedToken

from conftest import make_jwt
from strict_oauth import Client, StrictTokenServer, answer

SECRET = "s3cr+t:%-do-not-show"
PYTHON_M = [sys.executable, "-m", "token_refresh"]


@pytest.fixture
def strict() -> Iterator[StrictTokenServer]:
    """A strict token server: client "svc" with SECRET over Basic; opaque tokens for an hour."""
    with StrictTokenServer(clients={"svc": Client(SECRET, "basic")}) as server:
        yield server


@pytest.fixture
def issuer() -> Iterator[FakeIssuer]:
    """A token server minting unsigned JWTs (1 s by default) with metadata for discovery."""
    fake = FakeIssuer()
    yield fake
    fake.close()


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKEN_REFRESH_CLIENT_SECRET", SECRET)
    monkeypatch.delenv("TOKEN_REFRESH_CLIENT_ID", raising=False)


def token_requests(server: StrictTokenServer) -> int:
    return sum(seen.path == "/token" for seen in server.seen)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def token_argv(store: Path, endpoint: str, *extra: str) -> list[str]:
    return [
        "token",
        "--store",
        str(store),
        "--key",
        "api",
        "--token-endpoint",
        endpoint,
        "--client-id",
        "svc",
        *extra,
    ]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])  # closed again: nothing listens there


# -- token-refresh token ------------------------------------------------------------------------


@pytest.mark.usefixtures("secret_env")
class TestTokenCommand:
    def test_formats(
        self, strict: StrictTokenServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """token, header and credential_process JSON print the same stored token: one request."""
        argv = token_argv(tmp_path / "store", strict.token_url)
        asked = time.time()

        formats = ("token", "header", "json")
        outputs = [run([*argv, "--format", form, "--min-ttl", "600"], capsys) for form in formats]

        assert [(status, err) for status, _, err in outputs] == [(0, "")] * 3
        assert outputs[0][1] == "at-1\n"
        assert outputs[1][1] == "Authorization: Bearer at-1\n"
        document = json.loads(outputs[2][1])
        assert set(document) == {"Version", "access_token", "expires_at", "Expiration"}
        assert (document["Version"], document["access_token"]) == (1, "at-1")
        assert asked + 3600 - 1 <= document["expires_at"] <= time.time() + 3600
        expiration = datetime.fromtimestamp(document["expires_at"], UTC)
        assert document["Expiration"] == expiration.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert token_requests(strict) == 1
        assert oct(stat.S_IMODE(os.stat(tmp_path / "store").st_mode)) == "0o700"

    def test_json_of_a_jwt_fetched_by_another_process(
        self, issuer: FakeIssuer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A token found in the store tells its expiry from the record and its exp claim."""
        issuer.lifetime = 600
        argv = token_argv(tmp_path, f"{issuer.url}/token", "--client-auth", "post")
        first = run([*argv, "--format", "json"], capsys)
        exp = json.loads(first[1])["expires_at"]

        status, out, _ = run([*argv, "--format", "json"], capsys)  # a new process's view

        assert status == 0
        assert json.loads(out) == json.loads(first[1])
        assert time.time() + 590 < exp <= time.time() + 600
        assert len(issuer.token_requests()) == 1

    def test_unknown_lifetime(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """An opaque token with no expires_in: expires_at null, no Expiration."""
        with StrictTokenServer(lifetime=0, clients={"svc": Client(SECRET, "basic")}) as server:
            status, out, _ = run(
                [*token_argv(tmp_path, server.token_url), "--format", "json"], capsys
            )

        assert status == 0
        assert json.loads(out) == {"Version": 1, "access_token": "at-1", "expires_at": None}

    def test_issuer_is_discovered_only_when_a_token_is_needed(
        self, strict: StrictTokenServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--issuer finds the token endpoint; a stored token costs no request at all."""
        argv = ["token", "--store", str(tmp_path), "--key", "api", "--issuer", strict.url]
        secret_file = tmp_path / "secret"
        secret_file.write_text(f"{SECRET}\n")
        argv += ["--client-id", "svc", "--client-secret-file", str(secret_file)]
        os.environ["TOKEN_REFRESH_CLIENT_SECRET"] = "not-this-one"  # the file wins

        assert run(argv, capsys)[:2] == (0, "at-1\n")
        assert run(argv, capsys)[:2] == (0, "at-1\n")

        assert [seen.path for seen in strict.seen] == [
            "/.well-known/oauth-authorization-server",
            "/token",
        ]

    @pytest.mark.parametrize(
        ("answers", "status", "message"),
        [
            ([], 1, "answered HTTP 401 (invalid_client: bad client credentials)"),
            (
                [answer(400, {"error": "invalid_grant"})],
                1,
                "answered HTTP 400 (invalid_grant)",
            ),
            ([answer(500, {"error": "server_error"})], 3, "answered HTTP 500 (server_error)"),
            ([answer(429, {}, Retry_After="30")], 3, "asked to retry after 30s"),
        ],
    )
    def test_server_answers(
        self,
        strict: StrictTokenServer,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
        answers: list[Callable[..., None]],
        status: int,
        message: str,
    ) -> None:
        """A refusal exits 1, a failing or busy server 3: one line, never the secret."""
        if not answers:
            monkeypatch.setenv("TOKEN_REFRESH_CLIENT_SECRET", SECRET + "-wrong")
        strict.queue(*answers)

        code, out, err = run(token_argv(tmp_path, strict.token_url), capsys)

        assert (code, out) == (status, "")
        assert err.startswith("token-refresh: error: ")
        assert message in err
        assert err.count("\n") == 1
        assert "s3cr" not in err

    def test_unreachable_token_server_exits_3(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Nothing listening: exit 3, the URL and the reason."""
        url = f"http://127.0.0.1:{free_port()}/token"
        status, _, err = run(token_argv(tmp_path, url), capsys)

        assert status == 3
        assert err == f"token-refresh: error: no answer from {url}: Connection refused\n"

    def test_unusable_store_exits_3(
        self, strict: StrictTokenServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A store directory others may write to is refused: exit 3, no token request."""
        tmp_path.chmod(0o777)
        status, _, err = run(token_argv(tmp_path, strict.token_url), capsys)

        assert status == 3
        assert "must be a real directory of this user" in err
        assert token_requests(strict) == 0

    @pytest.mark.parametrize(
        ("extra", "message"),
        [
            (["--issuer", "https://a.example"], "not allowed with argument"),
            (["--min-ttl", "-1"], "must be a number of seconds"),
            (["--min-ttl", "soon"], "must be a number of seconds"),
            (["--client-secret-file", "/nonexistent/secret"], "No such file or directory"),
            (["--client-auth", "none"], "--client-auth none sends no secret"),
            (["--format", "yaml"], "invalid choice"),
        ],
    )
    def test_usage_errors_exit_2(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
    ) -> None:
        """Options that cannot work are usage errors: exit 2, no request, no secret shown."""
        with pytest.raises(SystemExit) as exit_info:
            main(token_argv(tmp_path, "http://127.0.0.1:9/token", *extra))

        err = capsys.readouterr().err
        assert exit_info.value.code == 2
        assert message in err
        assert SECRET not in err

    @pytest.mark.parametrize(
        ("argv", "message"),
        [
            (["--token-endpoint", "http://auth.example/token"], "must be an https:// URL"),
            (["--issuer", "https://a.example/?x=1"], "must have no query"),
            (["--token-endpoint", "http://127.0.0.1:9/t"], "token needs --client-id"),
        ],
    )
    def test_bad_endpoint_or_client(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
    ) -> None:
        """A plain-http remote endpoint, a query on the issuer, no client id: exit 2."""
        with pytest.raises(SystemExit) as exit_info:
            main(["token", "--store", str(tmp_path), "--key", "k", *argv])

        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err

    def test_empty_secret_file(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """An empty secret file is a usage error, not a public client by accident."""
        (tmp_path / "secret").write_text("\n")
        with pytest.raises(SystemExit) as exit_info:
            main(
                token_argv(
                    tmp_path,
                    "http://127.0.0.1:9/t",
                    "--client-secret-file",
                    str(tmp_path / "secret"),
                )
            )

        assert exit_info.value.code == 2
        assert "the file is empty" in capsys.readouterr().err


def shell(command: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["bash", "-c", command], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.realclock
@pytest.mark.timeout(120)
class TestTokenCommandInShells:
    def test_eight_parallel_shells_make_one_token_request(
        self, strict: StrictTokenServer, tmp_path: Path
    ) -> None:
        """8 shells x N calls of ``token-refresh token`` (real bash, real processes): 1 request."""
        calls = int(os.environ.get("TOKEN_REFRESH_SHELL_CALLS", "4"))
        env = {**os.environ, "TOKEN_REFRESH_CLIENT_SECRET": SECRET}
        command = " ".join(
            [*PYTHON_M, *token_argv(tmp_path / "store", strict.token_url, "--format", "header")]
        )
        loop = f"for i in $(seq {calls}); do {command} || exit $?; done"
        shells = [shell(loop, env) for _ in range(8)]
        results = [process.communicate(timeout=110) for process in shells]

        assert [process.returncode for process in shells] == [0] * 8
        lines = [line for out, _ in results for line in out.splitlines()]
        assert lines == ["Authorization: Bearer at-1"] * (8 * calls)
        assert "".join(err for _, err in results) == ""
        assert token_requests(strict) == 1

    def test_cron_calls_across_lifetimes_never_print_an_expired_token(
        self, issuer: FakeIssuer, tmp_path: Path
    ) -> None:
        """Calls over three 2 s lifetimes: each token printed has min-ttl left; ~1 fetch each."""
        issuer.lifetime = 2.0
        argv = [*PYTHON_M, *token_argv(tmp_path, f"{issuer.url}/token", "--min-ttl", "0.5")]
        env = {**os.environ, "TOKEN_REFRESH_CLIENT_SECRET": SECRET}
        printed: list[tuple[float, str]] = []
        until = time.time() + 6.0
        while time.time() < until:
            result = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
            printed.append((time.time(), result.stdout.strip()))

        for when, token in printed:
            payload = json.loads(_b64(token.split(".")[1]))
            assert payload["exp"] > when, "an expired token was printed"
        assert 3 <= len(issuer.token_requests()) <= len({token for _, token in printed})
        assert len(printed) > len(issuer.token_requests())  # tokens were shared between calls


def _b64(segment: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


# -- readers: SharedToken(None, store) ------------------------------------------------------------


class TestReader:
    def test_reads_what_the_store_holds(self, tmp_path: Path) -> None:
        """A reader returns the stored token while it has more than min_ttl left, and caches it."""
        store = FileStore(tmp_path)
        token = make_jwt({"exp": time.time() + 600})
        assert store.write("api", Record(Grant(token), 1, time.time()))
        reader = SharedToken(None, store, key="api", min_ttl=60)

        assert reader() == token
        os.unlink(next(tmp_path.glob("*.json")))
        assert reader() == token  # from this process's cache

    @pytest.mark.parametrize(
        ("record", "problem"),
        [
            (None, "holds no token for it"),
            (
                Record(Grant("t", expires_at=time.time() + 30), 1, 0.0),
                "holds no token with more than min_ttl=60s left",
            ),
            (
                Record(Grant("t", expires_at=time.time() + 600), 1, 0.0, refused=True),
                "holds a token a server refused",
            ),
        ],
    )
    def test_says_when_the_agent_is_not_keeping_it(
        self, tmp_path: Path, record: Record | None, problem: str
    ) -> None:
        """Nothing stored, expiring, or refused: NoFreshToken naming key and store, no token."""
        store = FileStore(tmp_path)
        if record is not None:
            assert store.write("api", record)
        reader = SharedToken(None, store, key="api", min_ttl=60)

        with pytest.raises(NoFreshToken) as raised:
            reader()

        message = str(raised.value)
        assert f"key 'api': FileStore({str(tmp_path)!r}) {problem}" in message
        assert "token-refresh agent" in message
        assert isinstance(raised.value, LookupError)

    def test_fetch_must_be_callable_or_none(self) -> None:
        with pytest.raises(TypeError, match="or None for a reader"):
            SharedToken("not callable")  # type: ignore[arg-type]
