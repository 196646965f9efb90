"""The documentation stays true: its examples run, its picture is current, and it builds.

**Code in the Markdown.** Every fenced ``python`` block in ``README.md`` and
``docs/**/*.md`` runs, in order, in one namespace per file (a page reads top to
bottom, and so do its examples), in a fresh interpreter with warnings as
errors. Two HTML comments, which neither GitHub nor Sphinx shows, help:

``<!-- docs-test: setup`` ... ``-->``
    The Python between these lines runs at that point of the page without
    being shown: stand-ins for a real token server, an assertion about what an
    example did. Keep them short; a reader never sees them.

``<!-- docs-test: skip -->``
    On the line before a fenced block: do not run that block. Only for code
    that needs a real server on a fixed port (the Prometheus endpoint in
    guides/metrics.md, whose names tests/test_otel.py checks instead).

``<!-- docs-test: requires flask -->``
    The page's code needs a module that is not a dependency of the package:
    without it the page is skipped (a failure when ``CI=true``).

In the code, ``__file__`` is the Markdown file's path.

Blocks fenced as anything else (``sh``, ``ini``, ``{eval-rst}``, a MyST
``{literalinclude}``) are not run.

**Examples.** ``docs/examples/*.py`` run as programs (``daemon.py``,
``script.py``) or through Flask's test client and a real gunicorn
(``flask_app.py``), with ``TOKEN_REFRESH_EXAMPLE_FAST=1``, which turns their
minutes into seconds.

**Picture and build.** ``docs/_static/timeline.svg`` must be what
``docs/_scripts/timeline.py`` draws today, and ``sphinx-build -W`` must pass.

Without Sphinx, Flask or gunicorn the tests that need them skip, except when
``CI=true``: then a missing tool is a failure, so CI cannot pass without them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import pytest

import token_refresh
from token_refresh import events, oauth, shared, testing

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"
FAST_ENV = {"TOKEN_REFRESH_EXAMPLE_FAST": "1", "PYTHONUNBUFFERED": "1"}
#: Seconds any one example program may take before the test calls it hung.
PROGRAM_TIMEOUT = 30.0


def _require(what: str, module: str) -> None:
    """Skip when ``module`` cannot be imported, or fail when running in CI."""
    if importlib.util.find_spec(module) is not None:
        return
    message = f"{what} is not installed"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI=true, so this is a failure, not a skip", pytrace=False)
    pytest.skip(message)


# -- code in the Markdown ------------------------------------------------------

FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
SETUP_START = "<!-- docs-test: setup"
SKIP_MARK = "<!-- docs-test: skip -->"
REQUIRES = re.compile(r"^<!-- docs-test: requires (?P<modules>[\w. ]+) -->$", re.MULTILINE)
RUNNABLE = {"python", "py", "python3"}


@dataclass(frozen=True)
class Snippet:
    """Python found in a Markdown file, with the line where its code starts."""

    path: str
    line: int
    code: str
    hidden: bool = False


def extract_snippets(text: str, path: str) -> list[Snippet]:
    """The Python a Markdown file runs: fenced ``python`` blocks and hidden setup comments."""
    lines = text.splitlines()
    snippets: list[Snippet] = []
    skip_next = False
    index = 0
    while index < len(lines):
        line = lines[index]
        stripped = line.strip()
        if stripped.startswith(SETUP_START):
            if stripped != SETUP_START:
                raise ValueError(f"{path}:{index + 1}: put the setup code on the lines below")
            end = next((i for i in range(index + 1, len(lines)) if lines[i].strip() == "-->"), None)
            if end is None:
                raise ValueError(f"{path}:{index + 1}: setup comment is never closed by -->")
            code = "\n".join(lines[index + 1 : end]) + "\n"
            snippets.append(Snippet(path, index + 2, code, hidden=True))
            index = end + 1
            continue
        if stripped == SKIP_MARK:
            skip_next = True
            index += 1
            continue
        match = FENCE.match(line)
        if match is None:
            if skip_next and stripped:
                raise ValueError(f"{path}:{index + 1}: {SKIP_MARK} must come right before a block")
            index += 1
            continue
        fence, indent = match["fence"], len(match["indent"])
        close = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        end = next((i for i in range(index + 1, len(lines)) if close.match(lines[i])), None)
        if end is None:
            raise ValueError(f"{path}:{index + 1}: code block is never closed")
        language = match["info"].split()[0] if match["info"].strip() else ""
        if language in RUNNABLE and not skip_next:
            body = [body_line[indent:] for body_line in lines[index + 1 : end]]
            snippets.append(Snippet(path, index + 2, "\n".join(body) + "\n"))
        skip_next = False
        index = end + 1
    if skip_next:
        raise ValueError(f"{path}: {SKIP_MARK} at the end, with no block after it")
    return snippets


def required_modules(text: str) -> list[str]:
    """The modules a Markdown file's code needs beyond the package's dependencies."""
    return [name for match in REQUIRES.finditer(text) for name in match["modules"].split()]


def doc_pages() -> list[Path]:
    """The Markdown pages Sphinx builds (not what a local build left in docs/_build)."""
    return sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.relative_to(DOCS).parts)


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *doc_pages()]


def files_with_code() -> list[Path]:
    return [p for p in markdown_files() if extract_snippets(p.read_text("utf-8"), str(p))]


def _relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# Runs one file's snippets in a fresh interpreter: each compiled as if at its line
# in the Markdown file, so a traceback points at the page.
RUNNER = """
import json, sys
snippets = json.load(sys.stdin)
namespace = {"__name__": "__main__", "__file__": snippets[0][0]}
for path, line, code in snippets:
    exec(compile("\\n" * (line - 1) + code, path, "exec"), namespace)
