"""Benchmark SharedToken: token requests and delivery times, with and without it, in one run.

    python benchmarks/shared.py           # 10,000 sessions: about 3 minutes, most of it
                                          # the run without SharedToken (10,000 x 50 ms
                                          # over 4 workers)
    python benchmarks/shared.py --smoke   # 200 sessions, about 15 s, for CI; exit 1
                                          # if a scenario fails its claim

Scenarios, each measured with a plain fetch and with a SharedToken:

- storm: N sessions fall due within one second on a real Scheduler (heap timers,
  max_workers=4), and the token request takes 50 ms;
- files: 8 processes x 4 threads call at once against an expired record in a FileStore;
- redis: 16 processes call at once against an expired record in a RedisStore on a
  redis-server of its own (skipped, and said so, without redis-server or redis-py);
- gunicorn: 4 workers keep a 3 s token fresh against the end-to-end OAuth server
  (tests/e2e, needs Node.js and ``npm ci --prefix tests/e2e``), sharing a FileStore.

The report goes to ``--out`` (default docs/shared-performance.md; with --smoke, a
temp file). The process scenarios run first, while this process has no threads,
because they fork.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import token_refresh.shared
from token_refresh import Scheduler
from token_refresh.shared import FileStore, Grant, Record, RedisStore, SharedToken, Store

Result = dict[str, Any]
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
E2E = ROOT / "tests" / "e2e"
FETCH_SECONDS = 0.05


def jwt(exp: float) -> str:
    body = base64.urlsafe_b64encode(json.dumps({"exp": exp}).encode()).decode().rstrip("=")
    return f"e30.{body}.unsigned"


class CountingFetch:
    """A 50 ms token request (or as long as told) that counts its calls (in this process)."""

    def __init__(self, seconds: float = FETCH_SECONDS) -> None:
        self.seconds = seconds
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self) -> str:
        with self._lock:
            self.calls += 1
        time.sleep(self.seconds)  # the token server's round trip
        return "opaque-access-token"


def storm(sessions: int, shared: bool, fetch_seconds: float = FETCH_SECONDS) -> Result:
    """N sessions due within one second: token requests, and when the last one got its token."""
    fetch = CountingFetch(fetch_seconds)
    source: Callable[[], str | None] = SharedToken(fetch) if shared else fetch
    lock, done = threading.Lock(), threading.Event()
    delivered, last = 0, 0.0

    def on_refresh(session_id: str, token: str) -> None:
        nonlocal delivered, last
        with lock:
            delivered += 1
            last = time.time()
            if delivered == sessions:
                done.set()

    window = time.time() + 0.5 + sessions / 10_000  # time to schedule them all first
    sched = Scheduler(source, on_refresh, refresh_buffer=0, max_workers=4, timers="heap")
    try:
        for index in range(sessions):
            sched.schedule(f"s{index}", jwt(window + index / sessions))
        finished = done.wait(5 + sessions * FETCH_SECONDS)
    finally:
        sched.close(timeout=10)
    return {
        "fetch_calls": fetch.calls,
        "delivered": delivered,
        "last_delivery": last - window if finished else None,
    }


def across_processes(
    make_store: Callable[[], Store], processes: int, threads: int, shared: bool, count: Path
) -> Result:
    """Forked processes x threads call at once against an expired record; count the fetches."""
    make_store().write("k", Record(Grant("expired"), 1, time.time() - 3600))
    count.write_text("")
    go_read, go_write = os.pipe()
    children = []
    for _ in range(processes):
        pid = os.fork()
        if pid == 0:  # a child: wait for the go byte, call from every thread, exit
            code = 1
            try:
                os.close(go_write)

                def fetch() -> str:
                    with count.open("a") as file:
                        file.write("x\n")
                    time.sleep(FETCH_SECONDS)
                    return f"token-from-{os.getpid()}"

                source = SharedToken(fetch, make_store(), "k") if shared else fetch
                os.read(go_read, 1)
                callers = [threading.Thread(target=source) for _ in range(threads)]
                for caller in callers:
                    caller.start()
                for caller in callers:
                    caller.join()
                # SharedToken stores a token after its callers have it; an interpreter
                # that exits normally waits for that write (atexit), os._exit does not.
                token_refresh.shared._finish_writes()
                code = 0
            finally:
                os._exit(code)
        children.append(pid)
    os.close(go_read)
    began = time.perf_counter()
    os.write(go_write, b"x" * processes)
    failed = sum(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0 for pid in children)
    elapsed = time.perf_counter() - began
    os.close(go_write)
    calls = len(count.read_text().splitlines())
    return {
        "fetch_calls": calls,
        "callers": processes * threads,
        "seconds": elapsed,
        "failed": failed,
    }


def gunicorn_workers(seconds: float, shared: bool, work: Path) -> Result | str:
    """4 gunicorn workers keeping a 3 s token fresh against the e2e OAuth server; count requests."""
    if shutil.which("node") is None or not (E2E / "node_modules" / "oauth2-mock-server").is_dir():
        return "needs Node.js and `npm ci --prefix tests/e2e`"
    if importlib.util.find_spec("gunicorn") is None:
        return "gunicorn is not installed"
    server = subprocess.Popen(
        ["node", "server.mjs", "--lifetime", "3"],
        cwd=E2E,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdin is not None
    assert server.stdout is not None
    try:
        line = server.stdout.readline()  # "listening http://127.0.0.1:PORT"
        if not line.startswith("listening "):
            return "the e2e OAuth server did not start"
        count = work / f"gunicorn-{shared}"
        count.write_text("")
        environment = {
            **os.environ,
            "BENCH_TOKEN_URL": f"{line.split()[1]}/token",
            "BENCH_COUNT": str(count),
            "BENCH_STORE": str(work / "gunicorn-tokens") if shared else "",
        }
        workers = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(HERE / "_shared_gunicorn.py")],
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(seconds)  # the measuring window: the workers refresh every 2 s meanwhile
        workers.terminate()
        workers.wait(30)
        return {"fetch_calls": len(count.read_text().splitlines()), "seconds": seconds}
    finally:
        server.stdin.close()
        server.wait(10)


def start_redis(directory: Path) -> subprocess.Popen[str] | str:
    """A redis-server on a unix socket in ``directory``, or why there is none."""
    if shutil.which("redis-server") is None:
        return "redis-server is not installed"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "redis-py is not installed"
    server = subprocess.Popen(
        [
            *("redis-server", "--port", "0", "--unixsocket", str(directory / "redis.sock")),
            *("--save", "", "--appendonly", "no", "--dir", str(directory)),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    for line in server.stdout:
        if "ready to accept connections" in line.lower():
            return server
    return "redis-server did not start"


def measure(sessions: int, window: float) -> Result:
    results: Result = {"sessions": sessions}
    with tempfile.TemporaryDirectory(prefix="shared-bench-") as temp:
        work = Path(temp)
        for shared in (False, True):
            results[f"files_{shared}"] = across_processes(
                lambda: FileStore(work / "tokens"), 8, 4, shared, work / "count"
            )
        server = start_redis(work)
        if isinstance(server, str):
            results["redis_skipped"] = server
        else:
            try:
                import redis

                socket = str(work / "redis.sock")
                for shared in (False, True):
                    results[f"redis_{shared}"] = across_processes(
                        lambda: RedisStore(redis.Redis(unix_socket_path=socket)),
                        16,
                        1,
                        shared,
                        work / "count",
                    )
            finally:
                server.terminate()
                server.communicate(timeout=10)
        for shared in (False, True):
            results[f"gunicorn_{shared}"] = gunicorn_workers(window, shared, work)
    for shared in (False, True):  # threads from here on: no more forks
        results[f"storm_{shared}"] = storm(sessions, shared)
    results["storm_floor"] = storm(sessions, False, fetch_seconds=0.0)
    return results


def seconds(value: float | None) -> str:
    return "did not finish" if value is None else f"{value:.2f} s"


def table(results: Result) -> list[str]:
    n = results["sessions"]
    plain, shared = results["storm_False"], results["storm_True"]
    rows = [
        "| scenario | measure | plain fetch | SharedToken | ratio |",
        "| --- | --- | --- | --- | --- |",
        f"| {n:,} sessions due within 1 s, Scheduler, 4 workers, 50 ms fetch | token requests "
        f"| {plain['fetch_calls']:,} | {shared['fetch_calls']:,} "
        f"| {plain['fetch_calls'] / max(shared['fetch_calls'], 1):,.0f}x fewer |",
        f"| | last delivery after the window opened | {seconds(plain['last_delivery'])} "
        f"| {seconds(shared['last_delivery'])} | "
        + (
            f"{plain['last_delivery'] / shared['last_delivery']:.0f}x sooner |"
            if plain["last_delivery"] and shared["last_delivery"]
            else "- |"
        ),
        f"| | the same with a 0 ms fetch and no SharedToken: the Scheduler's own floor "
        f"| {seconds(results['storm_floor']['last_delivery'])} | | |",
    ]
    for name, label in (
        ("files", "FileStore, 8 processes x 4 threads"),
        ("redis", "RedisStore, 16 processes"),
    ):
        if f"{name}_True" not in results:
            rows.append(f"| {label} | skipped: {results.get('redis_skipped')} | | | |")
            continue
        before, after = results[f"{name}_False"], results[f"{name}_True"]
        ratio = before["fetch_calls"] / max(after["fetch_calls"], 1)
        rows.append(
            f"| {label}, expired record | token requests | {before['fetch_calls']} "
            f"| {after['fetch_calls']} | {ratio:.0f}x fewer |"
        )
        rows.append(
            f"| | all callers served | {before['seconds']:.2f} s | {after['seconds']:.2f} s | |"
        )
    before, after = results["gunicorn_False"], results["gunicorn_True"]
    label = "gunicorn, 4 workers, e2e OAuth server, 3 s tokens refreshed every 2 s"
    if isinstance(after, str) or isinstance(before, str):
        rows.append(f"| {label} | skipped: {after if isinstance(after, str) else before} | | | |")
    else:
        ratio = before["fetch_calls"] / max(after["fetch_calls"], 1)
        rows.append(
            f"| {label} | token requests in {after['seconds']:.0f} s | {before['fetch_calls']} "
            f"| {after['fetch_calls']} | {ratio:.1f}x fewer |"
        )
    return rows


def report(results: Result, command: str, took: float) -> str:
    try:
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load = "unknown"
    lines = [
        "---",
        "orphan: true",
        "---",
        "",
        "# SharedToken performance",
        "",
        "What [`SharedToken`](guides/shared.md) saves, measured side by side in one run:",
        "the same scenario with a plain token request and with a `SharedToken` around it.",
        "Absolute times on a shared machine are only a guide; the token-request counts",
        "are exact.",
        "",
        f"- Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; the run took {took:.0f} s.",
        f"- Command: `{command}`",
        f"- Machine: {os.cpu_count()} cores, {platform.platform()}, CPython "
        f"{platform.python_version()}; load average {load} after the run.",
        "",
        *table(results),
        "",
        "The storm's floor is one second (the sessions fall due over one second) plus one",
        "fetch, or what the Scheduler itself needs to deliver that many tokens on this",
        "machine (the 0 ms row). Without sharing, the 4 workers take turns at 50 ms per",
        "request, so the last session waits for all the others' requests. Across processes,",
        "one lease holder fetches and every other caller reads its record.",
        "",
        "The gunicorn row counts token requests at the client, one line per request the",
        "workers send to the end-to-end OAuth server (oauth2-mock-server): with a shared",
        "`FileStore` one request per refresh period, where each worker would make its own.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="200 sessions, a few seconds")
    parser.add_argument("--out", type=Path, help="report (default docs/shared-performance.md)")
    args = parser.parse_args()
    sessions = 200 if args.smoke else 10_000
    out = args.out or (
        Path(tempfile.gettempdir()) / "token_refresh_smoke" / "shared-performance.md"
        if args.smoke
        else ROOT / "docs" / "shared-performance.md"
    )
    began = time.perf_counter()
    results = measure(sessions, 3.5 if args.smoke else 12.0)
    took = time.perf_counter() - began
    command = " ".join(["python", "benchmarks/shared.py", *sys.argv[1:]])
    text = report(results, command, took)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print("\n".join(table(results)))
    print(f"\nreport: {out}")
    claims = [
        results["storm_True"]["fetch_calls"] == 1,
        results["storm_True"]["delivered"] == sessions,
        results["files_True"]["fetch_calls"] == 1,
        "redis_skipped" in results or results["redis_True"]["fetch_calls"] == 1,
        isinstance(results["gunicorn_True"], str)
        or isinstance(results["gunicorn_False"], str)
        or results["gunicorn_True"]["fetch_calls"] < results["gunicorn_False"]["fetch_calls"],
    ]
    return 0 if all(claims) else 1


if __name__ == "__main__":
    sys.exit(main())
