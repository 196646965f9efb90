"""Benchmark token_refresh's timer backends against bare timers and APScheduler 3.

    python benchmarks/run.py            # full run: about 8-10 minutes on 2 cores
    python benchmarks/run.py --quick    # about 2 minutes: 2 s idle windows, fewer
                                        # rounds, lateness at N=10,000 for the
                                        # one-thread contenders only
    python benchmarks/run.py --smoke    # N=100 only, < 30 s, for CI; exit 1 if a
                                        # contender cannot run or a worker fails
    python benchmarks/run.py --json results.json   # also keep the raw numbers
    python benchmarks/run.py --render results.json # rewrite the report from them

Needs ``pip install ".[bench]"`` (APScheduler 3, matplotlib). Every
measurement runs in a fresh ``benchmarks/_worker.py`` process, sizes in the
outer loop and contenders in the inner one, so that a noisy minute on a
shared machine hits every contender alike. The report (``--out``, default
docs/performance.md, with docs/_static/performance.png) gives ratios between
contenders measured in the same run, never times across runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _contenders import CONTENDERS
from _report import write_chart, write_markdown
from _worker import lateness_from_file

Result = dict[str, Any]
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "_worker.py"


def run_worker(spec: Result, timeout: float, salvage: Callable[[], Result] | None = None) -> Result:
    """Run one measurement in a fresh process; never wait past ``timeout``.

    The worker's faulthandler ends it at ``timeout`` even when its main thread
    cannot get the GIL; ``salvage`` then recovers what it had recorded.
    """
    spec = {**spec, "timeout": timeout}
    began = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, str(WORKER), json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout + 15,
            cwd=HERE,
            check=False,
        )
        lines = done.stdout.strip().splitlines()
        result: Result = json.loads(lines[-1])
    except (subprocess.TimeoutExpired, IndexError, json.JSONDecodeError):
        if salvage is None:
            return {"error": f"no result within {timeout:.0f} s", "elapsed": timeout}
        result = salvage()
        result["killed"] = f"stopped at the {timeout:.0f} s limit; numbers from its fire log"
    result["elapsed"] = time.perf_counter() - began
    return result


def describe_machine() -> Result:
    """CPU, cores, memory, OS and Python, from /proc and the platform module."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return {
        "cpu": cpu,
        "nproc": len(os.sched_getaffinity(0)),
        "memory": memory,
        "os": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "max_map_count": read_first_line("/proc/sys/vm/max_map_count"),
        "threads_max": read_first_line("/proc/sys/kernel/threads-max"),
    }


def parse_sizes(text: str) -> list[int]:
    return [int(size.replace("_", "")) for size in text.split(",")]


def read_first_line(path: str) -> str:
    try:
        return Path(path).read_text().split("\n", 1)[0].strip()
    except OSError:
        return "?"


