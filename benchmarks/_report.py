"""Turn one run's results into docs/performance.md and a PNG chart.

The page is for users: which backend to pick and why, the figures, ratios
against the other contenders measured side by side, then method and caveats.
It judges nothing against targets (those live in the issues).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

Result = dict[str, Any]

HEAP = "token_refresh[heap]"
THREAD = "token_refresh[thread]"
BARE_HEAP = "bare heap"
BARE_TIMER = "bare Timer"
APS = "APScheduler"
FLOOR = "floor"
TARGET_N = 10_000  # the size the summary quotes, when measured
MANY_N = 100_000


# -- reading results ---------------------------------------------------------


def phase(results: Result, name: str, n: int, which: str) -> Result | None:
    """One worker's result, or None when it did not run."""
    found: Result | None = results["runs"].get(name, {}).get(str(n), {}).get(which)
    return found


def ok(result: Result | None) -> bool:
    return result is not None and not {"error", "failed_at", "skipped", "unavailable"} & set(result)


def ops_rate(results: Result, name: str, n: int, op: str) -> float | None:
    result = phase(results, name, n, "ops")
    if result is None or op not in result:
        return None
    return float(result[op]["ops_per_s"])


def op_p50(results: Result, name: str, n: int, op: str = "schedule") -> float | None:
    """The median time of one call, in microseconds."""
    result = phase(results, name, n, "ops")
    if result is None or op not in result:
        return None
    return float(result[op]["p50_us"])


def schedule_cancel_rate(results: Result, name: str, n: int) -> float | None:
    """Schedule N then cancel N: operations per second over both."""
    result = phase(results, name, n, "ops")
    if result is None or "schedule" not in result or "cancel" not in result:
        return None
    seconds = float(result["schedule"]["seconds"]) + float(result["cancel"]["seconds"])
    return 2 * n / seconds


def ops_value(results: Result, name: str, n: int, key: str) -> float | None:
    result = phase(results, name, n, "ops")
    if not ok(result) or result is None or key not in result:
        return None
    return float(result[key])


def lateness(results: Result, name: str, n: int, mode: str, key: str) -> float | None:
    result = phase(results, name, n, mode)
    if result is None or key not in result or not result.get("fired"):
        return None
    value = float(result[key])
    return value if math.isfinite(value) else None


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def failure_n(results: Result, name: str) -> int | None:
    """The number of sessions a contender held when the OS refused a thread."""
    for cell in results["runs"].get(name, {}).values():
        ops = cell.get("ops", {})
        if "failed_at" in ops:
            return int(ops["failed_at"])
    return None


# -- formatting --------------------------------------------------------------


