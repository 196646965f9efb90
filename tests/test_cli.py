"""The command line: ``inspect``, ``demo --issuer`` and the OAuth2 client behind it."""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import time_machine

import token_refresh
from token_refresh import _scheduler, format_duration
from token_refresh.cli import _demo_issuer, main
from token_refresh.cli._inspect import Inspection
from token_refresh.oauth import ClientCredentials

from conftest import START, HungUp, MockOAuthServer, b64url, make_jwt
from strict_oauth import Answer, answer

pytestmark = pytest.mark.usefixtures("sub_second_delays")  # the demos run on shrunk delays

SIGNATURE = "c2lnbmF0dXJl"  # make_jwt's signature segment
PERSONAL = {"sub": "user-8c41f2", "email": "ada@example.org", "name": "Ada Lovelace"}
JSON_KEYS = {
    "expired",
    "expires_at",
    "expires_at_utc",
    "expires_at_local",
    "expires_in",
    "refresh_buffer",
    "refresh_at",
    "refresh_at_utc",
    "refresh_at_local",
    "refresh_in",
    "claims",
    "timing_claims",
}


def run(
    argv: list[str], capsys: pytest.CaptureFixture[str], stdin: str | io.TextIOBase = ""
) -> tuple[int, str, str]:
    """main(argv) with ``stdin``; its exit status, stdout and stderr."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "stdin", io.StringIO(stdin) if isinstance(stdin, str) else stdin)
        status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(err: str, message: str) -> None:
    assert err.count("\n") == 1
    assert err.startswith(f"token-refresh: error: {message}")
    assert "Traceback" not in err


def assert_no_token_material(output: str, tokens: list[str]) -> None:
    assert tokens
    for token in tokens:
        for segment in token.split("."):
            assert segment not in output


@pytest.fixture
def at_start() -> Iterator[None]:
    with time_machine.travel(START, tick=False):
        yield


def set_zone(monkeypatch: pytest.MonkeyPatch, zone: str) -> None:
    """Make ``zone`` (a POSIX TZ string: no tz database needed) the local time zone."""
    monkeypatch.setenv("TZ", zone)
    time.tzset()


@pytest.fixture
def utc_here(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time is UTC, whatever the machine's zone; restored afterwards."""
    set_zone(monkeypatch, "UTC0")
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("at_start", "utc_here")
class TestInspect:
    def test_valid_token(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A valid token: expiry in UTC and local time, time left, refresh time; exit 0."""
        token = make_jwt({"exp": START + 3600, "iat": START - 60, **PERSONAL})

        status, out, err = run(["inspect"], capsys, stdin=f"  {token}\n\n")

        assert (status, err) == (0, "")
        assert out.splitlines() == [
            "expires:  2027-01-15 09:00:00 UTC (2027-01-15 09:00:00 UTC local time)",
            "left:     1h",
            "refresh:  2027-01-15 08:55:00 UTC (2027-01-15 08:55:00 UTC local time), "
            "in 55m (--buffer 300)",
            "claims:   exp=1800003600, iat=1799999940; also email, name, sub (values not shown)",
            "The signature is not shown, and not verified.",
        ]

    def test_local_time_follows_the_zone(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The local time is the machine's zone, in text and JSON alike."""
        set_zone(monkeypatch, "IST-5:30")
        token = make_jwt({"exp": START + 3600})

        _, text, _ = run(["inspect"], capsys, stdin=token)
        _, out, _ = run(["inspect", "--json"], capsys, stdin=token)

        assert "2027-01-15 09:00:00 UTC (2027-01-15 14:30:00 IST local time)" in text
        assert json.loads(out)["expires_at_local"] == "2027-01-15T14:30:00+05:30"

    def test_within_the_buffer_refreshes_now(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A token closer to expiry than the buffer would be refreshed now; it is still valid."""
        status, out, _ = run(["inspect"], capsys, stdin=make_jwt({"exp": START + 90}))

        assert status == 0
        assert "left:     1m 30s\n" in out
        assert "refresh:  now: it expires within the 5m buffer (--buffer 300)\n" in out

    @pytest.mark.parametrize(
        ("lifetime", "left", "refresh_in"),
        [
            (30 * 86_400 - 1, "29d 23h", "29d 23h"),
            (30 * 86_400, "30d", "29d 23h"),
            (5 * 3_600 + 59, "5h", "4h 55m"),
            (3 * 3_600 + 900, "3h 15m", "3h 10m"),
            (3_599.9, "59m 59s", "54m 59s"),
        ],
    )
    def test_long_lived_token_reads_in_days_and_hours(
        self, capsys: pytest.CaptureFixture[str], lifetime: float, left: str, refresh_in: str
    ) -> None:
        """Long lifetimes read in days and hours, or hours and minutes, cut down, not rounded up."""
        status, out, _ = run(["inspect"], capsys, stdin=make_jwt({"exp": START + lifetime}))

        assert status == 0
        assert f"left:     {left}\n" in out
        assert f", in {refresh_in} (--buffer 300)\n" in out

    def test_format_duration_keeps_the_seeds_format(self) -> None:
        """The library's format_duration still reads minutes and seconds, as the seed's does."""
        assert format_duration(30 * 86_400 - 1) == "43199m 59s"

    def test_buffer_option(self, capsys: pytest.CaptureFixture[str]) -> None:
        """``--buffer`` moves the refresh time; the JSON says when and in how long."""
        token = make_jwt({"exp": START + 90})

        _, out, _ = run(["inspect", "--buffer", "30", "--json"], capsys, stdin=token)

        facts = json.loads(out)
        assert facts["refresh_buffer"] == 30
        assert facts["refresh_at"] == START + 60
        assert facts["refresh_at_utc"] == "2027-01-15T08:01:00Z"
        assert facts["refresh_in"] == 60

    def test_expired_token_exits_1(self, capsys: pytest.CaptureFixture[str]) -> None:
        """An expired token says how long ago, that a refresh is due now, and exits 1."""
        status, out, err = run(["inspect"], capsys, stdin=make_jwt({"exp": START - 300}))

        assert (status, err) == (1, "")
        assert "left:     expired 5m ago\n" in out
        assert "refresh:  now: the token has expired (--buffer 300)\n" in out

    def test_exp_now_counts_as_expired(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A token whose exp is this very second has expired (RFC 7519: on or after exp)."""
        status, out, _ = run(["inspect", "--json"], capsys, stdin=make_jwt({"exp": START}))

        assert status == 1
        assert json.loads(out)["expired"] is True

    def test_json_facts(self, capsys: pytest.CaptureFixture[str]) -> None:
        """``--json`` prints every documented key, and claim values only for exp, iat, nbf."""
        token = make_jwt(
            {"exp": START + 600, "iat": START - 10, "nbf": START - 20, "jti": "x1", **PERSONAL}
        )

        status, out, _ = run(["inspect", "--json"], capsys, stdin=token)

        facts = json.loads(out)
        assert status == 0
        assert set(facts) == JSON_KEYS
        assert facts == {
            "expired": False,
            "expires_at": START + 600,
            "expires_at_utc": "2027-01-15T08:10:00Z",
            "expires_at_local": "2027-01-15T08:10:00+00:00",
            "expires_in": 600,
            "refresh_buffer": 300,
            "refresh_at": START + 300,
            "refresh_at_utc": "2027-01-15T08:05:00Z",
            "refresh_at_local": "2027-01-15T08:05:00+00:00",
            "refresh_in": 300,
            "claims": ["email", "exp", "iat", "jti", "name", "nbf", "sub"],
            "timing_claims": {"exp": START + 600, "iat": START - 10, "nbf": START - 20},
        }

    @pytest.mark.parametrize("json_output", [False, True])
    def test_never_prints_the_signature_or_other_claim_values(
        self, capsys: pytest.CaptureFixture[str], json_output: bool
    ) -> None:
        """No output shows the signature, a raw segment, or a claim value off the allow-list."""
        token = make_jwt({"exp": START + 600, "scope": "read:ada", **PERSONAL})
        header, payload, _ = token.split(".")

        _, out, err = run(["inspect", *(["--json"] if json_output else [])], capsys, stdin=token)

        for secret in (SIGNATURE, header, payload, "read:ada", *PERSONAL.values()):
            assert secret not in out + err

    def test_session_ingress_prefix(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A token with the ``sk-ant-si-`` prefix is inspected like the JWT behind it."""
        token = make_jwt({"exp": START + 3600}, prefix="sk-ant-si-")

        status, out, _ = run(["inspect"], capsys, stdin=token)

        assert status == 0
        assert "left:     1h\n" in out

    def test_token_argument_works_with_a_warning(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A token given as an argument is inspected, with a warning that does not echo it."""
        token = make_jwt({"exp": START + 3600})

        status, out, err = run(["inspect", token], capsys)

        assert status == 0
        assert "left:     1h\n" in out
        assert err == (
            "token-refresh: warning: a token given as an argument lands in shell history and ps; "
            "pipe it on standard input instead\n"
        )

    def test_terminal_gets_a_prompt(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Reading from a terminal, inspect says what it waits for, on stderr."""

        class Terminal(io.StringIO):
            def isatty(self) -> bool:
                return True

        status, _, err = run(["inspect"], capsys, stdin=Terminal(make_jwt({"exp": START + 1})))

        assert status == 0
        assert err == "token-refresh: paste the token, then press Ctrl-D\n"

    def test_odd_claims(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Timing claims that are not finite numbers show no value; odd names are escaped."""
        payload = {"exp": START + 60, "iat": "yesterday", "nbf": True, "\x1b[2Jwipe": 1}
        token = make_jwt(payload).replace(
            b64url(json.dumps(payload).encode()),
            b64url(json.dumps(payload).replace("true", "1e999").encode()),  # nbf: Infinity
        )

        _, out, _ = run(["inspect"], capsys, stdin=token)
        _, facts, _ = run(["inspect", "--json"], capsys, stdin=token)

        assert "claims:   exp=1800000060; also '\\x1b[2Jwipe', iat, nbf (values not shown)" in out
        assert "\x1b" not in out
        assert json.loads(facts)["timing_claims"] == {"exp": START + 60}

    def test_huge_integer_timing_claim(self, capsys: pytest.CaptureFixture[str]) -> None:
        """An iat too large for a float is listed by name only."""
        _, out, _ = run(["inspect"], capsys, stdin=make_jwt({"exp": START + 60, "iat": 10**400}))

        assert "claims:   exp=1800000060; also iat (values not shown)" in out

    def test_exp_beyond_the_calendar(self, capsys: pytest.CaptureFixture[str]) -> None:
        """An exp past year 9999 is shown in Unix seconds; its ISO forms are null."""
        token = make_jwt({"exp": 1e18})

        status, out, _ = run(["inspect"], capsys, stdin=token)
        _, facts, _ = run(["inspect", "--json"], capsys, stdin=token)

        assert status == 0
        assert "expires:  1000000000000000000 (Unix seconds, beyond the calendar)\n" in out
        parsed = json.loads(facts)
        assert (parsed["expires_at_utc"], parsed["expires_at_local"]) == (None, None)
        assert parsed["refresh_at_utc"] is None

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("not-a-token", "not a JWT: expected header.payload.signature"),
            ("a.b", "not a JWT: expected header.payload.signature"),
            ("eyJhbGciOiJub25lIn0.bm90IGpzb24.sig", "not a JWT: expected header.payload."),
            (make_jwt([1, 2, 3]), "not a JWT: its payload is not a JSON object"),
            (make_jwt({"sub": "x"}), "the token has no usable exp claim"),
            (make_jwt({"exp": 0}), "the token has no usable exp claim"),
            (make_jwt({"exp": "soon"}), "the token has no usable exp claim"),
            ("", "no token on standard input"),
            (" \n\t\n", "no token on standard input"),
        ],
    )
    def test_not_a_jwt_exits_2(
        self, capsys: pytest.CaptureFixture[str], text: str, message: str
    ) -> None:
        """Text that is no JWT with a usable exp is one line on stderr and exit status 2."""
        status, out, err = run(["inspect", "--json"], capsys, stdin=text)

        assert (status, out) == (2, "")
        assert_one_line_error(err, message)

    def test_undecodable_input_exits_2(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Bytes that are not UTF-8 on standard input are not a JWT: exit 2, no traceback."""
        stdin = io.TextIOWrapper(io.BytesIO(b"\xff\xfe\xfd"), encoding="utf-8")

        status, out, err = run(["inspect"], capsys, stdin=stdin)

        assert (status, out) == (2, "")
        assert_one_line_error(err, "not a JWT")

    @pytest.mark.parametrize("buffer", ["-1", "inf", "nan", "soon"])
    def test_bad_buffer_is_a_usage_error(
        self, capsys: pytest.CaptureFixture[str], buffer: str
    ) -> None:
        """A ``--buffer`` that is not a finite, non-negative number exits 2 with the usage."""
        with pytest.raises(SystemExit) as exit_info:
            run(["inspect", "--buffer", buffer], capsys)

        err = capsys.readouterr().err
        assert exit_info.value.code == 2
        assert "usage: token-refresh inspect" in err
        assert "argument --buffer: must be a number of seconds, 0 or more" in err


class TestHelp:
    @pytest.mark.parametrize(
        ("argv", "expected"),
        [
            ([], ["demo", "inspect"]),
            (["demo"], ["--issuer URL", "--client-id", "TOKEN_REFRESH_CLIENT_SECRET"]),
            (["inspect"], ["--buffer SECONDS", "--json", "exit status: 0", *sorted(JSON_KEYS)]),
            ([], ["--version", "exit status 141 (128 + SIGPIPE)"]),
        ],
    )
    def test_every_command_has_help(
        self, capsys: pytest.CaptureFixture[str], argv: list[str], expected: list[str]
    ) -> None:
        """``--help`` exits 0 and documents each command's options (and inspect's JSON keys)."""
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--help"])

        out = capsys.readouterr().out
        assert exit_info.value.code == 0
        for text in expected:
            assert text in out

    def test_version(self, capsys: pytest.CaptureFixture[str]) -> None:
        """``--version`` prints the package's version and exits 0."""
        with pytest.raises(SystemExit) as exit_info:
            main(["--version"])

        assert exit_info.value.code == 0
        assert capsys.readouterr().out == f"token-refresh {token_refresh.__version__}\n"

    def test_json_keys_in_help_are_the_real_ones(self) -> None:
        """The keys documented in ``inspect --help`` are exactly those ``--json`` prints."""
        facts = Inspection(
            now=START, expires_at=START, refresh_buffer=0, claims=(), timing_claims={}
        ).as_json()

        assert set(facts) == JSON_KEYS


def closed_pipe() -> int:
    """The write end of a pipe whose read end is already closed (a reader that has gone)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    return write_end


def script(name: str) -> list[str]:
    """The command line that runs ``name``: the console script, or ``python -m``."""
    if name == "token-refresh":
        return [str(Path(sys.executable).with_name("token-refresh"))]
    return [sys.executable, "-m", "token_refresh"]


@pytest.mark.usefixtures("at_start", "utc_here")
class TestClosedPipe:
    def test_inspect_into_a_closed_pipe_exits_141_quietly(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A real pipe whose reader has gone: exit status 141, nothing on stderr."""
        with open(closed_pipe(), "w", encoding="utf-8") as stdout:
            monkeypatch.setattr(sys, "stdout", stdout)
            status, _, err = run(["inspect"], capsys, stdin=make_jwt({"exp": START + 60}))

        assert (status, err) == (141, "")

    def test_expired_token_into_a_gone_reader_exits_141(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An expired token's report that nobody reads is 141 too, not 1 (a stream, no fd)."""
        monkeypatch.setattr(sys, "stdout", HungUp())

        status, _, err = run(["inspect"], capsys, stdin=make_jwt({"exp": START - 60}))

        assert (status, err) == (141, "")

    def test_a_gone_reader_of_stderr_exits_141(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A warning into a closed stderr stops the command the same quiet way."""
        monkeypatch.setattr(sys, "stderr", HungUp())

        status, out, _ = run(["inspect", make_jwt({"exp": START + 60})], capsys)

        assert (status, out) == (141, "")

    @pytest.mark.parametrize("name", ["token-refresh", "python -m token_refresh"])
    @pytest.mark.parametrize(
        ("argv", "stdin", "status"),
        [
            (["inspect"], make_jwt({"exp": 4_000_000_000}), 141),
            (["inspect", "--json"], make_jwt({"exp": 1_000}), 141),
            (["--help"], "", 0),
        ],
    )
    def test_real_process_into_a_closed_pipe(
        self, name: str, argv: list[str], stdin: str, status: int
    ) -> None:
        """``token-refresh inspect < t | true``: 141, not 0, 1 or 2; ``--help``: 0. Quiet."""
        stdout = closed_pipe()
        try:
            result = subprocess.run(
                [*script(name), *argv],
                input=stdin,
                stdout=stdout,
                stderr=subprocess.PIPE,
                text=True,
                timeout=30,
                check=False,
            )
        finally:
            os.close(stdout)

        assert (result.returncode, result.stderr) == (status, "")


class TestDemoCommandLine:
    @pytest.mark.parametrize(
        ("argv", "message"),
        [
            (["--issuer", "http://auth.example.com"], "must be an https:// URL"),
            (["--issuer", "ftp://127.0.0.1/"], "must be an https:// URL"),
            (
                ["--issuer", "https://me:hunter2@auth.example.com"],
                "must not hold a user name or password",
            ),
            (
                ["--issuer", "https://auth.example.com/?secret=hunter2"],
                "must have no query or fragment",
            ),
            (["--client-id", "me"], "--client-id need --issuer"),
            (["--client-secret", "s", "--refreshes", "2"], "--client-secret, --refreshes need"),
            (["--issuer", "https://auth.example.com", "--speed", "2"], "--speed is for the"),
            (["--issuer", "https://auth.example.com", "--refreshes", "0"], "from 1 to 100"),
        ],
    )
    def test_usage_errors_exit_2(
        self, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
    ) -> None:
        """Options that do not fit together are usage errors: exit 2, no traceback."""
        with pytest.raises(SystemExit) as exit_info:
            main(["demo", *argv])

        err = capsys.readouterr().err
        assert exit_info.value.code == 2
        assert message in err
        assert "Traceback" not in err
        assert "hunter2" not in err

    def test_unreachable_issuer_is_one_line(self, capsys: pytest.CaptureFixture[str]) -> None:
        """An issuer that does not answer is one error line and exit status 1."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]  # closed again: nothing listens there

        status, _, err = run(["demo", "--issuer", f"http://127.0.0.1:{port}"], capsys)

        assert status == 1
        assert_one_line_error(
            err,
            f"no answer from http://127.0.0.1:{port}/.well-known/oauth-authorization-server: "
            "Connection refused",
        )

    def test_interrupt_exits_130(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Ctrl-C during a demo ends it with status 130 and no traceback."""

        def interrupted(*args: object, **kwargs: object) -> int:
            raise KeyboardInterrupt

        monkeypatch.setattr("token_refresh.cli._main.run_demo", interrupted)

        status, _, err = run(["demo"], capsys)

        assert (status, err) == (130, "token-refresh: interrupted\n")

    @pytest.mark.parametrize(
        ("argv", "stdin"),
        [(["inspect"], "junk"), (["demo", "--issuer", "http://127.0.0.1:9"], "")],
    )
    def test_errors_in_a_real_process_have_no_traceback(self, argv: list[str], stdin: str) -> None:
        """``python -m token_refresh`` reports failures in one stderr line."""
        result = subprocess.run(
            [sys.executable, "-m", "token_refresh", *argv],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

        assert result.returncode in (1, 2)
        assert result.stderr.startswith("python -m token_refresh: error: ")
        assert result.stderr.count("\n") == 1


# -- the OAuth2 client, against a stand-in server in this process ------------------------------


class FakeIssuer:
    """A stand-in OAuth2 server on 127.0.0.1 (stdlib http.server): every branch, no Node.

    Tokens are unsigned JWTs (or opaque strings) that live ``lifetimes`` seconds, the
    first first, then ``lifetime``. ``answers[path]`` holds one-shot answers that go first.
    """

    def __init__(self) -> None:
        self.lifetime = 1.0
        self.lifetimes: list[float] = []
        self.opaque = False
        self.answers: dict[str, list[Answer]] = {}
        self.requests: list[tuple[str, str, dict[str, str], str]] = []
        self.issued: list[str] = []
        self._serials = itertools.count(1)
        self._lock = threading.Lock()
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                issuer.handle(self, "")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                issuer.handle(self, self.rfile.read(length).decode())

            def log_message(self, format: str, *args: Any) -> None:
                pass  # no noise on stderr

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(
            target=self.server.serve_forever, args=(0.01,), name="fake-issuer"
        )  # polls for shutdown() every 10 ms
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()

    def handle(self, handler: BaseHTTPRequestHandler, body: str) -> None:
        path = handler.path
        with self._lock:
            self.requests.append((handler.command, path, dict(handler.headers), body))
            queued = self.answers.get(path, [])
            canned = queued.pop(0) if queued else None
        if canned is not None:
            canned(handler)
        elif path == "/.well-known/openid-configuration":
            answer(200, {"issuer": self.url, "token_endpoint": f"{self.url}/token"})(handler)
        elif path == "/token" and handler.command == "POST":
            answer(200, self.mint())(handler)
        else:
            answer(404, {})(handler)

    def mint(self) -> dict[str, object]:
        with self._lock:
            lifetime = self.lifetimes.pop(0) if self.lifetimes else self.lifetime
            serial = next(self._serials)
        token = (
            f"opaque-{serial}"
            if self.opaque
            else make_jwt({"jti": serial, "exp": time.time() + lifetime, **PERSONAL})
        )
        self.issued.append(token)
        return {"access_token": token, "token_type": "Bearer", "expires_in": lifetime}

    def queue(self, path: str, *answers: Answer) -> None:
        with self._lock:
            self.answers.setdefault(path, []).extend(answers)

    def token_requests(self) -> list[tuple[dict[str, str], dict[str, list[str]]]]:
        """The headers and parsed form of every POST to /token."""
        return [
            (headers, urllib.parse.parse_qs(body))
            for method, path, headers, body in self.requests
            if (method, path) == ("POST", "/token")
        ]


@pytest.fixture
def issuer() -> Iterator[FakeIssuer]:
    fake = FakeIssuer()
    yield fake
    fake.close()


# -- demo --issuer ---------------------------------------------------------------------------


def story_lines(out: str) -> list[str]:
    """The demo's timestamped lines, without the stamps."""
    return [re.sub(r"^ *\+[\d.]+s  ", "", line) for line in out.splitlines() if "  " in line]


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries after 0.1 s, so failing stories stay short."""
    monkeypatch.setattr(_demo_issuer, "RETRY_DELAY", 0.1)


@pytest.mark.realclock
@pytest.mark.timeout(30)
@pytest.mark.usefixtures("quick")
class TestIssuerDemo:
    def test_jwt_session_is_kept_fresh(
        self, issuer: FakeIssuer, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Each refreshed JWT is scheduled from its exp; the demo ends by itself with exit 0."""
        status, out, err = run(["demo", "--issuer", issuer.url, "--refreshes", "2"], capsys)

        assert (status, err) == (0, "")
        assert f"Token endpoint {issuer.url}/token, grant client_credentials" in out
        assert "client 'token-refresh-demo'" in out
        assert "Its tokens live 1s. So you can watch, refresh_buffer=0.5s: a token is " in out
        assert "refreshed 0.5s after it is issued;" in out
        assert "schedule(session, token) reads each token's exp. 2 refreshes" in out
        lines = story_lines(out)
        assert re.fullmatch(r"refreshed \(1 of 2\): .*; next refresh at \+[\d.]+s", lines[2])
        assert re.fullmatch(r"refreshed \(2 of 2\): .*; session over: cancel\(\)", lines[3])
        assert "Summary: 2 refreshes, 0 failed attempts" in out
        assert out.endswith("The session was kept fresh; the scheduler is closed.\n")
        assert len(issuer.token_requests()) == 3
        assert_no_token_material(out + err, issuer.issued)

    def test_opaque_tokens_use_expires_in(
        self,
        issuer: FakeIssuer,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Tokens that are no JWTs are scheduled from expires_in, with the floor told."""
        monkeypatch.setattr(_scheduler, "EXPIRES_IN_FLOOR", 0.25)
        issuer.opaque = True

        status, out, _ = run(["demo", "--issuer", issuer.url, "--refreshes", "2"], capsys)

        assert status == 0
        assert "schedule_from_expires_in(session, expires_in), which waits 0.25s at least" in out
        assert "schedule_from_expires_in(): refresh at +0.5s" in out
        assert "opaque-" not in out

    def test_failures_are_told_and_recovered_from(
        self, issuer: FakeIssuer, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Failed refreshes are told with the server's answer; the session recovers."""
        issuer.queue("/token", answer(200, issuer.mint()))  # the first token, then two failures
        issuer.queue("/token", answer(500, {"error": "server_error"}), answer(503, b""))

        status, out, _ = run(["demo", "--issuer", issuer.url, "--refreshes", "1"], capsys)

        lines = story_lines(out)
        assert status == 0
        assert lines[2:4] == [
            f"refresh failed (1 of 3): {issuer.url}/token answered HTTP 500 (server_error); "
            "retry in 0.1s",
            f"refresh failed (2 of 3): {issuer.url}/token answered HTTP 503; retry in 0.1s",
        ]
        assert lines[4].startswith("refreshed (1 of 1)")
        assert "Summary: 1 refreshes, 2 failed attempts" in out

    def test_giving_up_fails_the_demo(
        self, issuer: FakeIssuer, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Three failures in a row end the session; the demo says so and exits 1."""
        issuer.queue("/token", answer(200, issuer.mint()), *[answer(400, {"error": "x"})] * 3)

        status, out, _ = run(["demo", "--issuer", issuer.url], capsys)

        lines = story_lines(out)
        assert status == 1
        assert lines[4] == f"refresh failed (3 of 3): {issuer.url}/token answered HTTP 400 (x)"
        assert lines[5] == "gave up after 3 failures in a row"
        assert "Summary: 0 refreshes, 3 failed attempts" in out
        assert out.endswith("FAILED: the session was not kept fresh. --verbose shows the log.\n")

    def test_token_already_within_the_buffer_refreshes_now(
        self, issuer: FakeIssuer, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A refreshed token that is already due is refreshed at once: "next refresh now"."""
        issuer.lifetimes = [1.0, 0.2]

        status, out, _ = run(["demo", "--issuer", issuer.url, "--refreshes", "2"], capsys)

        assert status == 0
        assert "refreshed (1 of 2): " in out
        assert "; next refresh now\n" in out

    def test_expired_at_the_end_fails_the_demo(
        self, issuer: FakeIssuer, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A session whose last token has lapsed by the summary fails the demo."""
        issuer.lifetimes = [1.0, -5.0]  # the refreshed token has already expired

        status, out, _ = run(["demo", "--issuer", issuer.url, "--refreshes", "1"], capsys)

        assert status == 1
        assert "Summary: 1 refreshes, 0 failed attempts" in out
        assert ", EXPIRED.\n" in out

    def test_refresh_after_the_token_expired_fails_the_demo(
        self,
        issuer: FakeIssuer,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A refresh that comes after the token it replaces has expired is told and fails it."""
        monkeypatch.setattr(_scheduler, "EXPIRES_IN_FLOOR", 0.6)
        issuer.opaque, issuer.lifetime = True, 0.3

        status, out, _ = run(["demo", "--issuer", issuer.url, "--refreshes", "2"], capsys)

        refreshed = [line for line in story_lines(out) if line.startswith("refreshed")]
        assert status == 1
        assert "Beware: 0.6s is not before the tokens expire: each refresh will come too" in out
        assert len(refreshed) == 2
        for line in refreshed:
            assert re.search(r"; TOO LATE: the token it replaced had expired 0\.\ds before", line)
        assert "Summary: 2 refreshes, 0 failed attempts, 2 too late; holds token" in out
        assert re.search(
            r"\nFAILED: 2 of 2 refreshes came after the token they replaced had expired "
            r"\(by up to 0\.\ds\)\. --verbose shows the log\.\n$",
            out,
        )

    def test_reader_gone_ends_the_demo_at_once(
        self,
        issuer: FakeIssuer,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """With nobody reading its story, the demo stops before any refresh: exit 141."""
        issuer.lifetime = 10.0  # the first refresh would come 3 s after the first token
        monkeypatch.setattr(sys, "stdout", HungUp())

        status, _, err = run(["demo", "--issuer", issuer.url], capsys)

        assert (status, err) == (141, "")
        assert len(issuer.token_requests()) == 1

    def test_reader_gone_mid_story_ends_the_demo(
        self,
        issuer: FakeIssuer,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A reader that goes while a refresh is told (on a worker thread) ends the demo: 141."""
        issuer.lifetime = 4.0  # a refresh every 2 s
        stdout = HungUp(lines=7)  # the introduction and two lines; then the first refresh
        monkeypatch.setattr(sys, "stdout", stdout)

        status, _, err = run(["demo", "--issuer", issuer.url], capsys)

        assert (status, err) == (141, "")
        assert re.search(r"  schedule\(\): refresh at \+[\d.]+s\n$", stdout.getvalue())
        assert len(issuer.token_requests()) == 2

    def test_deadline_bounds_the_demo(
        self,
        issuer: FakeIssuer,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Refreshes that do not come in time end the demo anyway, with exit 1."""
        monkeypatch.setattr(_demo_issuer, "SLACK", -100.0)

        status, out, _ = run(["demo", "--issuer", issuer.url], capsys)

        assert status == 1
        assert "Summary: 0 refreshes" in out
        assert "FAILED" in out

    @pytest.mark.parametrize(
        ("first", "message"),
        [
            ({"access_token": "opaque"}, "the token is no JWT with an exp, and came with no"),
            ({"access_token": make_jwt({"exp": 1000})}, "the server's token has already expired"),
        ],
    )  # fmt: skip
    def test_unusable_first_token(
        self,
        issuer: FakeIssuer,
        capsys: pytest.CaptureFixture[str],
        first: dict[str, object],
        message: str,
    ) -> None:
        """A first token whose expiry is unknown or past is one error line and exit 1."""
        issuer.queue("/token", answer(200, first))

        status, _, err = run(["demo", "--issuer", issuer.url], capsys)

        assert status == 1
        assert_one_line_error(err, message)

    def test_credentials_from_the_environment(
        self,
        issuer: FakeIssuer,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """The client id and secret come from the environment; the secret is never shown."""
        monkeypatch.setenv("TOKEN_REFRESH_CLIENT_ID", "env-client")
        monkeypatch.setenv("TOKEN_REFRESH_CLIENT_SECRET", "env-hunter2")

        status, out, err = run(["demo", "--issuer", issuer.url, "--refreshes", "1"], capsys)

        assert (status, err) == (0, "")
        assert "client 'env-client'" in out
        for headers, _ in issuer.token_requests():
            assert base64.b64decode(headers["Authorization"][6:]) == b"env-client:env-hunter2"
        assert "env-hunter2" not in out

    def test_secret_argument_warns(
        self, issuer: FakeIssuer, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A secret given as an argument works, with a warning that does not echo it."""
        argv = ["demo", "--issuer", issuer.url, "--refreshes", "1", "--verbose"]
        argv += ["--client-id", "arg-client", "--client-secret", "arg-hunter2"]

        status, out, err = run(argv, capsys)

        assert status == 0
        assert err.startswith(
            "token-refresh: warning: a secret given as an argument shows in ps and shell "
            "history; set TOKEN_REFRESH_CLIENT_SECRET instead\n"
        )
        assert "DEBUG token_refresh: [demo:token] Scheduled token refresh for sessionId=demo" in err
        assert "arg-hunter2" not in out + err
        assert_no_token_material(out + err, issuer.issued)


class TestIssuerDemoWording:
    @pytest.mark.parametrize(
        ("seconds", "text"),
        [
            (0.49999, "0.5s"),
            (2.96, "3s"),
            (59.4, "59s"),
            (600, "10m"),
            (3600, "1h"),
            (86_400, "1d"),
        ],
    )
    def test_durations(self, seconds: float, text: str) -> None:
        """Tenths show under a minute; longer lifetimes read in minutes, hours or days."""
        assert _demo_issuer._duration(seconds) == text


# -- demo --issuer against the real OAuth2 server ----------------------------------------------


@pytest.mark.realclock
@pytest.mark.timeout(40)
class TestIssuerDemoEndToEnd:
    def test_demo_against_oauth2_mock_server(
        self, oauth_server: MockOAuthServer, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``demo --issuer`` keeps a session fresh against oauth2-mock-server: 3 refreshes."""
        oauth_server.command("lifetime 2")
        status, out, err = run(["demo", "--issuer", oauth_server.issuer], capsys)
        assert (status, err) == (0, "")
        assert f"Token endpoint {oauth_server.token_url}, grant client_credentials" in out
        assert "Its tokens live 2s." in out
        assert len(re.findall(r"^ +\+[\d.]+s  refreshed \(\d of 3\)", out, re.M)) == 3
        assert "eyJ" not in out

    def test_demo_recovers_from_server_errors(
        self, oauth_server: MockOAuthServer, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """HTTP 500 twice from the real server costs two told retries, not the session."""
        oauth_server.command("lifetime 2")
        original = _demo_issuer.TokenSource.get_access_token
        calls = itertools.count()

        def get_access_token(source: _demo_issuer.TokenSource) -> str:
            token = original(source)
            if next(calls) == 0:  # the demo has its first token: now the server fails
                oauth_server.fail(2, "http500")
            return token

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(_demo_issuer, "RETRY_DELAY", 0.2)
            patch.setattr(_demo_issuer.TokenSource, "get_access_token", get_access_token)
            status, out, _ = run(["demo", "--issuer", oauth_server.issuer], capsys)

        assert status == 0
        answered = f"{oauth_server.token_url} answered HTTP 500 (server_error)"
        assert f"refresh failed (1 of 3): {answered}; retry in 0.2s" in out
        assert f"refresh failed (2 of 3): {answered}; retry in 0.2s" in out
        assert "Summary: 3 refreshes, 2 failed attempts" in out

    @pytest.mark.parametrize(
        ("lifetime", "floor", "late", "verdict"),
        [
            (
                "1",
                2.0,
                2,
                "FAILED: 2 of 2 refreshes came after the token they replaced had expired",
            ),
            ("2", 0.25, 0, "The session was kept fresh; the scheduler is closed."),
        ],
    )
    def test_opaque_tokens_are_judged_against_the_token_they_replace(
        self,
        oauth_server: MockOAuthServer,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
        lifetime: str,
        floor: float,
        late: int,
        verdict: str,
    ) -> None:
        """Opaque tokens that expire before the expires_in floor refreshes them fail the demo."""
        oauth_server.command("opaque on")
        oauth_server.command(f"lifetime {lifetime}")
        monkeypatch.setattr(_scheduler, "EXPIRES_IN_FLOOR", floor)

        status, out, err = run(
            ["demo", "--issuer", oauth_server.issuer, "--refreshes", "2"], capsys
        )

        assert (status, err) == (1 if late else 0, "")
        assert "the tokens are no JWTs, so schedule_from_expires_in" in out
        told = re.findall(r"; TOO LATE: the token it replaced had expired [\d.]+s before", out)
        assert len(told) == late
        assert f"Summary: 2 refreshes, 0 failed attempts, {late} too late;" in out
        assert verdict in out

    def test_metadata_naming_another_issuer_is_refused(
        self, oauth_server: MockOAuthServer, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``--issuer http://localhost:PORT`` to a server named ``http://127.0.0.1:PORT``: 1."""
        given = oauth_server.issuer.replace("127.0.0.1", "localhost")

        status, out, err = run(["demo", "--issuer", given], capsys)

        assert status == 1
        assert_one_line_error(
            err,
            f"{given}/.well-known/openid-configuration names the issuer {oauth_server.issuer!r}, "
            f"not {given!r}: metadata for another issuer is not used (RFC 8414, 3.3)",
        )
        assert "Token endpoint" not in out

    def test_python_m_token_refresh_demo_issuer(self, oauth_server: MockOAuthServer) -> None:
        """``python -m token_refresh demo --issuer URL`` runs in a real process and exits 0."""
        oauth_server.command("lifetime 2")
        result = subprocess.run(
            [sys.executable, "-m", "token_refresh", "demo", "--issuer", oauth_server.issuer],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

        assert (result.returncode, result.stderr) == (0, "")
        assert result.stdout.endswith("The session was kept fresh; the scheduler is closed.\n")

    def test_inspect_a_real_token(
        self, oauth_server: MockOAuthServer, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``inspect`` reads a token the real server signed, and never prints its signature."""
        token = ClientCredentials(oauth_server.token_url, "e2e", timeout=5)().access_token

        status, out, err = run(["inspect", "--buffer", "1"], capsys, stdin=token)

        assert (status, err) == (0, "")
        assert "claims:   exp=" in out
        assert "also iss (values not shown)" in out
        assert_no_token_material(out, [token])
