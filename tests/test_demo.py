"""The live demo, ``python -m token_refresh demo``, and its command line."""

from __future__ import annotations

import io
import logging
import re
import runpy
import subprocess
import sys
import threading

import pytest

from token_refresh.cli import _demo, main

from conftest import HungUp, ReraisingThread

pytestmark = pytest.mark.usefixtures("sub_second_delays")  # the story runs at up to 20x speed

CLOSING = (
    "All 3 sessions refreshed 2 times and hold a fresh token; schedulers closed, no threads left."
)


@pytest.fixture
def minted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every token the demo's token servers mint during the test."""
    tokens: list[str] = []
    original = _demo.TokenServer.mint

    def mint(server: _demo.TokenServer, lifetime: float) -> str:
        tokens.append(original(server, lifetime))
        return tokens[-1]

    monkeypatch.setattr(_demo.TokenServer, "mint", mint)
    return tokens


def assert_no_token_material(output: str, tokens: list[str]) -> None:
    assert tokens
    assert "eyJ" not in output  # how every base64url JSON segment of a JWT starts
    for token in tokens:
        for segment in filter(None, token.split(".")):
            assert segment not in output


@pytest.mark.realclock
class TestRunDemo:
    @pytest.mark.timeout(20)
    def test_story_at_four_times_speed(self, minted: list[str]) -> None:
        """Each session is refreshed twice, the flaky source fails twice then recovers; exit 0."""
        out = io.StringIO()

        assert _demo.run_demo(out, speed=4) == 0

        story = out.getvalue()
        lines = story.splitlines()
        for session in ("alice", "bob", "carol"):
            assert len(re.findall(rf"^ +\+[\d.]+s  {session} +refreshed", story, re.M)) == 2
            assert re.search(rf"^  {session} +2 refreshes, .* fresh for [\d.]+s more$", story, re.M)
        down = [i for i, line in enumerate(lines) if "flaky-auth is down" in line]
        recovered = [
            i for i, line in enumerate(lines) if "carol  refreshed (recovered after 2" in line
        ]
        assert len(down) == 2
        assert len(recovered) == 1
        assert down[-1] < recovered[0]
        assert "returns None" in lines[down[0]]
        assert "raises ConnectionError" in lines[down[1]]
        assert re.search(r"^  carol +2 refreshes, 2 failed attempts", story, re.M)
        assert lines[-1] == CLOSING
        assert_no_token_material(story, minted)

    @pytest.mark.timeout(20)
    def test_source_that_never_recovers_fails_the_demo(
        self, minted: list[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A source down for 3 calls in a row ends carol's chain; the demo says so and exits 1."""
        monkeypatch.setattr(_demo, "OUTAGE", ("returns None", "raises ConnectionError") * 2)
        out = io.StringIO()

        assert _demo.run_demo(out, speed=20) == 1

        story = out.getvalue()
        assert story.count("flaky-auth is down") == 3  # the scheduler gave up after the 3rd
        assert "FAILED: carol got 0 of 2 refreshes in time. --verbose" in story
        assert re.search(
            r"^  carol +0 refreshes, 3 failed attempts, holds token #1, EXPIRED$", story, re.M
        )
        assert CLOSING not in story
        assert_no_token_material(story, minted)

    @pytest.mark.timeout(20)
    def test_lapsed_token_fails_the_demo(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A session whose last token has expired by the summary makes the demo exit 1."""
        monkeypatch.setattr(_demo, "TOKEN_LIFETIME", 1.0)  # shorter than the follow-up interval
        out = io.StringIO()

        assert _demo.run_demo(out, speed=20) == 1

        story = out.getvalue()
        assert re.search(r"^  alice +2 refreshes, .*, EXPIRED$", story, re.M)
        assert "FAILED: alice's token expired" in story
        assert CLOSING not in story

    @pytest.mark.timeout(20)
    def test_thread_left_running_fails_the_demo(self) -> None:
        """A thread named like the schedulers' still alive after close() makes the demo exit 1."""
        release = threading.Event()
        straggler = ReraisingThread(release.wait, name="token-refresh-auth-straggler")
        straggler.start()
        out = io.StringIO()
        try:
            assert _demo.run_demo(out, speed=20) == 1
        finally:
            release.set()
            straggler.join()

        story = out.getvalue()
        assert "FAILED: thread token-refresh-auth-straggler is still running." in story
        assert CLOSING not in story


@pytest.mark.realclock
class TestMain:
    @pytest.mark.timeout(20)
    def test_verbose_demo_logs_the_library_on_stderr(
        self, minted: list[str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``demo --verbose`` prints the story on stdout, the library's DEBUG lines on stderr."""
        logger = logging.getLogger("token_refresh")
        handlers, level = list(logger.handlers), logger.level

        assert main(["demo", "--verbose", "--speed", "8"]) == 0

        out, err = capsys.readouterr()
        assert out.splitlines()[-1] == CLOSING
        assert (
            "DEBUG token_refresh: [auth:token] Scheduled token refresh for sessionId=alice" in err
        )
        assert (
            "ERROR token_refresh: [flaky-auth:token] get_access_token raised ConnectionError" in err
        )
        assert_no_token_material(out + err, minted)
        assert (logger.handlers, logger.level) == (handlers, level)

    @pytest.mark.timeout(20)
    def test_quiet_demo_writes_nothing_on_stderr(
        self, minted: list[str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Without ``--verbose`` the demo prints only its story."""
        assert main(["demo", "--speed", "8"]) == 0

        out, err = capsys.readouterr()
        assert out.splitlines()[-1] == CLOSING
        assert err == ""

    @pytest.mark.timeout(60)
    def test_python_m_token_refresh_demo(self) -> None:
        """``python -m token_refresh demo`` runs at full length and exits 0 on its own."""
        result = subprocess.run(
            [sys.executable, "-m", "token_refresh", "demo"],
            capture_output=True,
            text=True,
            timeout=40,
            check=False,
        )

        assert (result.returncode, result.stderr) == (0, "")
        assert result.stdout.splitlines()[-1] == CLOSING
        assert "about 10 seconds" in result.stdout


@pytest.mark.realclock
@pytest.mark.timeout(20)
class TestReaderGone:
    def test_reader_gone_at_once_ends_the_demo(
        self,
        minted: list[str],
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """``demo | true``: the demo stops before its first refresh, quietly, with exit 141."""
        monkeypatch.setattr(sys, "stdout", HungUp())

        status = main(["demo"])

        assert (status, capsys.readouterr().err) == (141, "")
        assert len(minted) == 3  # the sessions' first tokens; the first refresh is 2 s later
        for thread in threading.enumerate():
            # Process-wide, each ends by itself: the clock watcher once no timer
            # is armed, the reaper once no scheduler is open.
            if thread.name in ("token-refresh-clock-watch", "token-refresh-reaper"):
                thread.join(5)
        left = [t for t in threading.enumerate() if t.name.startswith("token-refresh-")]
        assert not [t for t in left if t.is_alive()]

    def test_reader_gone_mid_story_ends_the_demo(
        self, minted: list[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A reader that goes while a worker thread tells a refresh ends the demo: exit 141."""
        stdout = HungUp(lines=_demo.INTRO.count("\n") + 1 + 3)  # then alice's refresh, at 2 s
        monkeypatch.setattr(sys, "stdout", stdout)

        status = main(["demo"])

        assert status == 141
        assert "  carol  has token #1 from flaky-auth" in stdout.getvalue().splitlines()[-1]
        assert len(minted) == 4  # and bob's refresh, 1 s later, never came


class TestCommandLine:
    def test_help_lists_the_demo(self, capsys: pytest.CaptureFixture[str]) -> None:
        """``--help`` exits 0 and lists the ``demo`` command."""
        with pytest.raises(SystemExit) as exit_info:
            main(["--help"])

        assert exit_info.value.code == 0
        assert re.search(r"^ +demo +watch a few sessions", capsys.readouterr().out, re.M)

    def test_demo_help_hides_speed(self, capsys: pytest.CaptureFixture[str]) -> None:
        """``demo --help`` documents ``--verbose`` and not the testing-only ``--speed``."""
        with pytest.raises(SystemExit) as exit_info:
            main(["demo", "--help"])

        out = capsys.readouterr().out
        assert exit_info.value.code == 0
        assert "--verbose" in out
        assert "--speed" not in out

    @pytest.mark.parametrize("argv", [[], ["demo", "--speed", "0"], ["demo", "--speed", "inf"]])
    def test_bad_command_line_exits_2(
        self, argv: list[str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A missing command or a speed that is not a positive number is a usage error."""
        with pytest.raises(SystemExit) as exit_info:
            main(argv)

        assert exit_info.value.code == 2
        assert "usage: token-refresh" in capsys.readouterr().err

    def test_module_entry_point(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Running the package as ``__main__`` calls main() and exits with its status."""
        monkeypatch.setattr(sys, "argv", ["/somewhere/token_refresh/__main__.py", "--help"])

        with pytest.raises(SystemExit) as exit_info:
            runpy.run_module("token_refresh", run_name="__main__")

        assert exit_info.value.code == 0
        assert capsys.readouterr().out.startswith("usage: python -m token_refresh")
