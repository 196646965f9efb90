"""Benchmark token_refresh's timer backends against bare timers and APScheduler 3.

    python benchmarks/run.py            # full run: about 35 minutes on 2 cores,
                                        # most of it the storm rows, run 5 times
    python benchmarks/run.py --quick    # about 2 minutes: 2 s idle windows, fewer
                                        # rounds, lateness at N=10,000 for the
                                        # one-thread contenders only
    python benchmarks/run.py --smoke    # N=100 only, < 30 s, for CI; exit 1 if a
                                        # contender cannot run or a worker fails
    python benchmarks/run.py --storm    # only the storm rows, 30-40 minutes: 1,000 /
                                        # 5,000 / 10,000 refreshes due within 1 s,
                                        # each run 5 times, six contenders with the
                                        # floor; rewrites that one section of --out
    python benchmarks/run.py --baseline DIR   # also the token_refresh of another
                                        # checkout, interleaved, in every row
    python benchmarks/run.py --budget   # only the per-refresh budget, under a minute:
                                        # 1,000 refreshes due within 1 s, counting
                                        # locks, waits and context switches per
                                        # delivered refresh; rewrites that section
    python benchmarks/run.py --json results.json   # also keep the raw numbers
    python benchmarks/run.py --render results.json # rewrite the report from them

Needs ``pip install ".[bench]"`` (APScheduler 3, matplotlib). Every
measurement runs in a fresh ``benchmarks/_worker.py`` process, sizes in the
outer loop and contenders in the inner one, so that a noisy minute on a
shared machine hits every contender alike. The full run ends with the
storm rows (many refreshes due at once, timed at delivery), each repeated
(``--storm-repeats``, default 5): with thousands of threads due at once a
thread per session either keeps up or falls seconds behind, from one run to
the next, so one run per cell would be a coin toss. Beside them runs the
floor: one thread that calls the callback for each due session in deadline
order, what one thread can do. The per-refresh budget (``--budget``; also
in every full and smoke run) is a calm storm run in a process whose locks
are counted (``benchmarks/_budget.py``). The report (``--out``, default
docs/performance.md, with docs/_static/performance.png) gives ratios between
contenders measured in the same run, never times across runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
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

from _contenders import BASELINE, CONTENDERS
from _report import splice_sections, write_chart, write_markdown
from _worker import lateness_from_file

Result = dict[str, Any]
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "_worker.py"

#: The storm rows: N refreshes due within STORM_WINDOW seconds, delivered.
STORM_SIZES = [1000, 5000, 10_000]
STORM_CONTENDERS = [
    "token_refresh[thread]",
    "token_refresh[heap]",
    "floor",
    "bare Timer",
    "bare heap",
    "APScheduler",
]
STORM_WINDOW = 1.0
#: Seconds after the window that a storm run waits for the last deliveries.
STORM_DRAIN = 15.0
#: Runs of each storm cell; the report gives the median run and every run's figures.
STORM_REPEATS = 5
#: The per-refresh budget: contenders, and N refreshes due within STORM_WINDOW seconds.
BUDGET_CONTENDERS = ["token_refresh[heap]", "token_refresh[thread]", "floor", "bare heap"]
BUDGET_N = 1000
#: A checkout whose token_refresh the baseline[...] contenders import (--baseline).
BASELINE_TREE: Path | None = None


def run_worker(spec: Result, timeout: float, salvage: Callable[[], Result] | None = None) -> Result:
    """Run one measurement in a fresh process; never wait past ``timeout``.

    The worker's faulthandler ends it at ``timeout`` even when its main thread
    cannot get the GIL; ``salvage`` then recovers what it had recorded.
    """
    spec = {**spec, "timeout": timeout}
    env = None
    if str(spec.get("contender", "")).startswith("baseline["):
        if BASELINE_TREE is None:
            return {"error": "baseline contenders need --baseline DIR"}
        env = {**os.environ, "PYTHONPATH": str(BASELINE_TREE)}
    began = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, str(WORKER), json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout + 15,
            cwd=HERE,
            check=False,
            env=env,
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
            ["git", "-C", str(ROOT), "status", "--porcelain", "token_refresh", "benchmarks"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        found["git"] = commit + (
            " + uncommitted changes in token_refresh/ or benchmarks/" if dirty else ""
        )
    except (OSError, subprocess.CalledProcessError):
        found["git"] = "unknown"
    return found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", help="comma-separated N (default 100,1000,10000,100000)")
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="also run the storm and budget rows on the token_refresh of this checkout "
        "(contenders baseline[heap] and baseline[thread]), interleaved with the others",
    )
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
    parser.add_argument(
        "--storm",
        action="store_true",
        help="only the storm rows (N due within 1 s, timed at delivery); "
        "splice their section into --out",
    )
    parser.add_argument(
        "--storm-sizes", help="comma-separated N for the storm rows (default 1000,5000,10000)"
    )
    parser.add_argument(
        "--storm-repeats",
        type=int,
        help=f"runs of each storm cell (default {STORM_REPEATS}; --smoke: 1)",
    )
    parser.add_argument(
        "--budget",
        action="store_true",
        help="only the per-refresh budget (locks, waits, context switches per refresh); "
        "splice its section into --out (with --storm: both)",
    )
    parser.add_argument(
        "--budget-n",
        type=int,
        help=f"refreshes in the budget run (default {BUDGET_N:,}; --smoke: 100)",
    )
    parser.add_argument("--out", type=Path, help="Markdown report (default docs/performance.md)")
    parser.add_argument("--chart", type=Path, help="PNG (default docs/_static/performance.png)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument(
        "--render", type=Path, metavar="JSON", help="only rewrite the report from saved --json"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.baseline is not None:
        global BASELINE_TREE
        BASELINE_TREE = args.baseline.resolve()
        revision = subprocess.run(
            ["git", "-C", str(BASELINE_TREE), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        for name, entry in BASELINE.items():
            timers = name[len("baseline[") : -1]
            # In every phase: throughput and memory per session are compared too.
            CONTENDERS[name] = entry._replace(
                description=f"token_refresh at git `{revision or '?'}` (--baseline), "
                f"`timers={timers!r}`",
                storm_only=False,
            )
        STORM_CONTENDERS[2:2] = ["baseline[thread]", "baseline[heap]"]
        BUDGET_CONTENDERS[2:2] = ["baseline[heap]", "baseline[thread]"]
    if args.render:
        saved: Result = json.loads(args.render.read_text())
        out = args.out or ROOT / "docs" / "performance.md"
        chart = args.chart or (out.parent / "_static" / (out.stem + ".png"))
        if "runs" not in saved:  # a --storm or --budget run: their sections only
            out.parent.mkdir(parents=True, exist_ok=True)
            splice_sections(out, saved)
            print(f"rewrote {out} from {args.render}", file=sys.stderr)
            return 0
        chart.parent.mkdir(parents=True, exist_ok=True)
        write_chart(saved, chart)
        write_markdown(saved, out, chart)
        print(f"wrote {out} and {chart} from {args.render}", file=sys.stderr)
        return 0
    began = time.perf_counter()
    started_at = datetime.now(UTC)
    load_before = os.getloadavg()
    proc_loadavg_before = read_first_line("/proc/loadavg")
    steal_before = steal_seconds()
    sizes = [100, 1000, 10_000, 100_000]
    storm_sizes = parse_sizes(args.storm_sizes) if args.storm_sizes else STORM_SIZES
    storm_modes: tuple[str, ...] = ("calm", "busy")
    if args.smoke:
        # The storm path at N=100, calm only: CI checks that it runs, in under 30 s in all.
        storm_sizes = parse_sizes(args.storm_sizes) if args.storm_sizes else [100]
        storm_modes = ("calm",)
        sizes, lateness_sizes, idle, window, max_rounds = [100], [100], 0.3, 0.5, 5
        out = args.out or Path(tempfile.gettempdir()) / "token_refresh_smoke" / "performance.md"
    elif args.quick:
        if not args.storm:
            storm_sizes = []  # --storm runs them alone
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
    names = (
        args.contenders.split(",")
        if args.contenders
        else [name for name, entry in CONTENDERS.items() if not entry.storm_only]
    )
    unknown = [name for name in names if name not in CONTENDERS]
    if unknown:
        print(f"unknown contenders: {unknown}; choose from {list(CONTENDERS)}", file=sys.stderr)
        return 2

    probe = run_worker({"phase": "probe"}, timeout=60).get("status", {})
    print("contenders:", file=sys.stderr)
    for name in CONTENDERS:
        print(f"  {name:22} {probe.get(name, '?')}", file=sys.stderr)
    # Every contender that runs here; the storm and the budget take the floor from them.
    available = [name for name in CONTENDERS if str(probe.get(name, "")).startswith("ok")]
    storm_names = list(names if args.contenders else STORM_CONTENDERS)
    scratch = Path(tempfile.mkdtemp(prefix="token_refresh_bench_"))
    storm_window = STORM_WINDOW if not args.smoke else 0.5
    storm_drain = STORM_DRAIN if not args.smoke else 2.0
    storm_repeats = args.storm_repeats or (1 if args.smoke else STORM_REPEATS)

    budget_names = [
        name for name in (names if args.contenders else BUDGET_CONTENDERS) if name in available
    ]

    def budget() -> Result:
        return run_budget(
            budget_names,
            args.budget_n or (100 if args.smoke else BUDGET_N),
            scratch,
            window=storm_window,
            lead=0.25 if args.smoke else 0.5,
            drain=storm_drain,
        )

    def storm() -> Result:
        return run_storm(
            [name for name in storm_names if name in available],
            storm_sizes,
            storm_modes,
            scratch,
            window=storm_window,
            drain=storm_drain,
            lead=0.25 if args.smoke else 0.5,
            repeats=storm_repeats,
        )

    if args.storm or args.budget:
        phases = {"storm": storm} if args.storm else {}
        phases.update({"budget": budget} if args.budget else {})
        return sections_only(
            proc_loadavg_before, args, argv, out, began, started_at, load_before, probe, phases
        )

    # The floor is a reference for the storm rows only.
    runs: dict[str, dict[str, Result]] = {
        name: {} for name in names if not CONTENDERS[name].storm_only
    }
    for n in sizes:
        for name in (name for name in available if name in runs):
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
            lead = (0.25 if args.smoke else 1.0) + 1.5 * float(ops["schedule"]["seconds"])
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

    storm_load_before = os.getloadavg()
    storm_proc_before = read_first_line("/proc/loadavg")
    storm_runs = storm() if storm_sizes else {}
    storm_load_after = os.getloadavg()
    storm_proc_after = read_first_line("/proc/loadavg")
    budget_runs = budget()
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
            # With the running/total task counts, which the averages lag behind.
            "proc_loadavg": [proc_loadavg_before, read_first_line("/proc/loadavg")],
            "steal_seconds": steal_seconds() - steal_before,
            "sizes": sizes,
            "idle": idle,
            "window": window,
            "lateness_sizes": lateness_sizes,
            "smoke": args.smoke,
            "quick": args.quick,
        },
        "probe": probe,
        "contenders": {
            name: CONTENDERS[name].description
            for name in dict.fromkeys([*names, *storm_runs, *budget_runs])
        },
        "runs": runs,
        "budget": budget_runs,
    }
    if storm_runs:
        results["storm"] = storm_runs
        results["meta"].update(
            storm_sizes=storm_sizes,
            storm_window=storm_window,
            storm_drain=storm_drain,
            storm_repeats=storm_repeats,
            storm_load_before=storm_load_before,
            storm_load_after=storm_load_after,
            storm_proc_loadavg=[storm_proc_before, storm_proc_after],
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    chart.parent.mkdir(parents=True, exist_ok=True)
    write_chart(results, chart)
    write_markdown(results, out, chart)
    print(f"wrote {out} and {chart} in {elapsed:.0f} s", file=sys.stderr)
    broken = errors(runs) + errors(storm_runs, "storm ") + budget_errors(budget_runs)
    for line in broken:
        print("ERROR", line, file=sys.stderr)
    missing = [name for name in names if name not in available]
    if missing:
        print(f"unavailable contenders: {missing}", file=sys.stderr)
    # In CI (--smoke) a contender that cannot run is a failure: install ".[bench]".
    return 1 if broken or (args.smoke and missing) else 0


def errors(runs: Result, prefix: str = "") -> list[str]:
    """One line per worker that failed, from runs[name][n][phase] (and its repeats)."""
    return [
        f"{name} N={n} {prefix}{phase}: {each['error']}"
        for name, cells in runs.items()
        for n, cell in cells.items()
        for phase, result in cell.items()
        for each in result.get("runs", [result])
        if "error" in each
    ]


def budget_errors(budget: Result) -> list[str]:
    return [
        f"{name} budget: {result['error']}" for name, result in budget.items() if "error" in result
    ]


def steal_seconds() -> float:
    """CPU time the hypervisor gave to other guests, all CPUs (/proc/stat; 0 if unknown)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def runnable_elsewhere() -> int:
    """Tasks running or runnable on the machine right now, besides this one (/proc/loadavg)."""
    try:
        return int(read_first_line("/proc/loadavg").split()[3].split("/")[0]) - 1
    except (IndexError, ValueError):
        return -1


