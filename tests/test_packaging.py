"""The source distribution: a packager who unpacks it can run its test suite.

The sdist is built from a copy of this tree (the tree itself is never written
to) with the setuptools installed here (the ``test`` extra has it: no network),
unpacked, and pytest collects its tests against the installed package.
"""

from __future__ import annotations

import email.parser
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: What a source tree holds that is no part of the project: never copied.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "node_modules", "build", "dist", "*.egg-info", "_build", ".*_cache",
    ".hypothesis", ".coverage*", "__pycache__",
)  # fmt: skip
SETUPTOOLS_MINIMUM = (77,)
QUIET = ["-p", "no:cacheprovider"]  # nothing written into the unpacked tree


def _require_setuptools() -> None:
    """Skip unless setuptools 77 or newer is installed; under CI=true, fail."""
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        version = "0"
    if tuple(int(part) for part in re.findall(r"\d+", version)[:1]) >= SETUPTOOLS_MINIMUM:
        return
    message = f"setuptools>=77 is not installed (found {version}): pip install '.[test]'"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI=true, so this is a failure, not a skip", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def unpacked_sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist, built from a copy of this tree and unpacked: its top directory."""
    _require_setuptools()
    work = tmp_path_factory.mktemp("sdist")
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    build = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, setuptools.build_meta as b; print(b.build_sdist(sys.argv[1]))",
            str(work),
        ],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    archive = work / build.stdout.strip().splitlines()[-1]
    with tarfile.open(archive) as sdist:
        sdist.extractall(work / "unpacked", filter="data")
    (top,) = (work / "unpacked").iterdir()
    return top


@pytest.mark.timeout(180)
class TestSdist:
    def test_ships_what_the_tests_need(self, unpacked_sdist: Path) -> None:
        """The sdist holds conftest.py, test data, the e2e server, the pre-fork apps, the docs."""
        for path in (
            "tests/conftest.py",
            "tests/data/node_base64url.json",
            "tests/e2e/server.mjs",
            "tests/e2e/package-lock.json",
            "tests/prefork/app.py",
            "docs/conf.py",
            "docs/examples/daemon.py",
            "README.md",
            "CHANGELOG.md",
            ".ci/run",
            "LICENSE",
            "token_refresh/py.typed",
        ):
            assert (unpacked_sdist / path).is_file(), path
        assert not (unpacked_sdist / "tests" / "e2e" / "node_modules").exists()

    def test_pytest_collects_from_the_unpacked_sdist(self, unpacked_sdist: Path) -> None:
        """``pytest --collect-only`` in the unpacked sdist finds every test file, with no errors."""
        collect = subprocess.run(
            # -P: the unpacked tree is not put on sys.path, so the installed package is tested.
            [sys.executable, "-P", "-m", "pytest", "--collect-only", "-q", "--no-cov", *QUIET],
            cwd=unpacked_sdist,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

        assert collect.returncode == 0, collect.stdout + collect.stderr
        summary = collect.stdout.strip().splitlines()[-1]
        assert re.fullmatch(r"\d+ tests collected in [\d.]+s", summary), collect.stdout
        files = {line.partition("::")[0] for line in collect.stdout.splitlines() if "::" in line}
        assert files == {f"tests/{path.name}" for path in (ROOT / "tests").glob("test_*.py")}

    def test_the_http_extras_are_their_clients_alone(self, unpacked_sdist: Path) -> None:
        """The requests and httpx extras are a client each; the test extra has both."""
        metadata = email.parser.Parser().parsestr(
            (unpacked_sdist / "PKG-INFO").read_text(encoding="utf-8")
        )
        requires = metadata.get_all("Requires-Dist") or []
        by_extra: dict[str, list[str]] = {}
        for requirement in requires:
            name, _, marker = requirement.partition(";")
            extra = re.search(r'extra == "([^"]+)"', marker)
            by_extra.setdefault(extra.group(1) if extra else "", []).append(name.strip())
        assert by_extra["requests"] == ["requests>=2.28"]
        assert by_extra["httpx"] == ["httpx>=0.27"]
        assert {"requests>=2.28", "httpx>=0.27"} <= set(by_extra["test"])
        assert "" not in by_extra  # the library itself needs nothing beyond the standard library


class TestTestCommand:
    def test_ci_runs_the_readme_test_command(self) -> None:
        """Each step of README's test command is a line of ``.ci/run``, so CI runs exactly it."""
        readme = (ROOT / "README.md").read_text(encoding="utf-8")
        (command,) = re.findall(r'^pip install "\.\[test\b.* && pytest$', readme, re.M)
        ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()

        for step in command.split(" && "):
            assert step in ci, step


class TestExtras:
    def test_the_otel_extra_is_the_opentelemetry_api_only(self) -> None:
        """``token_refresh[otel]`` pulls in the API; the SDK and exporters are the application's."""
        requires = importlib.metadata.requires("token_refresh") or []
        otel = [r.split(";")[0].strip() for r in requires if 'extra == "otel"' in r]
        assert otel == ["opentelemetry-api>=1.23"]
        base = [r for r in requires if "extra ==" not in r]
        assert base == []  # the library itself needs nothing beyond the standard library