def sig(value: float, digits: int = 3) -> str:
    """``value`` with ``digits`` significant digits, thousands separated."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:,.{decimals}f}"


def rate(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1e6:
        return f"{sig(value / 1e6)}M/s"
    if value >= 1e3:
        return f"{sig(value / 1e3)}k/s"
    return f"{sig(value)}/s"


def size(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{sig(value / 1024)} KiB" if abs(value) >= 1024 else f"{value:,.0f} B"


def millis(value: float) -> str:
    """Milliseconds of lateness; infinite for a refresh that never ran."""
    return "never" if math.isinf(value) else sig(value, 2)


def times(value: float | None) -> str:
    return "-" if value is None else f"{sig(value, 2)}x"


def blank(result: Result | None) -> str | None:
    """Why a cell has no numbers, or None if it has."""
    if result is None:
        return "-"
    if "unavailable" in result:
        return "n/a"
    if "failed_at" in result:
        return f"**failed at N≈{int(result['failed_at']):,}**"
    if "error" in result:
        return "error: " + str(result["error"])[:60]
    if "skipped" in result:
        return "skipped"
    return None


def table(
    results: Result, names: list[str], sizes: list[int], render: Callable[[str, int], str]
) -> list[str]:
    header = "| contender | " + " | ".join(f"N = {n:,}" for n in sizes) + " |"
    lines = [header, "| --- |" + " ---: |" * len(sizes)]
    for name in names:
        cells = [render(name, n) for n in sizes]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


# -- the Markdown report -----------------------------------------------------


def ops_cell(results: Result, op: str) -> Callable[[str, int], str]:
    def render(name: str, n: int) -> str:
        result = phase(results, name, n, "ops")
        if result is not None and op in result:
            entry = result[op]
            return (
                f"{rate(entry['ops_per_s'])} "
                f"({sig(entry['p50_us'], 2)} / {sig(entry['p99_us'], 2)} µs)"
            )
        return blank(result) or "-"

    return render


def lateness_cell(results: Result, mode: str) -> Callable[[str, int], str]:
    def render(name: str, n: int) -> str:
        result = phase(results, name, n, mode)
        why = blank(result)
        if why is not None or result is None:
            return why or "-"
        text = f"{millis(result['p50_ms'])} / {millis(result['p99_ms'])}"
        notes = []
        missed, unfired = int(result.get("missed", 0)), int(result.get("unfired", 0))
        if missed:
            notes.append(f"{missed:,} missed")
        if unfired > missed:
            notes.append(f"{unfired - missed:,} {'more ' if missed else ''}never ran")
        if result.get("overran_seconds", -1) > 0:
            notes.append("scheduling overran")
        if result.get("killed"):
            notes.append("stopped at its time limit")
        return text + (f" ({', '.join(notes)})" if notes else "")

    return render


def ratio_lines(results: Result, sizes: list[int]) -> list[str]:
    lines = []
    for n in sizes:
        heap = schedule_cancel_rate(results, HEAP, n)
        peers = [
            f"{times(ratio(heap, schedule_cancel_rate(results, peer, n)))} {peer}"
            for peer in (APS, BARE_HEAP, THREAD, BARE_TIMER)
            if schedule_cancel_rate(results, peer, n) is not None
        ]
        # Below 1,000 sessions the RSS delta is within a few pages: not a ratio worth taking.
        rss = ops_value(results, HEAP, n, "rss_per_session") if n >= 1000 else None
        rss_peers = [
            f"{times(ratio(rss, ops_value(results, peer, n, 'rss_per_session')))} {peer}"
            for peer in (APS, BARE_HEAP, THREAD)
            if ops_value(results, peer, n, "rss_per_session")
        ]
        thread_cost = ratio(op_p50(results, THREAD, n), op_p50(results, BARE_TIMER, n))
        parts = []
        if heap is not None and peers:
            parts.append("heap backend schedule+cancel throughput = " + ", ".join(peers))
        if rss is not None and rss_peers:
            parts.append("its RSS per pending session = " + ", ".join(rss_peers))
        if thread_cost is not None:
            parts.append(
                f"thread backend's median schedule() call = {times(thread_cost)} a bare Timer's"
            )
        parts += baseline_ratios(results, n)
        if parts:
            lines.append(f"- **N = {n:,}**: " + "; ".join(parts) + ".")
    return [*lines, ""]


def baseline_ratios(results: Result, n: int) -> list[str]:
    """Each backend against the same backend of the --baseline checkout, if it ran."""
    parts = []
    for backend in ("heap", "thread"):
        ours, theirs = f"token_refresh[{backend}]", f"baseline[{backend}]"
        rate_ratio = ratio(
            schedule_cancel_rate(results, ours, n), schedule_cancel_rate(results, theirs, n)
        )
        ours_rss = ops_value(results, ours, n, "rss_per_session") if n >= 1000 else None
        rss_ratio = ratio(ours_rss, ops_value(results, theirs, n, "rss_per_session"))
        if rate_ratio is not None:
            text = f"{backend} backend against {theirs}: schedule+cancel {times(rate_ratio)}"
            if rss_ratio is not None:
                text += f", RSS per pending session {times(rss_ratio)}"
            parts.append(text)
    return parts


def run_lines(results: Result) -> list[str]:
    """Date, command, machine, load and versions: the "This run" list."""
    meta = results["meta"]
    machine = meta["machine"]
    load_before = ", ".join(f"{value:.2f}" for value in meta["load_before"])
    load_after = ", ".join(f"{value:.2f}" for value in meta["load_after"])
    lines = [
        f"- Date: {meta['started']}; the run took **{meta['elapsed'] / 60:.1f} minutes**.",
        f"- Command: `{meta['command']}`",
        f"- Commit: token_refresh {meta['versions'].get('token_refresh')}, git "
        f"`{meta['versions'].get('git')}`; {machine['python']}; APScheduler "
        f"{meta['versions'].get('apscheduler')}.",
        f"- Machine: {machine['cpu']}, {machine['nproc']} cores (`nproc`), "
        f"{machine['memory']} RAM; {machine['os']}.",
        f"- Load average (1, 5, 15 minutes): {load_before} before the run, {load_after} after"
        " it. Linux counts every runnable thread, so the thousands of timer threads this",
        "  run wakes at once raise it too: the figure after is mostly the run's own. The 5-",
        "  and 15-minute figures lag: before the run they still carry any earlier run's",
        "  storms; the 1-minute one, and the running/total task counts below, show the start.",
    ]
    if "proc_loadavg" in meta:
        first, last = meta["proc_loadavg"]
        lines.append(f"- `/proc/loadavg` before: `{first}`; after: `{last}`.")
    if "steal_seconds" in meta:
        lines.append(
            f"- CPU time taken by the hypervisor for other guests during the run (steal, "
            f"`/proc/stat`): {meta['steal_seconds']:.1f} s, "
            f"{meta['steal_seconds'] / max(meta['elapsed'] * machine['nproc'], 1e-9):.1%} of"
            " the CPU time the run had."
        )
    lines.append(
        f"- Limits: `vm.max_map_count` = {machine['max_map_count']}, "
        f"`kernel.threads-max` = {machine['threads_max']}."
    )
    return lines


def write_markdown(results: Result, out: Path, chart: Path) -> None:
    meta = results["meta"]
    machine = meta["machine"]
    sizes: list[int] = meta["sizes"]
    names = [name for name in results["contenders"] if name in results["runs"]]
    lines = [
        # Generated: keep sphinx-build -W quiet whether or not a toctree lists it.
        "---",
        "orphan: true",
        "---",
        "",
        "# Performance",
        "",
        "Which of `token_refresh`'s two timer backends to use, and the figures behind the",
        "choice: both backends measured side by side, in one run, with a bare",
        "`threading.Timer` per session, a bare heap-and-`Condition` timer thread (the best",
        "case for one thread) and APScheduler 3.",
        "",
        f"Measured {meta['started']} on git `{meta['versions'].get('git')}`, "
        f"{machine['cpu']} with {machine['nproc']} cores, 1-minute load average "
        f"{meta['load_before'][0]:.2f} before the run; [This run](#this-run) has the details.",
        "Absolute times are this machine's; the ratios between contenders, measured in the",
        "same run, are what carries over to yours.",
        "",
    ]
    lines += pick_section(results)
    image = Path(os.path.relpath(chart, out.parent)).as_posix()
    lines += [
        "## The two backends at a glance",
        "",
        "Per call and per pending session, from the [results](#results) below.",
        "",
        *summary_table(results),
        f"![throughput, memory, lateness, close() and threads against N]({image})",
        "",
        "## Against the other contenders",
        "",
        "| contender | what it is |",
        "| --- | --- |",
    ]
    for name, description in results["contenders"].items():
        status = str(results["probe"].get(name, ""))
        suffix = "" if status.startswith("ok") else f" — *{status}*"
        lines.append(f"| {name} | {description}{suffix} |")
    lines += [
        "",
        "Ratios between contenders measured in this same run (above 1x: the heap backend",
        "does more per second, or takes more memory).",
        "",
    ]
    lines += ratio_lines(results, sizes)
    if results.get("storm"):
        lines += storm_section(results)
    if results.get("budget"):
        lines += budget_section(results)
    lines += [
        "## Results",
        "",
    ]
    sections: list[tuple[str, str, Callable[[str, int], str]]] = [
        ("schedule()", "Throughput (p50 / p99 latency per call).", ops_cell(results, "schedule")),
        (
            "Reschedule",
            "`schedule()` again for a pending session.",
            ops_cell(results, "reschedule"),
        ),
        ("cancel()", "Cancel a pending session.", ops_cell(results, "cancel")),
    ]
    for title, caption, render in sections:
        lines += [f"### {title}", "", caption, "", *table(results, names, sizes, render)]

    def combined(name: str, n: int) -> str:
        value = schedule_cancel_rate(results, name, n)
        return rate(value) if value is not None else (blank(phase(results, name, n, "ops")) or "-")

    lines += ["### schedule + cancel", "", "2N operations over the two loops' time.", ""]
    lines += table(results, names, sizes, combined)

    def memory(name: str, n: int) -> str:
        result = phase(results, name, n, "ops")
        why = blank(result)
        if why is not None or result is None:
            return why or "-"
        return f"{size(result['rss_per_session'])}, +{result['threads_added']:,} thr."

    lines += [
        "### Memory and threads",
        "",
        "RSS per pending session; threads added (below N = 1,000 the RSS delta is a few",
        "pages, within the noise).",
        "",
    ]
    lines += table(results, names, sizes, memory)

    def idle_cpu(name: str, n: int) -> str:
        result = phase(results, name, n, "ops")
        why = blank(result)
        if why is not None or result is None:
            return why or "-"
        per_second = result["idle_cpu_seconds"] / result["idle_seconds"] * 1000
        text = f"{sig(per_second, 2)} ms/s ({result['idle_switches']} cs)"
        if "idle_scheduler_cpu_seconds" in result:  # absent in results from before it existed
            own = result["idle_scheduler_cpu_seconds"] / result["idle_seconds"] * 1000
            text += f"; its threads {sig(own, 2)} ms/s"
        return text

    lines += [
        "### Idle CPU",
        "",
        "CPU milliseconds per second while idle with N pending: the whole process (its",
        "context switches), then the scheduler's own threads alone.",
        "",
    ]
    lines += table(results, names, sizes, idle_cpu)

    def close_time(name: str, n: int) -> str:
        result = phase(results, name, n, "ops")
        why = blank(result)
        if why is not None or result is None:
            return why or "-"
        return f"{sig(result['close_seconds'] * 1000, 2)} ms"

    lines += ["### close()", "", "Time for `close()` (or its equivalent) with N pending.", ""]
    lines += table(results, names, sizes, close_time)
    lateness_sizes: list[int] = meta["lateness_sizes"]
    for mode, title in (("calm", "calm"), ("busy", "with a CPU-bound thread")):
        lines += [
            f"### Firing lateness, {title}",
            "",
            f"p50 / p99 milliseconds for N refreshes due within {meta['window']:g} s, timed",
            "where `get_access_token` starts (one run each).",
            "",
        ]
        lines += table(results, names, lateness_sizes, lateness_cell(results, mode))
    lines += notes(results, names)
    lines += [
        "## How it is measured",
        "",
        "Every (contender, N, measurement) runs in a fresh process "
        "(`benchmarks/_worker.py`); sizes are the outer loop, contenders the inner one.",
        "",
        "- **Operations.** N sessions are scheduled an hour or two out (random due times,",
        "  random order), then rescheduled 60 s later, then cancelled; each call is timed",
        "  with `perf_counter_ns`. Throughput is N over the loop's wall time (the median of",
        "  up to 20 rounds at small N); `(p50 / p99)` is the per-call latency.",
        "  *schedule+cancel* is 2N over both loops. token_refresh",
        "  is driven through `schedule(session_id, jwt)` with `refresh_buffer=0`, so its",
        "  times include decoding the JWT (minted before the clock starts); the others get",
        "  the due time directly. APScheduler gets `add_job` with a `DateTrigger`,",
        "  `reschedule_job` and `remove_job`.",
        "- **Memory and threads.** RSS (`VmRSS` in /proc/self/status) after the scheduler is",
        "  built and before the N are scheduled, and again after them (following",
        "  `gc.collect()`), divided by N; threads are /proc's count minus the count before",
        "  the scheduler was built.",
        f"- **Idle CPU.** User+system CPU time of the whole process (`getrusage`) over "
        f"{meta['idle']:g} s",
        "  of sleep with N pending, and the context switches in that time; and the run time",
        "  of the threads the scheduler started (`/proc/self/task/<tid>/schedstat`).",
        "- **close()** with N pending (scheduled again after the cancel loop).",
        f"- **Firing lateness.** N sessions due at random instants within {meta['window']:g} s,",
        "  all scheduled before the first is due; lateness is the wall time at which the",
        "  user's code starts minus the due time. For token_refresh that is the moment",
        "  `get_access_token()` is called on a worker thread (an `on_event` hook tells it",
        "  which session); for APScheduler, the job function on its pool; for the bare",
        "  timers, the callback on the timer thread. *Busy*: a pure-Python busy loop runs in",
        "  another thread of the same process while the timers fire (the GIL switch",
        "  interval is 5 ms). APScheduler's `misfire_grace_time` (1 s) makes it drop jobs",
        "  that are later than that; they count as *missed*.",
        "  Lateness is measured at N = "
        + ", ".join(f"{n:,}" for n in meta["lateness_sizes"])
        + ", one run each.",
        "- **Many refreshes due at once**: see [its section](#many-refreshes-due-at-once).",
        "- **What one refresh costs**: see [its section](#what-one-refresh-costs).",
        "",
        "## Caveats",
        "",
        "- **Compare within a run.** Absolute times depend on the machine and its",
        "  neighbours; a noisy minute can slow one contender and not the next. The ratios",
        "  between contenders measured in one run are the result; rerun",
        "  (`python benchmarks/run.py`) before trusting one near a decision of yours.",
        "- **A thread per session** costs an OS thread per pending session: RSS for its",
        "  stack pages and thread state, a `start()` that waits for the new thread,",
        "  a `close()` that joins every one, and a hard ceiling: at about three memory",
        "  mappings per thread, `vm.max_map_count` stops the process near 22,000 threads",
        "  here (a container's pids limit or systemd's `TasksMax` can stop it far sooner).",
        "  When thousands of them fall due within seconds they all wake and contend for",
        "  the GIL, so their lateness varies wildly from run to run, up to refreshes that",
        "  were never delivered before the run stopped waiting.",
        "- **The CPU-bound thread** gives up the GIL only when the 5 ms switch interval",
        "  forces it. A bare timer pays that wait once per fire; token_refresh and",
        "  APScheduler hand each fire from their timer thread to a worker pool, and can pay",
        "  it twice.",
        "- **An idle CPU wakes slowly.** On this machine, a virtual one whose idle CPUs",
        "  halt, a thread woken on a CPU idle for more than about 0.2 ms ran 0.13-0.16 ms",
        "  later, on one idle for less within 0.01 ms (`perf sched timehist`, 2026-12-07).",
        "  A contender that does less per refresh leaves the CPUs idle for longer, and in",
        "  the calm 1,000 row can lose a tenth of a millisecond to one that does more.",
        "  Measured on 2026-12-07 (git 49a55cb against f6110b4 as `--baseline`, `--storm",
        "  --storm-sizes 1000`, 5 runs each), calm p99: the thread backend 0.62 ms against",
        "  f6110b4's 0.56 ms, the heap backend 0.70 against 0.83 ms; with two processes",
        "  that sleep 50 µs in a loop keeping both CPUs awake (`while True:",
        "  time.sleep(5e-5)`), 0.19 against 0.21 ms and 0.16 against 0.16 ms.",
        f"- **{max(lateness_sizes):,} due within {meta['window']:g} s** is "
        f"{max(lateness_sizes) / max(float(meta['window']), 1e-9):,.0f} refreshes a second:",
        "  at that rate the one-thread contenders fall behind, and lateness measures",
        "  refresh throughput, not timer precision.",
        "- **Single runs.** The operations and *firing lateness* tables come from one run",
        "  per cell; only the storm rows are repeated.",
        "- **Three runs are few.** Beside a CPU-bound thread the heap backend fell",
        "  behind now and then. Measured on 2026-12-06 (git 1063928), 58 runs of 10,000",
        "  due within a second (15 storm rows, 43 runs of a plain script with the same",
        "  storm): one had a p99 of 5.9 s, and one delivered 3,689 of 10,000 in 20 s,",
        "  after more workers had joined the backlog 29 times (in the 42 others, never).",
        "  One token request that took 100 ms did the same in 5 runs of 5: the worker",
        "  back from it kept draining beside the one that joined, and two drainers",
        "  contend for every lock. Now it leaves the rest to the other: all delivered,",
        "  p99 0.6-0.9 s, in 4 runs of 4. The rare collapse without a slow request is",
        "  not measured again yet.",
        "",
        "## This run",
        "",
        *run_lines(results),
        "",
    ]
    out.write_text("\n".join(lines).rstrip() + "\n")


def notes(results: Result, names: list[str]) -> list[str]:
    """Failures, missed fires and other things a reader should not miss."""
    found = []
    for name in names:
        failed = failure_n(results, name)
        if failed is not None:
            cell = next(
                cell["ops"]
                for cell in results["runs"][name].values()
                if "failed_at" in cell.get("ops", {})
            )
            found.append(
                f"- **{name}** could not hold more than about {failed:,} pending sessions: "
                f"{cell['failure']}."
            )
        for n, cell in results["runs"].get(name, {}).items():
            for which, result in cell.items():
                if "error" in result:
                    found.append(f"- {name}, N = {int(n):,}, {which}: {result['error']}.")
                missed, unfired = int(result.get("missed", 0)), int(result.get("unfired", 0))
                if missed:
                    found.append(
                        f"- {name}, N = {int(n):,}, {which}: {missed:,} of {int(n):,} jobs "
                        "were dropped as missed (later than its 1 s misfire_grace_time)."
                    )
                if unfired > missed:
                    found.append(
                        f"- {name}, N = {int(n):,}, {which}: {unfired - missed:,} of "
                        f"{int(n):,} refreshes had not started when the run stopped waiting "
                        f"({result.get('window', 2):g} s window + "
                        f"{max(3.0, int(n) * 1e-4):g} s)."
                    )
                if result.get("killed"):
                    found.append(
                        f"- {name}, N = {int(n):,}, {which}: the worker's main thread did not "
                        "get the GIL back in time; it was "
                        + str(result["killed"]).replace("numbers", "the numbers come")
                        + "."
                    )
                if result.get("overran_seconds", -1) > 0:
                    found.append(
                        f"- {name}, N = {int(n):,}, {which}: scheduling N took "
                        f"{result['schedule_seconds']:.1f} s and ran "
                        f"{result['overran_seconds']:.1f} s into the window."
                    )
    return ["## Notes", "", *found, ""] if found else []


# -- the chart ---------------------------------------------------------------

STYLES = {
    HEAP: ("tab:blue", "o"),
    THREAD: ("tab:orange", "s"),
    BARE_HEAP: ("tab:green", "^"),
    BARE_TIMER: ("tab:red", "v"),
    APS: ("tab:purple", "D"),
}


def write_chart(results: Result, path: Path) -> None:
    """Six log-log panels against N, one line per contender."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes: list[int] = results["meta"]["sizes"]
    lateness_sizes: list[int] = results["meta"]["lateness_sizes"]
    names = [name for name in results["contenders"] if name in results["runs"]]
    figure, axes = plt.subplots(3, 2, figsize=(12, 12.5))

    def close_ms(name: str, n: int) -> float | None:
        value = ops_value(results, name, n, "close_seconds")
        return None if value is None else value * 1000

    def threads(name: str, n: int) -> float | None:
        return ops_value(results, name, n, "threads_added")

    panels: list[tuple[Any, str, str, list[int], Callable[[str, int], float | None]]] = [
        (
            axes[0][0],
            "schedule + cancel throughput (higher is better)",
            "operations / s",
            sizes,
            lambda name, n: schedule_cancel_rate(results, name, n),
        ),
        (
            axes[0][1],
            "RSS per pending session",
            "bytes",
            sizes,
            lambda name, n: ops_value(results, name, n, "rss_per_session"),
        ),
        (
            axes[1][0],
            "firing lateness p99, calm",
            "milliseconds",
            lateness_sizes,
            lambda name, n: lateness(results, name, n, "calm", "p99_ms"),
        ),
        (
            axes[1][1],
            "firing lateness p99, CPU-bound thread running",
            "milliseconds",
            lateness_sizes,
            lambda name, n: lateness(results, name, n, "busy", "p99_ms"),
        ),
        (axes[2][0], "close() with N pending", "milliseconds", sizes, close_ms),
        (axes[2][1], "threads added with N pending", "threads", sizes, threads),
    ]
    for axis, title, unit, xs, value in panels:
        for name in names:
            color, marker = STYLES.get(name, ("black", "."))
            kept = [(n, v) for n in xs if (v := value(name, n)) is not None and v > 0]
            failed = failure_n(results, name)
            label = name + (f" (failed at N≈{failed / 1000:.0f}k)" if failed else "")
            if kept:
                axis.plot(*zip(*kept, strict=True), marker=marker, color=color, label=label)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlim(min(sizes) / 1.6, max(sizes) * 1.6)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("pending sessions N")
        axis.set_ylabel(unit)
        axis.grid(True, which="both", alpha=0.3)
    for axis, mode in ((axes[1][0], "calm"), (axes[1][1], "busy")):
        mark_never_ran(axis, results, names, lateness_sizes, mode)
    axes[0][0].legend(fontsize=8, loc="lower left")
    meta = results["meta"]
    figure.suptitle(
        f"token_refresh benchmarks, {meta['started']}: {meta['machine']['nproc']} cores, "
        f"{meta['machine']['python']} (log-log)",
        fontsize=11,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def mark_never_ran(
    axis: Any, results: Result, names: list[str], sizes: list[int], mode: str
) -> None:
    """Put an open marker at the top of the panel where over 1% of refreshes never ran."""
    top = axis.get_ylim()[1]
    row = 0
    for name in names:
        color, marker = STYLES.get(name, ("black", "."))
        for n in sizes:
            result = phase(results, name, n, mode) or {}
            lost = int(result.get("unfired", 0) or 0)
            if lost and lateness(results, name, n, mode, "p99_ms") is None:
                axis.plot([n], [top], marker=marker, color=color, fillstyle="none", clip_on=False)
                axis.annotate(
                    f"{name}: {lost:,}/{n:,} never ran",
                    (n, top),
                    textcoords="offset points",
                    xytext=(-8, -12 - 10 * row),
                    ha="right",
                    fontsize=7,
                    color=color,
                )
                row += 1
    axis.set_ylim(top=top)


# -- which backend to pick ---------------------------------------------------


def pick_size(sizes: list[int], wanted: int, fallback: Callable[[list[int]], int]) -> int:
    return wanted if wanted in sizes else fallback(sizes)


def sentence(*parts: str | None) -> str | None:
    """The parts joined, or None if any is missing (a figure this run did not measure)."""
    if any(part is None for part in parts):
        return None
    return "".join(part for part in parts if part is not None)


def fig(value: float | None, render: Callable[[float], str]) -> str | None:
    return None if value is None else render(value)


def us(value: float) -> str:
    return f"{sig(value, 2)} µs"


def ms(value: float) -> str:
    return f"{sig(value, 2)} ms"


def runs_phrase(results: Result) -> str:
    repeats = int(results["meta"].get("storm_repeats", 1))
    return "in one run" if repeats == 1 else f"the worst of {repeats} runs"


def pick_section(results: Result) -> list[str]:
    """ "Which backend to pick": the choice, and this run's figures that show why."""
    meta = results["meta"]
    sizes: list[int] = meta["sizes"]
    big = pick_size(sizes, TARGET_N, max)
    many = max(sizes)
    storm_sizes: list[int] = meta.get("storm_sizes", []) if results.get("storm") else []
    few = pick_size(storm_sizes, 1000, min) if storm_sizes else None
    mid = 5000 if 5000 in storm_sizes else None
    top = max(storm_sizes) if storm_sizes else None
    worst = runs_phrase(results)

    def worst_p99(name: str, n: int | None, mode: str) -> str | None:
        if n is None:
            return None
        values = storm_p99s(results, name, n, mode)
        if not values:
            return None
        if math.isinf(max(values)):
            return f"more than {storm_wait(results):g} s (over 1% never delivered)"
        return seconds(max(values))

    thread_few = sentence(
        f"- {few:,} refreshes due within the same second were delivered with a p99 lateness of "
        if few
        else None,
        worst_p99(THREAD, few, "calm"),
        " calm and ",
        worst_p99(THREAD, few, "busy"),
        f" beside a CPU-bound thread ({worst}; the heap backend: ",
        worst_p99(HEAP, few, "calm"),
        " and ",
        worst_p99(HEAP, few, "busy"),
        ").",
    )
    ceiling = failure_n(results, THREAD)
    thread_cost = sentence(
        "- Each pending session costs an OS thread and ",
        fig(ops_value(results, THREAD, big, "rss_per_session"), size),
        f" of memory (N = {big:,}); `schedule()` starts a thread (",
        fig(op_p50(results, THREAD, big), us),
        " a call, median, against ",
        fig(op_p50(results, HEAP, big), us),
        " with the heap backend) and `close()` joins every one (",
        fig(ops_value(results, THREAD, big, "close_seconds"), lambda v: ms(v * 1000)),
        f" with {big:,} pending, against ",
        fig(ops_value(results, HEAP, big, "close_seconds"), lambda v: ms(v * 1000)),
        ")."
        + (
            f" A process can start only so many threads: here `schedule()` raised"
            f" `RuntimeError` near {ceiling:,} pending sessions (`vm.max_map_count`;"
            " a systemd `TasksMax` can stop it far sooner)."
            if ceiling
            else ""
        ),
    )
    heap_cost = sentence(
        "- One timer thread serves every session (with the process-wide clock watcher, and"
        " the worker pool, `max_workers=4`, once refreshes run, as for the thread backend): ",
        fig(ops_value(results, HEAP, big, "rss_per_session"), size),
        f" per pending session at N = {big:,}, ",
        fig(
            ops_value(results, HEAP, many, "threads_added"),
            lambda v: f"+{v:.0f} thread" + ("" if v == 1 else "s"),
        ),
        f" with {many:,} pending, and ",
        fig(schedule_cancel_rate(results, HEAP, big), rate),
        " schedule + cancel (",
        fig(
            ratio(
                schedule_cancel_rate(results, HEAP, big), schedule_cancel_rate(results, THREAD, big)
            ),
            times,
        ),
        " the thread backend's, ",
        fig(
            ratio(
                schedule_cancel_rate(results, HEAP, big), schedule_cancel_rate(results, APS, big)
            ),
            times,
        ),
        " APScheduler's).",
    )
    heap_storm = sentence(
        f"- {top:,} refreshes due within one second: p99 " if top else None,
        worst_p99(HEAP, top, "calm"),
        " calm and ",
        worst_p99(HEAP, top, "busy"),
        f" beside a CPU-bound thread ({worst}).",
    )
    thread_storm = sentence(
        f"  With a thread per session, {mid:,} due within a second gave a p99 of " if mid else None,
        storm_spread(results, THREAD, mid, "calm") if mid else None,
        " calm, run to run",
        (
            f", and at {top:,}: " + (storm_spread(results, THREAD, top, "calm") or "-")
            if top and top != mid
            else ""
        ),
        ". Thousands of threads that wake together fight over the GIL; a run either keeps"
        " up or falls seconds behind (see"
        " [Many refreshes due at once](#many-refreshes-due-at-once)).",
    )
    idle = sentence(
        "Neither backend uses measurable CPU while it waits: ",
        fig(idle_ms_per_s(results, THREAD, big), lambda v: f"{sig(v, 2)} ms"),
        " (thread) and ",
        fig(idle_ms_per_s(results, HEAP, big), lambda v: f"{sig(v, 2)} ms"),
        f" (heap) of CPU per second for the whole process with {big:,} sessions pending.",
    )
    lines = [
        "## Which backend to pick",
        "",
        "Both backends have the same API and keep the same guarantees; `timers=` changes",
        "only how the scheduler waits for the next refresh. They differ in what a pending",
        "session costs, and in what happens when many refreshes fall due at once.",
        "",
        '**Keep the default, `timers="thread"`,** when the process holds up to about a',
        "thousand sessions whose refreshes are spread over time: the usual daemon or web",
        "app whose users log in one by one. Each pending session waits in its own daemon",
        "thread, the simplest thing that works.",
        "",
    ]
    lines += [line for line in (thread_few, thread_cost) if line]
    lines += [
        "",
        '**Use `timers="heap"`** from a few thousand sessions up, and whenever many',
        "refreshes can fall due together: sessions created in a burst (every user logging",
        "in again after a restart, a batch job) get tokens with the same lifetime, so their",
        "refreshes come due in the same second.",
        "",
    ]
    lines += [line for line in (heap_cost, heap_storm, thread_storm) if line]
    lines += [
        "",
        "Whichever the backend, `jitter=` (refresh up to that much earlier, at random)",
        "spreads out sessions created together, so that they do not come due together.",
        "",
    ]
    behind = busy_caveat(results, storm_sizes)
    lines += [*([behind, ""] if behind else []), *([idle, ""] if idle else [])]
    return lines


def busy_caveat(results: Result, sizes: list[int]) -> str | None:
    """Where the heap backend too fell behind beside a CPU-bound thread, said plainly."""
    lost = [
        n
        for n in sizes
        if (values := storm_p99s(results, HEAP, n, "busy")) and math.isinf(max(values))
    ]
    if not lost:
        return None
    n = min(lost)

    def best(name: str) -> str:
        runs = storm_runs(results, name, n, "busy")
        return f"{max(int(run.get('fired', 0)) for run in runs):,}" if runs else "-"

    return (
        f"Beside a CPU-bound thread, neither backend kept up with {n:,} refreshes due within"
        f" a second on this machine: within {storm_wait(results):g} s the heap backend"
        f" delivered at best {best(HEAP)} of {n:,}, a thread per session {best(THREAD)}."
        " A pure-Python computation in the same process hands the GIL back only every 5 ms"
        " switch interval, and each hand-off inside the scheduler waits for it; keep such"
        " work out of the process that refreshes, or its refreshes spread out (`jitter=`)."
    )


def idle_ms_per_s(results: Result, name: str, n: int) -> float | None:
    cpu = ops_value(results, name, n, "idle_cpu_seconds")
    idle = ops_value(results, name, n, "idle_seconds")
    per_second = ratio(cpu, idle)
    return None if per_second is None else per_second * 1000


def summary_table(results: Result) -> list[str]:
    """The two backends side by side, one row per (N, backend)."""
    sizes: list[int] = results["meta"]["sizes"]
    shown = [n for n in sizes if n >= 1000] or sizes
    names = [name for name in (THREAD, HEAP) if name in results["contenders"]]
    columns: list[tuple[str, Callable[[str, int], str | None]]] = [
        ("`schedule()`, median call", lambda name, n: fig(op_p50(results, name, n), us)),
        ("schedule + cancel", lambda name, n: fig(schedule_cancel_rate(results, name, n), rate)),
        (
            "memory per pending session",
            lambda name, n: fig(ops_value(results, name, n, "rss_per_session"), size),
        ),
        (
            "threads added",
            lambda name, n: fig(
                ops_value(results, name, n, "threads_added"), lambda v: f"{v:,.0f}"
            ),
        ),
        (
            "`close()`",
            lambda name, n: fig(
                ops_value(results, name, n, "close_seconds"), lambda v: ms(v * 1000)
            ),
        ),
    ]
    lines = [
        "| N pending | backend | " + " | ".join(label for label, _ in columns) + " |",
        "| ---: | --- |" + " ---: |" * len(columns),
    ]
    for n in shown:
        for name in names:
            why = blank(phase(results, name, n, "ops"))
            if why not in (None, "-"):
                cells = [str(why)] + [""] * (len(columns) - 1)
            else:
                cells = [render(name, n) or "-" for _, render in columns]
            lines.append(f"| {n:,} | {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


# -- the storm section -------------------------------------------------------

STORM_HEADING = "## Many refreshes due at once"
STORM_MODES = (("calm", "calm"), ("busy", "beside a CPU-bound thread"))
PROMPT_MS = 1000.0  # "within a second", the line the summary draws


def storm_result(results: Result, name: str, n: int, mode: str) -> Result | None:
    found: Result | None = results.get("storm", {}).get(name, {}).get(str(n), {}).get(mode)
    return found


def storm_runs(results: Result, name: str, n: int, mode: str) -> list[Result]:
    """Every run of a storm cell (results from before repeats: the one run)."""
    result = storm_result(results, name, n, mode)
    if result is None:
        return []
    runs: list[Result] = result.get("runs", [result])
    return runs


def storm_p99s(results: Result, name: str, n: int, mode: str) -> list[float]:
    """p99 delivery lateness (ms) of each run that ran; inf where over 1% never came."""
    return [
        float(run["p99_ms"])
        for run in storm_runs(results, name, n, mode)
        if "error" not in run and "p99_ms" in run
    ]


def storm_p99(results: Result, name: str, n: int, mode: str) -> float | None:
    """The median run's p99 in ms; None if it did not run or over 1% were never delivered."""
    result = storm_result(results, name, n, mode)
    if result is None or blank(result) is not None or "p99_ms" not in result:
        return None
    value = float(result["p99_ms"])
    return value if math.isfinite(value) else None


def seconds(milliseconds: float) -> str:
    """Lateness for the storm table: ms below a second, s above."""
    if math.isinf(milliseconds):
        return "never"
    if abs(milliseconds) < 1000:
        return f"{sig(milliseconds, 2)} ms"
    return f"{sig(milliseconds / 1000, 2)} s"


def storm_spread(results: Result, name: str, n: int, mode: str) -> str | None:
    """The runs' p99, lowest to highest: "3.1 ms to 7.0 s", or how many never came."""
    values = sorted(storm_p99s(results, name, n, mode))
    if not values:
        return None
    finite = [value for value in values if math.isfinite(value)]
    lost = len(values) - len(finite)
    if not lost:
        low, high = seconds(values[0]), seconds(values[-1])
        return low if low == high else f"{low} to {high}"
    runs = storm_runs(results, name, n, mode)
    delivered = max(int(run.get("fired", 0)) for run in runs)
    if not finite:
        return (
            f"never ({'no' if len(values) > 1 else 'the'} run delivered 99%;"
            f" at best {delivered:,} of {n:,} within"
            f" {storm_wait(results):g} s)"
        )
    spread = (
        seconds(finite[0]) if len(finite) == 1 else f"{seconds(finite[0])} to {seconds(finite[-1])}"
    )
    return f"{spread}, or never ({lost} of {len(values)} runs left over 1% undelivered)"


def storm_wait(results: Result) -> float:
    meta = results["meta"]
    return float(meta["storm_window"]) + float(meta["storm_drain"])


def storm_row(results: Result, name: str, n: int, mode: str) -> str:
    result = storm_result(results, name, n, mode)
    why = blank(result)
    if why is not None or result is None:
        return f"| {n:,} | {name} | {why or '-'} | | | | | |"
    unfired = int(result.get("unfired", 0))
    last = float(result.get("last_after_first_due_s", math.nan))
    if unfired:
        reached = f"{int(result['fired']):,} of {n:,} by {sig(last, 2)} s; **{unfired:,} never**"
    else:
        reached = f"{sig(last, 2)} s"
    notes = []
    if result.get("killed"):
        notes.append("stopped at its time limit, read from its log")
    elif unfired:
        notes.append(f"waited {storm_wait(results):g} s after the window opened")
    if result.get("overran_seconds", -1) > 0:
        notes.append(f"scheduling ran {result['overran_seconds']:.1f} s into the window")
    if result.get("closed") is False:
        notes.append(f"close() still running after {float(result['close_seconds']):.0f} s")
    each = ", ".join(run_text(run, n) for run in storm_runs(results, name, n, mode))
    within = float(result.get("within_5s", math.nan))
    return (
        f"| {n:,} | {name} | {seconds(float(result['p50_ms']))} | "
        f"{seconds(float(result['p99_ms']))} | {seconds(float(result['max_ms']))} | "
        f"{within:.1%} | {reached}" + (f" ({'; '.join(notes)})" if notes else "") + f" | {each} |"
    )


def run_text(run: Result, n: int) -> str:
    """One run of a storm cell: its p99, and how many came when not all of them did."""
    if "error" in run or "p99_ms" not in run:
        return "error" if "error" in run else "-"
    text = seconds(float(run["p99_ms"]))
    fired = int(run.get("fired", n))
    return text if fired >= n else f"{text} ({fired:,} of {n:,})"


def storm_summary(results: Result, mode: str) -> str:
    """Up to which N the thread backend delivered within a second in every run, and the heap."""
    sizes: list[int] = results["meta"]["storm_sizes"]
    label = dict(STORM_MODES)[mode]

    def prompt(name: str, n: int) -> bool:
        values = storm_p99s(results, name, n, mode)
        return bool(values) and max(values) < PROMPT_MS

    thread = [n for n in sizes if prompt(THREAD, n)]
    heap = [n for n in sizes if prompt(HEAP, n)]
    parts = []
    if thread == sizes:
        parts.append("the thread backend's p99 stayed under a second at every N, in every run")
    elif thread and thread == sizes[: len(thread)]:
        parts.append(
            f"the thread backend's p99 stayed under a second in every run up to N = "
            f"{max(thread):,}, and not at {min(set(sizes) - set(thread)):,}"
        )
    else:
        parts.append(
            "the thread backend's p99 went over a second in some run at N = "
            + ", ".join(f"{n:,}" for n in sizes if n not in thread)
        )
    if heap == sizes:
        parts.append(
            "the heap backend's stayed under a second at every N, in every run (worst: "
            + ", ".join(
                f"{seconds(max(storm_p99s(results, HEAP, n, mode)))} at {n:,}" for n in sizes
            )
            + ")"
        )
    elif heap:
        missed = [n for n in sizes if n not in heap]
        parts.append(
            "the heap backend's stayed under a second in every run at N = "
            + ", ".join(f"{n:,}" for n in heap)
            + ", and not at "
            + ", ".join(f"{n:,} ({worst_text(storm_p99s(results, HEAP, n, mode))})" for n in missed)
        )
    else:
        parts.append("the heap backend's went over a second in some run at every N")
    return f"- {label[0].upper()}{label[1:]}: " + "; ".join(parts) + "."


def worst_text(values: list[float]) -> str:
    worst = max(values) if values else math.nan
    return "over 1% never delivered" if math.isinf(worst) else f"worst: {seconds(worst)}"


def storm_ratios(results: Result, mode: str) -> str | None:
    sizes: list[int] = results["meta"]["storm_sizes"]
    parts = []
    for n in sizes:
        thread, heap = storm_p99(results, THREAD, n, mode), storm_p99(results, HEAP, n, mode)
        bare = storm_p99(results, BARE_TIMER, n, mode)
        pieces = []
        if thread is not None and heap:
            pieces.append(f"{times(thread / heap)} the heap backend's")
        if thread is not None and bare:
            pieces.append(f"{times(thread / bare)} the bare Timer's")
        if pieces:
            parts.append(f"N = {n:,}: " + ", ".join(pieces))
    if not parts:
        return None
    label = dict(STORM_MODES)[mode]
    return (
        f"- {label[0].upper()}{label[1:]}, the thread backend's median p99: "
        + "; ".join(parts)
        + "."
    )


def floor_ratios(results: Result, mode: str) -> str | None:
    """The heap backend's p99 against the floor's, median runs and worst runs."""
    parts = []
    for n in results["meta"]["storm_sizes"]:
        heap, floor = storm_p99s(results, HEAP, n, mode), storm_p99s(results, FLOOR, n, mode)
        if not heap or not floor or max(floor) <= 0 or not math.isfinite(max(floor)):
            continue
        median = storm_p99(results, HEAP, n, mode)
        floor_median = storm_p99(results, FLOOR, n, mode)
        worst = "never" if math.isinf(max(heap)) else times(max(heap) / max(floor))
        if median is not None and floor_median:
            parts.append(f"N = {n:,}: {times(median / floor_median)} (worst runs: {worst})")
        else:
            parts.append(f"N = {n:,}: worst runs {worst}")
    if not parts:
        return None
    label = dict(STORM_MODES)[mode]
    return (
        f"- {label[0].upper()}{label[1:]}, the heap backend's median p99 against the floor's: "
        + "; ".join(parts)
        + "."
    )


def storm_collapses(results: Result) -> str | None:
    """CPU burnt by the thread-per-session runs that fell behind, against those that kept up."""
    kept: list[float] = []
    fell: list[float] = []
    for name in (THREAD, BARE_TIMER):
        for cell in results.get("storm", {}).get(name, {}).values():
            for result in [cell["calm"]] if "calm" in cell else []:
                for run in result.get("runs", [result]):
                    if "cpu_seconds" not in run or "p99_ms" not in run:
                        continue
                    wall = max(float(run.get("wall_seconds", 0)), 1e-9)
                    (kept if float(run["p99_ms"]) < PROMPT_MS else fell).append(
                        float(run["cpu_seconds"]) / wall
                    )
    if not fell or not kept:
        return None
    return (
        f"In this run's calm rows, the thread-per-session runs that fell behind kept"
        f" {sig(min(fell), 2)} to {sig(max(fell), 2)} cores busy while they waited, those that"
        f" kept up {sig(min(kept), 2)} to {sig(max(kept), 2)}."
    )


def storm_gc_lines(storm: Result) -> list[str]:
    """The garbage collector's passes during the storm runs: per mode, by contender.

    From the end of scheduling to the last delivery; a pass over a storm's
    worth of objects holds every thread while it runs. Beside a CPU-bound
    thread a pass's time includes waits for the GIL (the callbacks that time
    it run Python code), so only calm runs give the longest pass.
    """
    lines = []
    for mode, heading in (("calm", "calm"), ("busy", "beside a CPU-bound thread")):
        parts = []
        for name, cells in storm.items():
            runs = [
                [run["gc"].get(f"gen{generation}", [0, 0.0]) for generation in (0, 1, 2)]
                for cell in cells.values()
                for run in cell.get(mode, {}).get("runs", [])
                if isinstance(run.get("gc"), dict)
            ]
            if not runs:
                continue
            young = max(int(run[0][0]) for run in runs)
            older = max(int(run[1][0]) + int(run[2][0]) for run in runs)
            text = f"{name} {young} young and {older} older"
            if mode == "calm":
                text += f" (longest {sig(max(float(g[1]) for run in runs for g in run), 2)} ms)"
            parts.append(text)
        if parts:
            lines.append(
                f"- Garbage collections in a storm run, {heading}, at most"
                " (from the end of scheduling to the last delivery; a pass holds every"
                " thread while it runs): " + "; ".join(parts) + "."
            )
    return lines


def storm_section(results: Result) -> list[str]:
    """The "Many refreshes due at once" section, from results["storm"]."""
    meta = results["meta"]
    machine = meta["machine"]
    sizes: list[int] = meta["storm_sizes"]
    names = list(results["storm"])
    window, drain = float(meta["storm_window"]), float(meta["storm_drain"])
    repeats = int(meta.get("storm_repeats", 1))
    before = ", ".join(f"{value:.2f}" for value in meta["storm_load_before"])
    after = ", ".join(f"{value:.2f}" for value in meta["storm_load_after"])
    lines = [
        STORM_HEADING,
        "",
        "What a user sees when many sessions come due together, for instance after a",
        "restart that logged everyone in again: N refreshes due at random instants within",
        f"{window:g} s, each timed where its token is *delivered*: `on_refresh` minus the",
        "due time, through the real `Scheduler` (`get_access_token` returns at once;",
        "default `max_workers=4` and `fetch_timeout`), and the callback for the others.",
        "The *floor* is one thread that calls the callback for each session in deadline",
        "order as it falls due: no lock, no hand-off, what one thread can do.",
        (
            f"Each (N, contender) ran {repeats} times; the figures are the median run's (by p99),"
            " and the last column gives every run, in the order they ran."
            if repeats > 1
            else "Each (N, contender) ran once."
        ),
        "*≤ 5 s* is the share of the N delivered at most 5 s late; *last delivery* is the",
        "time from the first due time to the last delivery (about the window when the",
        "scheduler keeps up).",
        "",
    ]
    for mode, label in STORM_MODES:
        if not any(storm_result(results, name, n, mode) for name in names for n in sizes):
            continue
        lines += [
            f"### {label[0].upper()}{label[1:]}",
            "",
            "| N | contender | p50 | p99 | max | ≤ 5 s | last delivery |"
            " each run: p99 (delivered, if not all) |",
            "| ---: | --- | ---: | ---: | ---: | ---: | --- | --- |",
        ]
        lines += [storm_row(results, name, n, mode) for n in sizes for name in names]
        lines.append("")
    shown = [
        mode
        for mode, _ in STORM_MODES
        if any(storm_result(results, THREAD, n, mode) for n in sizes)
    ]
    if shown:
        lines += ["What the figures show:", ""]
        lines += [storm_summary(results, mode) for mode in shown]
        lines += [line for mode in shown if (line := storm_ratios(results, mode))]
        lines += [line for mode in shown if (line := floor_ratios(results, mode))]
        lines.append("")
    collapses = storm_collapses(results)
    lines += [
        "### Why a thread per session falls behind",
        "",
        "When thousands of timer threads wake within a second, each one that finds the GIL",
        "taken waits for it in 5 ms slices (CPython's switch interval), waking at the end of",
        "each. A few thousand waiters make a few hundred thousand wake-ups a second, more",
        "than two cores can schedule: the thread holding the GIL gets the CPU late, the",
        "queue grows, and the run falls seconds behind until the queue drains in one burst.",
        "The signs agree: in a run that falls behind, the load average climbs into the",
        "thousands (threads runnable, not asleep) and the cores stay busy. Whether a run",
        "tips over depends on small disturbances (a garbage collection, a neighbour's",
        "burst, the CPU-bound thread), so the same run gives a few milliseconds one time",
        "and seconds the next: hence the repeats. The heap backend has one timer thread",
        "and one worker at a time running what falls due, so a handful of threads at most",
        "ever wait for the GIL together.",
        *([collapses] if collapses else []),
        "",
        "Beside a CPU-bound thread, what bounds a scheduler is its hand-offs: each time one",
        "of its threads blocks (a worker waiting for work, a lock another thread holds),",
        "the busy thread takes the GIL for up to 5 ms, and past the rate that allows the",
        "backlog only grows until the storm is over. So the heap backend's timer thread",
        "takes every timer due at once and adds their refreshes to the workers' backlog in",
        "one go; one worker runs the backlog with no hand-off between refreshes (a second",
        "joins only when a refresh has run 50 ms, hung or slow); the fetch watchdog wakes",
        "once per deadline that passes, not once per fetch; and a follow-up due later than",
        "the timer thread's next wake-up wakes nobody. The thread backend keeps a thread per",
        "pending session, but a fired timer adds its refresh to the same backlog and wakes a",
        "worker only if none runs it. [What one refresh costs](#what-one-refresh-costs)",
        "counts what is left.",
        "",
        "The benchmark is not the cause. An earlier version of this page showed a p99 of",
        "7 s at N = 5,000, calm, from one run, where a plain script had measured tens of",
        "milliseconds. To tell them apart, a 50-line script with none of the harness (no",
        "worker process, no delivery log, its main thread asleep in `time.sleep()`) armed",
        "5,000 bare `threading.Timer`s, or a real `Scheduler`, due within one second, on",
        "this machine with nothing else running. Of 10 bare-Timer runs, 9 had a p99 of",
        "0.7-8.1 ms and one 10.3 s (p50 9.4 s; 18 CPU-seconds against 0.4-0.6 for the",
        "others); of 5 `Scheduler` runs, three had 3.7-7.8 ms and the others 1.1 s and",
        "3.0 s. The harness's worker, run alternately with that script, gave the same mix",
        "(6 bare-Timer runs at 0.8-1.2 ms; 5 `Scheduler` runs, four at 2.7-31 ms and one",
        "at 1.5 s). What misled was one run per cell: each now runs several times, with",
        "other due times each round, and the table shows them all.",
        "",
        "How these rows are measured:",
        "",
        f"- Run {meta['started']}, `{meta['command']}`, {meta['elapsed'] / 60:.1f} minutes;"
        f" {machine['cpu']}, {machine['nproc']} cores; 1-, 5- and 15-minute load average"
        f" {before} before the storm rows and {after} after them (Linux counts runnable",
        "  threads, and a storm of timer threads adds its own thousands); token_refresh git "
        f"{meta['versions'].get('git')}, {machine['python']}.",
    ]
    if "storm_proc_loadavg" in meta:
        first, last = meta["storm_proc_loadavg"]
        lines.append(f"- `/proc/loadavg` before: `{first}`; after: `{last}`.")
    others = [
        int(run["runnable_before"])
        for cells in results["storm"].values()
        for cell in cells.values()
        for result in cell.values()
        for run in result.get("runs", [result])
        if int(run.get("runnable_before", -1)) >= 0
    ]
    if others:
        lines.append(
            "- Other tasks running or runnable on the machine as each storm run started"
            f" (`/proc/loadavg`): at most {max(others)}, median"
            f" {sorted(others)[len(others) // 2]}."
        )
    lines += storm_gc_lines(results["storm"])
    lines += [
        "- Repeats outermost, then sizes, then contenders, each (N, contender, calm or busy) in",
        "  a fresh worker process, so that a noisy minute hits every contender alike.",
        "- All N are scheduled before the first is due (starting a thread per session takes",
        "  up to a millisecond each, so the thread contenders get a lead of 2 ms per",
        "  session, APScheduler 0.4 ms; a run whose scheduling still ran into the window says",
        "  so); *busy* starts a",
        "  pure-Python loop in another thread of the process as scheduling ends (it gives up",
        "  the GIL only at the 5 ms switch interval).",
        f"- Every run is bounded: it waits {drain:g} s after the window for the last",
        "  deliveries, and one not delivered by then counts as never (infinitely late). A",
        "  worker whose main thread cannot get the GIL back is stopped at its time limit",
        "  and its figures read from its memory-mapped delivery log.",
        "- The *Firing lateness* tables time when `get_access_token` starts on a worker;",
        "  these rows time the delivery after it, so a scheduler's hand-offs (timer thread",
        "  to worker, worker to `on_refresh`) are inside them.",
        "",
    ]
    return lines


# -- the per-refresh budget --------------------------------------------------

BUDGET_HEADING = "## What one refresh costs"


def per_refresh(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def budget_row(name: str, result: Result) -> str:
    why = blank(result)
    if why is not None or "acquires_per_refresh" not in result:
        return f"| {name} | {why or result.get('error', '-')} | | | | | |"
    n, fired = int(result["n"]), int(result["fired"])
    delivered = f"{fired:,}" + ("" if fired >= n else f" of {n:,}")
    voluntary = per_refresh(result["voluntary_switches"] / fired) if fired else "-"
    involuntary = per_refresh(result["involuntary_switches"] / fired) if fired else "-"
    return (
        f"| {name} | {delivered} | "
        f"{per_refresh(result['acquires_per_refresh'])} | "
        f"{per_refresh(result['waits_per_refresh'])} | "
        f"{per_refresh(result['notifies_per_refresh'])} | "
        f"{per_refresh(result['queue_ops_per_refresh'])} | "
        f"{per_refresh(result['switches_per_refresh'])} ({voluntary} + {involuntary}) |"
    )


def budget_sites(name: str, result: Result) -> list[str]:
    """Where a contender's counts come from: each creation site, per refresh."""
    fired = int(result.get("fired", 0))
    sites: dict[str, dict[str, int]] = result.get("sites", {})
    if not fired or not sites:
        return []
    lines = [
        f"{name}, per delivered refresh, by the line that created the lock (and, in",
        "brackets, the line that built the object holding it):",
        "",
        "| created at | locks | waits | notifies | queue put/get |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for site, counts in sorted(sites.items(), key=lambda item: -sum(item[1].values())):
        where, _, source = site.partition(" `")
        source = "`" + source.replace("|", "\\|")  # inside a table cell, even in backticks
        lines.append(
            f"| {where} {source} | {counts['acquires'] / fired:.2f} |"
            f" {counts['waits'] / fired:.2f} | {counts['notifies'] / fired:.2f} |"
            f" {counts['queue_ops'] / fired:.2f} |"
        )
    return [*lines, ""]


def budget_section(results: Result) -> list[str]:
    """The "What one refresh costs" section, from results["budget"]."""
    budget: dict[str, Result] = results["budget"]
    meta = results["meta"]
    first = next(iter(budget.values()))
    n, window = int(first.get("n", 0)), float(first.get("window", math.nan))
    lines = [
        BUDGET_HEADING,
        "",
        f"What one delivered refresh costs in hand-offs: {n:,} refreshes due at random",
        f"instants within {window:g} s, calm, `get_access_token` returning at once, counted",
        "from the end of scheduling to the last delivery (one run each; the counts vary a",
        "little from run to run, with how often a thread finds work already waiting).",
        "",
        "| contender | delivered | locks | waits | notifies | queue put/get |"
        " context switches (voluntary + involuntary) |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
        *(budget_row(name, result) for name, result in budget.items()),
        "",
        "Per delivered refresh. *Locks*: acquisitions of every `Lock`, `RLock` and",
        "`Condition` the scheduler created (`with` included, and a condition's",
        "re-acquisition after `wait()`); *waits*: `Condition.wait()` calls (a thread that",
        "sleeps and is woken: the timer thread's wake-ups are here) and `SimpleQueue.get()`",
        "on an empty queue; *notifies*: those that had a waiter to wake; *context",
        "switches*: every thread of the process but the main one (`getrusage`, ended",
        "threads included). Not seen: locks taken inside C code (the GIL, `SimpleQueue`'s",
        "own) and `Thread.join()`. The counting wrappers slow each lock down, so these",
        "runs give no lateness worth quoting.",
        "",
    ]
    for name, result in budget.items():
        if name != FLOOR:
            lines += budget_sites(name, result)
    lines += [
        f"Run {meta['started']}, `{meta['command']}`; token_refresh git"
        f" {meta['versions'].get('git')}, {meta['machine']['python']}"
        " (`benchmarks/_budget.py` counts; `python benchmarks/run.py --budget` reruns it).",
        "",
    ]
    return lines


def splice_sections(path: Path, results: Result) -> None:
    """Rewrite the storm and budget sections of ``path`` that ``results`` holds."""
    if results.get("storm"):
        splice_section(path, STORM_HEADING, storm_section(results))
    if results.get("budget"):
        splice_section(path, BUDGET_HEADING, budget_section(results))


def splice_section(path: Path, heading: str, lines: list[str]) -> None:
    """Replace the ``heading`` section of the Markdown at ``path`` (up to the next ``## ``).

    A page without it gets the section before "## How it is measured" (or at
    the end); the rest of the page is left as it is.
    """
    old = path.read_text().splitlines() if path.exists() else []
    if heading in old:
        start = old.index(heading)
        end = next((i for i in range(start + 1, len(old)) if old[i].startswith("## ")), len(old))
    else:
        start = end = next(
            (i for i, line in enumerate(old) if line == "## How it is measured"), len(old)
        )
    new = [*old[:start], *lines, *old[end:]]
    path.write_text("\n".join(new).rstrip() + "\n")