"""


def run_snippets(snippets: list[Snippet], cwd: Path) -> subprocess.CompletedProcess[str]:
    payload = json.dumps([[s.path, s.line, s.code] for s in snippets])
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", RUNNER],
        input=payload,
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        timeout=PROGRAM_TIMEOUT,
        check=False,
    )


class TestMarkdownCode:
    """Every Python example in README.md and docs/ runs as written."""

    @pytest.mark.parametrize("path", files_with_code(), ids=_relative)
    def test_examples_run(self, path: Path, tmp_path: Path) -> None:
        """The file's Python blocks run in order, in one namespace, without error or warning."""
        text = path.read_text(encoding="utf-8")
        snippets = extract_snippets(text, str(path))
        for module in required_modules(text):
            _require(module, module)
        result = run_snippets(snippets, tmp_path)
        assert result.returncode == 0, (
            f"an example in {_relative(path)} failed:\n{result.stderr}\n{result.stdout}"
        )

    def test_the_pages_with_examples_are_found(self) -> None:
        """README.md and the guides are among the files whose examples run, so none drops out."""
        with_code = {
            _relative(path)
            for path in markdown_files()
            if any(not s.hidden for s in extract_snippets(path.read_text("utf-8"), str(path)))
        }
        expected = {
            "README.md",
            "docs/quickstart.md",
            "docs/how-it-works.md",
            "docs/guides/testing.md",
            "docs/seed.md",
        }
        assert expected <= with_code

    def test_readme_use_example_is_whole(self) -> None:
        """README.md's examples run on their own: no hidden setup stands behind them."""
        readme = extract_snippets((ROOT / "README.md").read_text("utf-8"), "README.md")
        assert len(readme) >= 2
        assert not any(s.hidden for s in readme)

    def test_requires_lists_modules(self) -> None:
        """``<!-- docs-test: requires a b -->`` lines name the modules a page needs."""
        text = "<!-- docs-test: requires flask -->\ntext\n<!-- docs-test: requires a.b c -->\n"
        assert required_modules(text) == ["flask", "a.b", "c"]

    def test_extract_finds_blocks_setup_and_skips(self) -> None:
        """Python blocks and setup comments are found with their lines; other fences are not."""
        text = "\n".join(
            [
                "# Title",  # 1
                "<!-- docs-test: setup",  # 2
                "token = 'x'",  # 3
                "-->",  # 4
                "```python",  # 5
                "print(token)",  # 6
                "```",  # 7
                "````{eval-rst}",  # 8
                "```python",  # 9
                "not run = (",  # 10
                "```",  # 11
                "````",  # 12
                "<!-- docs-test: skip -->",  # 13
                "```python",  # 14
                "needs_a_server()",  # 15
                "```",  # 16
                "```sh",  # 17
                "pip install .",  # 18
                "```",  # 19
                "- a list item:",  # 20
                "  ```py",  # 21
                "  indented = True",  # 22
                "  ```",  # 23
            ]
        )
        assert extract_snippets(text, "page.md") == [
            Snippet("page.md", 3, "token = 'x'\n", hidden=True),
            Snippet("page.md", 6, "print(token)\n"),
            Snippet("page.md", 22, "indented = True\n"),
        ]

    @pytest.mark.parametrize(
        ("text", "problem"),
        [
            ("```python\nx = 1\n", "never closed"),
            ("<!-- docs-test: setup\nx = 1\n", "never closed by -->"),
            ("<!-- docs-test: setup x = 1\n-->\n", "lines below"),
            ("<!-- docs-test: skip -->\ntext\n```python\nx\n```\n", "right before a block"),
            ("text\n<!-- docs-test: skip -->\n", "no block after it"),
        ],
    )
    def test_extract_refuses_mistakes(self, text: str, problem: str) -> None:
        """A malformed page is an error, not an example silently left out."""
        with pytest.raises(ValueError, match=problem):
            extract_snippets(text, "page.md")

    def test_a_failing_example_fails_with_its_page_and_line(self, tmp_path: Path) -> None:
        """An error in an example is reported at its line in the Markdown file."""
        snippets = extract_snippets("intro\n\n```python\nx = 1\nassert x == 2\n```\n", "page.md")
        result = run_snippets(snippets, tmp_path)
        assert result.returncode != 0
        assert 'File "page.md", line 5' in result.stderr

    def test_examples_run_with_warnings_as_errors(self, tmp_path: Path) -> None:
        """A deprecation warning in an example fails it."""
        code = "import warnings\nwarnings.warn('old', DeprecationWarning)\n"
        result = run_snippets([Snippet("page.md", 1, code)], tmp_path)
        assert result.returncode != 0
        assert "DeprecationWarning: old" in result.stderr