def versions() -> Result:
    """The versions under test, with the git state of the working tree."""
    found: Result = {}
    for package in ("token_refresh", "apscheduler"):
        try:
            from importlib.metadata import version

            found[package] = version(package)
        except Exception:
            found[package] = "not installed"
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "token_refresh"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        found["git"] = commit + (" + uncommitted changes in token_refresh/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        found["git"] = "unknown"
    return found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", help="comma-separated N (default 100,1000,10000,100000)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2 s idle, fewer rounds, lateness at 10,000 only, thread-per-session at <= 10,000",
    )
    parser.add_argument("--smoke", action="store_true", help="N=100 only, short windows (< 30 s)")
    parser.add_argument("--contenders", help="comma-separated subset of: " + ", ".join(CONTENDERS))
    parser.add_argument("--idle", type=float, help="seconds of idle CPU measurement (default 10)")
    parser.add_argument("--window", type=float, help="seconds the N refreshes fall due within")
    parser.add_argument("--lateness-sizes", help="comma-separated N for the lateness runs")
    parser.add_argument("--out", type=Path, help="Markdown report (default docs/performance.md)")
    parser.add_argument("--chart", type=Path, help="PNG (default docs/_static/performance.png)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument(
        "--render", type=Path, metavar="JSON", help="only rewrite the report from saved --json"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        saved: Result = json.loads(args.render.read_text())
        out = args.out or ROOT / "docs" / "performance.md"
        chart = args.chart or (out.parent / "_static" / (out.stem + ".png"))
        chart.parent.mkdir(parents=True, exist_ok=True)
        write_chart(saved, chart)
        write_markdown(saved, out, chart)
        print(f"wrote {out} and {chart} from {args.render}", file=sys.stderr)
        return 0
    began = time.perf_counter()
    started_at = datetime.now(UTC)
    load_before = os.getloadavg()
    sizes = [100, 1000, 10_000, 100_000]
    if args.smoke:
        sizes, lateness_sizes, idle, window, max_rounds = [100], [100], 0.3, 0.5, 5
        out = args.out or Path(tempfile.gettempdir()) / "token_refresh_smoke" / "performance.md"
    elif args.quick:
        lateness_sizes, idle, window, max_rounds = [10_000], 2.0, 2.0, 5
        out = args.out or ROOT / "docs" / "performance.md"
    else:
        lateness_sizes, idle, window, max_rounds = sizes, 10.0, 2.0, 20
        out = args.out or ROOT / "docs" / "performance.md"
    if args.sizes:
        sizes = parse_sizes(args.sizes)
        lateness_sizes = [n for n in sizes if args.quick is False or n == 10_000] or sizes[-1:]
    if args.lateness_sizes:
        lateness_sizes = parse_sizes(args.lateness_sizes)
    idle = args.idle if args.idle is not None else idle
    window = args.window if args.window is not None else window
    chart = args.chart or (out.parent / "_static" / (out.stem + ".png"))
    names = args.contenders.split(",") if args.contenders else list(CONTENDERS)
    unknown = [name for name in names if name not in CONTENDERS]
    if unknown:
        print(f"unknown contenders: {unknown}; choose from {list(CONTENDERS)}", file=sys.stderr)
        return 2

    probe = run_worker({"phase": "probe"}, timeout=60).get("status", {})
    print("contenders:", file=sys.stderr)
    for name in names:
        print(f"  {name:22} {probe.get(name, '?')}", file=sys.stderr)
    available = [name for name in names if str(probe.get(name, "")).startswith("ok")]

    runs: dict[str, dict[str, Result]] = {name: {} for name in names}
    scratch = Path(tempfile.mkdtemp(prefix="token_refresh_bench_"))
    for n in sizes:
        for name in available:
            cell: Result = {}
            runs[name][str(n)] = cell
            many_threads = CONTENDERS[name].thread_per_session
            if args.quick and many_threads and n > 10_000:
                # A thread per session fails near 22,000 here: the full run shows where.
                cell["ops"] = {"skipped": "--quick"}
                continue
            ops = run_worker(
                {"phase": "ops", "contender": name, "n": n, "idle": idle, "rounds": max_rounds},
                timeout=90 + idle + n * 2e-3,
            )
            cell["ops"] = ops
            report_progress(name, n, "ops", ops)
            if n not in lateness_sizes:
                continue
            if args.quick and many_threads:
                cell["calm"] = cell["busy"] = {"skipped": "--quick"}
                continue
            if "schedule" not in ops or "failed_at" in ops:
                cell["calm"] = cell["busy"] = {"skipped": "the ops run did not hold N sessions"}
                continue
            # Time to mint and schedule N before the first is due, with room to spare.
            lead = 1.0 + 1.5 * float(ops["schedule"]["seconds"])
            drain = max(3.0, n * 1e-4)  # after the window, for stragglers
            # Setup, the lead, the window, the drain, then close() (10 s at most).
            limit = 15 + lead + n * 2e-5 + window + drain + 10
            for mode in ("calm", "busy"):
                log = str(scratch / f"fire-log-{len(list(scratch.iterdir()))}")
                spec = {"phase": "lateness", "contender": name, "n": n, "window": window}
                spec.update(busy=mode == "busy", lead=lead, drain=drain, log=log)
                lateness = run_worker(
                    spec, timeout=limit, salvage=functools.partial(lateness_from_file, log, n)
                )
                lateness.update(contender=name, n=n, busy=mode == "busy")
                Path(log).unlink(missing_ok=True)
                cell[mode] = lateness
                report_progress(name, n, mode, lateness)

    shutil.rmtree(scratch, ignore_errors=True)
    elapsed = time.perf_counter() - began
    command = "python benchmarks/run.py" + "".join(
        f" {arg}" for arg in (argv if argv is not None else sys.argv[1:])
    )
    results: Result = {
        "meta": {
            "started": started_at.strftime("%Y-%m-%d %H:%M UTC"),
            "command": command,
            "elapsed": elapsed,
            "machine": describe_machine(),
            "versions": versions(),
            "load_before": load_before,
            "load_after": os.getloadavg(),
            "sizes": sizes,
            "idle": idle,
            "window": window,
            "lateness_sizes": lateness_sizes,
            "smoke": args.smoke,
            "quick": args.quick,
        },
        "probe": probe,
        "contenders": {name: CONTENDERS[name].description for name in names},
        "runs": runs,
    }
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    chart.parent.mkdir(parents=True, exist_ok=True)
    write_chart(results, chart)
    write_markdown(results, out, chart)
    print(f"wrote {out} and {chart} in {elapsed:.0f} s", file=sys.stderr)
    broken = [
        f"{name} N={n} {phase}: {result['error']}"
        for name, cells in runs.items()
        for n, cell in cells.items()
        for phase, result in cell.items()
        if "error" in result
    ]
    for line in broken:
        print("ERROR", line, file=sys.stderr)
    missing = [name for name in names if name not in available]
    if missing:
        print(f"unavailable contenders: {missing}", file=sys.stderr)
    # In CI (--smoke) a contender that cannot run is a failure: install ".[bench]".
    return 1 if broken or (args.smoke and missing) else 0


def report_progress(name: str, n: int, phase: str, result: Result) -> None:
    if "error" in result:
        summary = "ERROR " + str(result["error"])
    elif "failed_at" in result:
        summary = f"failed at {result['failed_at']}: {result.get('failure')}"
    elif phase == "ops":
        sched = result["schedule"]
        summary = (
            f"schedule {sched['ops_per_s']:,.0f}/s  rss/session {result['rss_per_session']:,.0f} B"
            f"  threads +{result['threads_added']}  close {result['close_seconds'] * 1000:,.1f} ms"
        )
    elif "skipped" in result:
        summary = "skipped"
    else:
        summary = (
            f"p50 {result['p50_ms']:.2f} ms  p99 {result['p99_ms']:.2f} ms  "
            f"fired {result['fired']}/{n}"
        )
    print(
        f"[{result.get('elapsed', 0):5.1f} s] {name:22} N={n:<7} {phase:5} {summary}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    sys.exit(main())