#: The fields of each storm run kept beside the median one.
RUN_FIELDS = (
    "p50_ms",
    "p99_ms",
    "gc",
    "max_ms",
    "fired",
    "unfired",
    "within_5s",
    "last_after_first_due_s",
    "cpu_seconds",
    "wall_seconds",
    "overran_seconds",
    "killed",
    "error",
    "runnable_before",
)


def median_run(repeats: list[Result]) -> Result:
    """The run with the median p99 (a run with refreshes never delivered ranks last).

    It carries every run's main figures in ``runs``, so that the report can
    show the spread, not only the middle.
    """

    def rank(result: Result) -> tuple[float, int]:
        if "error" in result or "p99_ms" not in result:
            return (math.inf, 1 << 62)
        return (float(result["p99_ms"]), int(result.get("unfired", 0)))

    ordered = sorted(repeats, key=rank)
    chosen = ordered[len(ordered) // 2]
    runs = [{key: run[key] for key in RUN_FIELDS if key in run} for run in repeats]
    return {**chosen, "runs": runs}


def run_storm(
    names: list[str],
    sizes: list[int],
    modes: tuple[str, ...],
    scratch: Path,
    *,
    window: float,
    drain: float,
    lead: float,
    repeats: int = 1,
) -> Result:
    """N refreshes due within ``window`` s, timed at delivery: runs[name][n][mode].

    Repeats outermost, then sizes, then contenders, each run in a fresh worker
    bounded by its timeout; a worker whose main thread never gets the GIL back
    is salvaged from its fire log. Each cell is the median of its repeats
    (``median_run``), with every repeat's figures in its ``runs``.
    """
    collected: dict[str, dict[str, dict[str, list[Result]]]] = {
        name: {str(n): {mode: [] for mode in modes} for n in sizes} for name in names
    }
    for repeat in range(repeats):
        storm_round(collected, names, sizes, modes, scratch, window, drain, lead, repeat)
    return {
        name: {
            n: {mode: median_run(found) for mode, found in cell.items()}
            for n, cell in cells.items()
        }
        for name, cells in collected.items()
    }


def run_budget(
    names: list[str], n: int, scratch: Path, *, window: float, lead: float, drain: float
) -> Result:
    """One calm storm run per contender, counted (``benchmarks/_budget.py``): budget[name]."""
    budget: Result = {}
    for name in names:
        log = str(scratch / f"budget-log-{name}".replace(" ", "-"))
        arming = n * CONTENDERS[name].arm_seconds
        spec = {"phase": "budget", "contender": name, "n": n, "window": window, "busy": False}
        spec.update(lead=lead + arming, drain=drain, log=log, close_limit=5.0)
        others = runnable_elsewhere()
        result = run_worker(spec, timeout=15 + lead + arming + window + drain + 5)
        result.update(contender=name, n=n, runnable_before=others)
        Path(log).unlink(missing_ok=True)
        budget[name] = result
        report_progress(name, n, "budget", result)
    return budget


def storm_round(
    collected: dict[str, dict[str, dict[str, list[Result]]]],
    names: list[str],
    sizes: list[int],
    modes: tuple[str, ...],
    scratch: Path,
    window: float,
    drain: float,
    lead: float,
    repeat: int,
) -> None:
    """One run of every storm cell, appended to ``collected[name][n][mode]``."""
    for n in sizes:
        for name in names:
            # All N must be armed before the first is due, or the storm starts while
            # the main thread is still scheduling and both slow down.
            scheduling = n * CONTENDERS[name].arm_seconds
            for mode in modes:
                log = str(scratch / f"storm-log-{name}-{n}-{mode}".replace(" ", "-"))
                spec = {"phase": "storm", "contender": name, "n": n, "window": window}
                spec.update(busy=mode == "busy", lead=lead + scheduling, drain=drain, log=log)
                spec.update(close_limit=5.0, seed=2 + repeat)  # other due times each round
                limit = 15 + lead + scheduling + window + drain + 5
                load, others = os.getloadavg()[0], runnable_elsewhere()
                storm = run_worker(
                    spec, timeout=limit, salvage=functools.partial(lateness_from_file, log, n)
                )
                storm.update(contender=name, n=n, busy=mode == "busy", load_1min_before=load)
                storm.update(runnable_before=others, repeat=repeat)
                Path(log).unlink(missing_ok=True)
                collected[name][str(n)][mode].append(storm)
                report_progress(name, n, f"storm {mode} #{repeat + 1}", storm)


def sections_only(
    proc_loadavg_before: str,
    args: argparse.Namespace,
    argv: list[str] | None,
    out: Path,
    began: float,
    started_at: datetime,
    load_before: tuple[float, float, float],
    probe: Result,
    phases: dict[str, Callable[[], Result]],
) -> int:
    """``--storm`` and/or ``--budget``: run them alone, rewrite only their sections of ``out``."""
    found = {phase: run() for phase, run in phases.items()}
    runs, budget = found.get("storm", {}), found.get("budget", {})
    elapsed = time.perf_counter() - began
    command = "python benchmarks/run.py" + "".join(
        f" {arg}" for arg in (argv if argv is not None else sys.argv[1:])
    )
    meta: Result = {
        "started": started_at.strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "elapsed": elapsed,
        "machine": describe_machine(),
        "versions": versions(),
        "smoke": args.smoke,
    }
    if "storm" in found:
        meta.update(
            storm_load_before=load_before,
            storm_load_after=os.getloadavg(),
            # With the running/total thread counts, which the averages lag behind.
            storm_proc_loadavg=[proc_loadavg_before, read_first_line("/proc/loadavg")],
            storm_sizes=sorted({int(n) for cells in runs.values() for n in cells}),
            storm_window=STORM_WINDOW if not args.smoke else 0.5,
            storm_drain=STORM_DRAIN if not args.smoke else 2.0,
            storm_repeats=max(
                (
                    len(r.get("runs", [r]))
                    for c in runs.values()
                    for m in c.values()
                    for r in m.values()
                ),
                default=1,
            ),
        )
    results: Result = {
        "meta": meta,
        "probe": probe,
        "contenders": {
            name: CONTENDERS[name].description for name in dict.fromkeys([*runs, *budget])
        },
        **found,
    }
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    splice_sections(out, results)
    print(
        f"rewrote the {' and '.join(found)} section(s) of {out} in {elapsed:.0f} s", file=sys.stderr
    )
    broken = errors(runs, "storm ") + budget_errors(budget)
    for line in broken:
        print("ERROR", line, file=sys.stderr)
    return 1 if broken or not all(found.values()) else 0


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
    elif phase == "budget" and result.get("fired"):
        summary = (
            f"per refresh: {result['acquires_per_refresh'] or 0:.1f} locks,"
            f" {result['waits_per_refresh'] or 0:.1f} waits,"
            f" {result['queue_ops_per_refresh'] or 0:.1f} queue ops,"
            f" {result['switches_per_refresh'] or 0:.1f} context switches;"
            f" fired {result['fired']}/{n}"
        )
    else:
        summary = (
            f"p50 {result['p50_ms']:.2f} ms  p99 {result['p99_ms']:.2f} ms  "
            f"fired {result['fired']}/{n}"
        )
        if phase.startswith("storm"):
            summary += (
                f"  max {result['max_ms']:.0f} ms  <=5 s {result['within_5s']:.1%}"
                f"  last {result['last_after_first_due_s']:.2f} s"
                + ("  (killed)" if result.get("killed") else "")
            )
    print(
        f"[{result.get('elapsed', 0):5.1f} s] {name:22} N={n:<7} {phase:10} {summary}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    sys.exit(main())
