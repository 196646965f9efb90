"""The benchmark's per-refresh budget (``benchmarks/_budget.py``) counts a scheduler's own locks.

Each case runs the ``budget`` phase of ``benchmarks/_worker.py`` as ``run.py``
does, in a process of its own: a few refreshes due within 0.2 s.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

pytestmark = pytest.mark.realclock


def budget(contender: str, tmp_path: Path, n: int = 20) -> dict[str, Any]:
    spec = {"phase": "budget", "contender": contender, "n": n, "window": 0.2, "busy": False}
    spec.update(lead=0.3, drain=5.0, log=str(tmp_path / "log"), close_limit=5.0, timeout=30)
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "_worker.py"), json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=45,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert "error" not in result, result
    assert result["fired"] == n
    return result


def test_the_floor_takes_no_lock_and_sleeps_between_refreshes(tmp_path: Path) -> None:
    result = budget("floor", tmp_path)
    assert result["sites"] == {}
    assert [result[kind] for kind in ("acquires", "waits", "notifies", "queue_ops")] == [0] * 4
    assert result["acquires_per_refresh"] == 0
    assert result["voluntary_switches"] > 0  # its thread sleeps until each refresh is due
    assert result["switches_per_refresh"] > 0


def test_a_bare_heap_is_charged_for_its_condition_and_nothing_of_the_harness(
    tmp_path: Path,
) -> None:
    result = budget("bare heap", tmp_path)
    [(site, counts)] = result["sites"].items()
    assert site.startswith("benchmarks/_contenders.py:")
    assert "threading.Condition()" in site
    assert counts["acquires"] >= 20  # the timer thread takes it once per fire at least
    assert counts["waits"] >= 1
    assert result["acquires"] == counts["acquires"]
    assert result["acquires_per_refresh"] == counts["acquires"] / 20


def test_token_refresh_is_counted_by_the_lines_that_created_its_locks(tmp_path: Path) -> None:
    result = budget("token_refresh[heap]", tmp_path)
    assert result["sites"]
    assert all(site.startswith("token_refresh/") for site in result["sites"])
    assert result["acquires_per_refresh"] >= 1
    assert result["acquires"] == sum(counts["acquires"] for counts in result["sites"].values())


def test_instrumenting_after_token_refresh_loaded_is_refused() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import token_refresh, _budget; _budget.install()"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=BENCHMARKS,
        check=False,
    )
    assert done.returncode == 1
    assert "before token_refresh loads" in done.stderr