# -- the timeline picture ------------------------------------------------------


def _load(path: Path, name: str) -> ModuleType:
    """Import a file that is not on sys.path (an example, or the picture's script)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def timeline() -> ModuleType:
    return _load(DOCS / "_scripts" / "timeline.py", "docs_timeline")


class TestTimeline:
    """The picture in "How it works" is drawn from a real run, and kept current."""

    def test_committed_picture_is_current(self, timeline: ModuleType) -> None:
        """docs/_static/timeline.svg is exactly what the script draws from today's scheduler."""
        committed = (DOCS / "_static" / "timeline.svg").read_text(encoding="utf-8")
        assert timeline.render() == committed, (
            "docs/_static/timeline.svg is out of date: run `python docs/_scripts/timeline.py`, "
            "look at the new picture, and commit it"
        )

    def test_the_run_behind_the_picture(self, timeline: ModuleType) -> None:
        """The recorded run has the story the page tells: 2 retries, then 30-minute follow-ups."""
        run = timeline.record()
        start = timeline.START
        steps = [
            (type(e).__name__, round((e.time - start) / 60, 2))
            for e in run.events
            if isinstance(e, events.Refreshed | events.RefreshFailed | events.Cancelled)
        ]
        assert steps == [
            ("RefreshFailed", 55),
            ("RefreshFailed", 56),
            ("Refreshed", 57),
            ("Refreshed", 87),
            ("Refreshed", 117),
            ("Cancelled", 130),
        ]
        assert [round(t.issued / 60) for t in run.tokens] == [0, 57, 87, 117]

    def test_script_writes_the_file_it_is_given(self, timeline: ModuleType, tmp_path: Path) -> None:
        """``python docs/_scripts/timeline.py PATH`` writes the picture there."""
        target = tmp_path / "timeline.svg"
        result = subprocess.run(
            [sys.executable, str(DOCS / "_scripts" / "timeline.py"), str(target)],
            capture_output=True,
            text=True,
            timeout=PROGRAM_TIMEOUT,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert target.read_text(encoding="utf-8") == timeline.render()
        assert target.read_text(encoding="utf-8").startswith("<svg ")


@pytest.fixture(scope="module")
def metrics_script() -> ModuleType:
    _require("opentelemetry-sdk (the test extra)", "opentelemetry.sdk")
    return _load(DOCS / "_scripts" / "metrics.py", "docs_metrics")


class TestMetricsPicture:
    """The picture in "Metrics and alerts" is drawn from a real run, and kept current."""

    def test_committed_picture_is_current(self, metrics_script: ModuleType) -> None:
        committed = (DOCS / "_static" / "metrics.svg").read_text(encoding="utf-8")
        assert metrics_script.render() == committed, (
            "docs/_static/metrics.svg is out of date: run `python docs/_scripts/metrics.py`, "
            "look at the new picture, and commit it"
        )

    def test_the_run_behind_the_picture(self, metrics_script: ModuleType) -> None:
        """The day has the story the page tells: on time but for the pauses, 3 give-ups."""
        figures = metrics_script.record()
        page = (DOCS / "guides" / "metrics.md").read_text(encoding="utf-8")
        on_time = dict(figures.lateness)[0.001]
        late = [bound for bound, count in figures.lateness if count and bound > 0.001]
        assert min(late) > 60  # nothing late but what a pause of minutes made late
        assert on_time + figures.late_refreshes == sum(count for _, count in figures.lateness)
        failed = sum(n for (outcome, _), n in figures.refreshes.items() if outcome == "failed")
        assert failed == 3
        assert "all but 3" in page
        assert f"failed {figures.fetches['failed']} of {sum(figures.fetches.values()):,}" in page
        resumed = sum(n for (_, trigger), n in figures.refreshes.items() if trigger == "resume")
        assert resumed == figures.late_refreshes  # every late one fell due in a pause


# -- the Sphinx build ------------------------------------------------------------


@pytest.fixture(scope="module")
def built_docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The HTML that ``sphinx-build -W --keep-going`` makes of docs/, once per run."""
    for module in ("sphinx", "myst_parser", "furo"):
        _require(f"{module} (the docs extra)", module)
    output = tmp_path_factory.mktemp("docs") / "html"
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
    result = subprocess.run(
        [*command, str(DOCS), str(output)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"sphinx-build failed:\n{result.stderr}\n{result.stdout}"
    return output


@pytest.mark.timeout(300)
class TestSphinxBuild:
    """docs/ builds with warnings as errors, and the reference covers every public name."""

    def test_every_public_name_has_a_reference_entry(self, built_docs: Path) -> None:
        """Each name in the package's, events', testing's, shared's and oauth's __all__ is there."""
        html = (built_docs / "reference.html").read_text(encoding="utf-8")
        names = [f"token_refresh.{n}" for n in token_refresh.__all__ if n != "events"]
        names += [f"token_refresh.events.{n}" for n in events.__all__]
        names += [f"token_refresh.testing.{n}" for n in testing.__all__]
        names += [f"token_refresh.shared.{n}" for n in shared.__all__]
        names += [f"token_refresh.oauth.{n}" for n in oauth.__all__]
        _require("opentelemetry (the test extra)", "opentelemetry.sdk")
        from token_refresh import otel

        names += [f"token_refresh.otel.{n}" for n in otel.__all__]
        public_methods = [
            name for name in vars(token_refresh.Scheduler) if not name.startswith("_")
        ]
        names += [f"token_refresh.Scheduler.{n}" for n in public_methods]
        missing = [name for name in names if f'id="{name}"' not in html]
        assert not missing, f"not in the reference: {missing}"

    def test_pages_and_picture_are_built(self, built_docs: Path) -> None:
        """Every page is built, and "How it works" shows the generated timeline."""
        pages = {p.relative_to(DOCS).as_posix() for p in doc_pages()}
        for page in pages:
            assert (built_docs / page).with_suffix(".html").is_file(), page
        assert "timeline.svg" in (built_docs / "how-it-works.html").read_text("utf-8")
        assert (built_docs / "_images" / "timeline.svg").is_file()


# -- the example programs --------------------------------------------------------


def _run_example(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [sys.executable, "-W", "error", str(EXAMPLES / name), *args],
            capture_output=True,
            text=True,
            env={**os.environ, **FAST_ENV},
            timeout=PROGRAM_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{name} {' '.join(args)} was still running after {error.timeout}s")


class LineReader:
    """Lines a process writes, read on a thread, so a test can wait for one with a deadline."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = PROGRAM_TIMEOUT) -> re.Match[str]:
        """Return the first line from now on that matches ``pattern``; fail at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no line matched {pattern!r} within {timeout}s: {self.lines}")
            if line is None:
                pytest.fail(f"output ended before a line matched {pattern!r}: {self.lines}")
            self.lines.append(line)
            if match := re.search(pattern, line):
                return match

    def rest(self) -> str:
        """Everything else the process writes, once it has exited."""
        self._thread.join(timeout=PROGRAM_TIMEOUT)
        while (line := self._queue.get()) is not None:
            self.lines.append(line)
        return "".join(self.lines)


@contextmanager
def _started(command: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    """Start ``command`` in its own process group; kill what is left of it afterwards."""
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **FAST_ENV, **env},
        start_new_session=True,
    )
    try:
        yield process
    finally:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=PROGRAM_TIMEOUT)
        assert process.stdout is not None
        process.stdout.close()


class TestScriptExample:
    """docs/examples/script.py: a plain script exits as soon as its work is done."""

    def test_exits_at_once_with_a_refresh_pending(self) -> None:
        """It finishes its pages and exits 0, although its next refresh is an hour away."""
        started = time.monotonic()
        result = _run_example("script.py")
        elapsed = time.monotonic() - started
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[-1].startswith("exported 3 pages")
        assert "next refresh due in 55m" in result.stdout
        assert elapsed < 10, f"took {elapsed:.1f}s to exit"


@pytest.mark.realclock
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
class TestDaemonExample:
    """docs/examples/daemon.py: refreshes on real timers, stops cleanly when told to."""

    def test_runs_for_the_time_given_then_stops_cleanly(self) -> None:
        """``--run-for`` ends it like a signal would: scheduler closed, exit status 0."""
        result = _run_example("daemon.py", "--run-for", "0.5")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "stopping: ran for 0.5s" in result.stdout
        assert "stopped cleanly" in result.stdout

    @pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
    def test_signal_stops_it_cleanly_after_refreshes(self, signum: signal.Signals) -> None:
        """After every session has refreshed, a signal closes the scheduler and exits 0."""
        command = [sys.executable, "-W", "error", str(EXAMPLES / "daemon.py"), "--sessions", "2"]
        with _started(command, {}) as process:
            assert process.stdout is not None
            reader = LineReader(process.stdout)
            reader.wait_for(r"running with 2 sessions")
            refreshed = {reader.wait_for(r"session (\S+): token #\d+ delivered")[1]}
            while len(refreshed) < 2:
                refreshed.add(reader.wait_for(r"session (\S+): token #\d+ delivered")[1])
            process.send_signal(signum)
            reader.wait_for(rf"stopping: {signum.name}")
            returncode = process.wait(timeout=PROGRAM_TIMEOUT)
            output = reader.rest()
        assert returncode == 0, output
        assert "stopped cleanly" in output
        assert "Traceback" not in output


@pytest.fixture(scope="module")
def flask_app() -> ModuleType:
    _require("Flask (the prefork extra)", "flask")
    return _load(EXAMPLES / "flask_app.py", "docs_example_flask_app")


@contextmanager
def _upstream(app: Any) -> Iterator[None]:
    """Serve ``app`` on a loopback port as the upstream API it calls (its own stand-in)."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="upstream", daemon=True)
    thread.start()
    app.config["UPSTREAM"] = f"http://127.0.0.1:{server.port}"
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class TestFlaskExample:
    """docs/examples/flask_app.py: each process keeps its own service token fresh."""

    def test_first_request_fetches_a_token_then_it_is_refreshed(
        self, flask_app: ModuleType
    ) -> None:
        """With a ManualClock: token #1 on the first request, #2 after the refresh is due."""
        clock = testing.ManualClock()
        service = flask_app.ServiceToken(flask_app.AuthServer(now=clock.time), clock=clock)
        app = flask_app.create_app(service)
        client = app.test_client()

        with _upstream(app):
            first = client.get("/").get_json()
            assert (first["token_number"], first["refused_first"]) == (1, 0)
            health = client.get("/healthz").get_json()
            assert health["sessions"] == [flask_app.SESSION]
            lifetime, buffer = flask_app.TOKEN_LIFETIME, service.scheduler.refresh_buffer
            assert health["next_refresh_in"] == lifetime - buffer

            clock.advance(lifetime - buffer)
            assert client.get("/").get_json()["token_number"] == 2
            health = client.get("/healthz").get_json()
            assert health["refreshes"] == 1
            assert health["next_refresh_in"] == lifetime - buffer  # from the new token's exp
        service.scheduler.close()

    def test_a_token_the_api_refuses_is_replaced_once(self, flask_app: ModuleType) -> None:
        """The upstream API refuses the current token: reject() fetches #2, the call is resent."""
        clock = testing.ManualClock()
        service = flask_app.ServiceToken(flask_app.AuthServer(now=clock.time), clock=clock)
        app = flask_app.create_app(service)
        client = app.test_client()

        with _upstream(app):
            assert client.get("/").get_json()["token_number"] == 1
            service.auth_server.revoked.add(1)
            answer = client.get("/").get_json()
            assert (answer["token_number"], answer["refused_first"]) == (2, 1)
            assert client.get("/").get_json()["refused_first"] == 0
            service.auth_server.revoked.update({2, 3})
            assert client.get("/").status_code == 500  # refused again after its one retry
        assert service.scheduler.next_refresh_at(flask_app.SESSION) is not None
        service.scheduler.close()

    def test_module_level_app_is_served(self, flask_app: ModuleType) -> None:
        """The ``app`` gunicorn imports answers, creating no thread before its first request."""
        assert flask_app.service_token.scheduler.sessions() == frozenset()
        response = flask_app.app.test_client().get("/healthz")
        assert response.status_code == 200
        flask_app.service_token.scheduler.close()

    @pytest.mark.realclock
    @pytest.mark.timeout(120)
    @pytest.mark.skipif(not hasattr(os, "fork"), reason="gunicorn needs os.fork()")
    def test_under_gunicorn_each_worker_has_its_own_token(
        self, flask_app: ModuleType, tmp_path: Path
    ) -> None:
        """gunicorn -c gunicorn.conf.py: workers answer with their own token and stop on SIGTERM."""
        _require("gunicorn (the prefork extra)", "gunicorn")
        command = [sys.executable, "-m", "gunicorn", "-c", str(EXAMPLES / "gunicorn.conf.py")]
        command += ["--bind", "127.0.0.1:0"]
        with _started(command, {"HOME": str(tmp_path)}) as process:  # gunicorn writes to ~
            assert process.stdout is not None
            reader = LineReader(process.stdout)
            port = reader.wait_for(r"Listening at: http://127\.0\.0\.1:(\d+)")[1]
            answers = [_get_json(f"http://127.0.0.1:{port}/") for _ in range(3)]
            health = _get_json(f"http://127.0.0.1:{port}/healthz")
            process.send_signal(signal.SIGTERM)
            returncode = process.wait(timeout=PROGRAM_TIMEOUT)
            output = reader.rest()
        assert returncode == 0, output
        for answer in answers:
            assert answer["pid"] != process.pid  # served by a worker, not the master
            assert answer["token_number"] >= 1
        assert health["sessions"] == [flask_app.SESSION]
        assert "Traceback" not in output


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=PROGRAM_TIMEOUT) as response:
        return json.loads(response.read())
