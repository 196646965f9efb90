"""Turn one run's results into docs/performance.md and a PNG chart."""

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
TARGET_N = 10_000
MANY_N = 100_000
IDLE_CPU_LIMIT = 0.001  # "no measurable CPU": under 0.1% of one core


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


def target_rows(results: Result) -> list[tuple[str, str, bool | None]]:
    """(target, measured, passed) for each of the issue's targets."""
    sizes: list[int] = results["meta"]["sizes"]
    n = TARGET_N if TARGET_N in sizes else max(sizes)
    many = MANY_N if MANY_N in sizes else max(sizes)
    at = f" (N={n:,})" if n != TARGET_N else ""
    rows: list[tuple[str, str, bool | None]] = []

    heap_rate = schedule_cancel_rate(results, HEAP, n)
    vs_aps = ratio(heap_rate, schedule_cancel_rate(results, APS, n))
    bare_vs_aps = ratio(
        schedule_cancel_rate(results, BARE_HEAP, n), schedule_cancel_rate(results, APS, n)
    )
    rows.append(
        (
            "schedule+cancel throughput ≥ 10x APScheduler's" + at,
            f"{times(vs_aps)} ({rate(heap_rate)} vs {rate(schedule_cancel_rate(results, APS, n))}; "
            f"the bare heap itself: {times(bare_vs_aps)})",
            None if vs_aps is None else vs_aps >= 10,
        )
    )
    behind = ratio(schedule_cancel_rate(results, BARE_HEAP, n), heap_rate)
    rows.append(
        (
            "… and within 3x a bare heap-and-Condition timer's" + at,
            f"bare heap is {times(behind)} faster "
            f"({rate(schedule_cancel_rate(results, BARE_HEAP, n))})",
            None if behind is None else behind <= 3,
        )
    )
    per_session = ops_value(results, HEAP, n, "rss_per_session")
    rows.append(
        (
            "≤ 1 KiB RSS per pending session" + at,
            size(per_session),
            None if per_session is None else per_session <= 1024,
        )
    )
    held = ops_value(results, HEAP, many, "threads_added")
    rows.append(
        (
            f"{many:,} pending sessions held with ≤ 4 threads (before any refresh ran)",
            "-" if held is None else f"+{held:.0f} thread(s)",
            None if held is None else held <= 4,
        )
    )
    fired_n = max(results["meta"]["lateness_sizes"])
    after = phase(results, HEAP, fired_n, "calm")
    after_threads = None if not ok(after) or after is None else after["threads_added_after_fire"]
    rows.append(
        (
            f"… and once refreshes have run (timer thread + worker pool), N={fired_n:,}",
            "-" if after_threads is None else f"+{after_threads} thread(s)",
            None if after_threads is None else after_threads <= 4,
        )
    )
    for mode, limit, label in (("calm", 2.0, "calm"), ("busy", 20.0, "with a CPU-bound thread")):
        result = phase(results, HEAP, n, mode)
        p99 = float(result["p99_ms"]) if ok(result) and result and "p99_ms" in result else None
        unfired = int((result or {}).get("unfired", 0) or 0)
        rows.append(
            (
                f"firing lateness p99 < {limit:g} ms, {label}" + at,
                "-"
                if p99 is None
                else f"{millis(p99)} ms" + (f", {unfired:,} never ran" if unfired else ""),
                None if p99 is None else p99 < limit,
            )
        )
    cpu = ops_value(results, HEAP, n, "idle_cpu_seconds")
    idle = ops_value(results, HEAP, n, "idle_seconds")
    switches = ops_value(results, HEAP, n, "idle_switches")
    share = ratio(cpu, idle)
    rows.append(
        (
            "no measurable CPU while idle (< 0.1% of a core)" + at,
            "-"
            if cpu is None or share is None
            else f"{cpu * 1000:.2f} ms CPU in {idle:g} s ({share * 100:.3f}%), "
            f"{switches:.0f} context switches",
            None if share is None else share < IDLE_CPU_LIMIT,
        )
    )
    close = ops_value(results, HEAP, n, "close_seconds")
    rows.append(
        (
            "close() < 100 ms with N pending" + at,
            "-" if close is None else f"{sig(close * 1000, 2)} ms",
            None if close is None else close < 0.1,
        )
    )
    median_cost = ratio(op_p50(results, THREAD, n), op_p50(results, BARE_TIMER, n))
    mean_cost = ratio(
        ops_rate(results, BARE_TIMER, n, "schedule"), ops_rate(results, THREAD, n, "schedule")
    )
    rows.append(
        (
            "Timer backend costs ≤ 1.5x a bare threading.Timer per schedule (median call)" + at,
            "-"
            if median_cost is None
            else f"{times(median_cost)} the median schedule() time "
            f"({times(mean_cost)} the mean: thread start-up times swing with the neighbours)",
            None if median_cost is None else median_cost <= 1.5,
        )
    )
    return rows


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
                f"Timer backend median schedule() time = {times(thread_cost)} bare Timer's"
            )
        if parts:
            lines.append(f"- **N = {n:,}**: " + "; ".join(parts) + ".")
    return [*lines, ""]


def write_markdown(results: Result, out: Path, chart: Path) -> None:
    meta = results["meta"]
    machine = meta["machine"]
    sizes: list[int] = meta["sizes"]
    names = list(results["contenders"])
    load_before = ", ".join(f"{value:.2f}" for value in meta["load_before"])
    load_after = ", ".join(f"{value:.2f}" for value in meta["load_after"])
    lines = [
        # Generated, and in no toctree until the docs link it: keep sphinx-build -W quiet.
        "---",
        "orphan: true",
        "---",
        "",
        "# Performance",
        "",
        "How `token_refresh`'s two timer backends compare, measured side by side in one run",
        "with a bare `threading.Timer` per session, a bare heap-and-`Condition` timer thread",
        "(the best case for one thread) and APScheduler 3. Ratios below compare contenders",
        "measured in this same run; absolute times from a shared machine are only a guide.",
        "",
        "## This run",
        "",
        f"- Date: {meta['started']}; the run took **{meta['elapsed'] / 60:.1f} minutes**.",
        f"- Command: `{meta['command']}`",
        f"- Machine: {machine['cpu']}, {machine['nproc']} cores (`nproc`), "
        f"{machine['memory']} RAM; {machine['os']}; shared with other work "
        f"(load average {load_before} before, {load_after} after; Linux counts every",
        "  runnable thread, so the thousands of timer threads this run wakes at once raise",
        "  it too).",
        f"- Limits: `vm.max_map_count` = {machine['max_map_count']}, "
        f"`kernel.threads-max` = {machine['threads_max']}.",
        f"- {machine['python']}; token_refresh {meta['versions'].get('token_refresh')} "
        f"(git {meta['versions'].get('git')}); APScheduler {meta['versions'].get('apscheduler')}.",
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
        "## The issue's targets",
        "",
        f"For the heap backend at N = {TARGET_N:,} unless stated.",
        "",
        "| target | measured | result |",
        "| --- | --- | --- |",
    ]
    for target, measured, passed in target_rows(results):
        verdict = "n/a" if passed is None else ("PASS" if passed else "**FAIL**")
        lines.append(f"| {target} | {measured} | {verdict} |")
    lines += ["", "## Ratios", ""]
    lines += ratio_lines(results, sizes)
    image = Path(os.path.relpath(chart, out.parent)).as_posix()
    lines += [f"![throughput, memory, lateness and close() against N]({image})", ""]
    if results.get("storm"):
        lines += storm_section(results)
    lines += [
        "## How it is measured",
        "",
        "Every (contender, N, measurement) runs in a fresh process "
        "(`benchmarks/_worker.py`); sizes are the outer loop, contenders the inner one.",
        "",
        "- **Operations.** N sessions are scheduled an hour or two out (random due times,",
        "  random order), then rescheduled 60 s later, then cancelled; each call is timed",
        "  with `perf_counter_ns`. Throughput is N over the loop's wall time; `(p50 / p99)`",
        "  is the per-call latency. *schedule+cancel* is 2N over both loops. token_refresh",
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
        + ".",
        "",
        "## Reading these numbers",
        "",
        "- **Compare within a run.** The machine is shared; a neighbour's test run can slow",
        "  one contender's minute and not the next. The ratios are the result; rerun",
        "  before trusting a ratio near a target's limit.",
        "- **A thread per session** costs an OS thread per pending session: RSS for its",
        "  stack pages and thread state, a `start()` that waits for the new thread,",
        "  a `close()` that joins every one, and a hard ceiling: at about three memory",
        "  mappings per thread, `vm.max_map_count` stops the process near 22,000 threads.",
        "  When thousands of them fall due within seconds they all wake and contend for",
        "  the GIL (and for any lock they share), so their lateness varies wildly from run",
        "  to run, up to refreshes that never ran before the run stopped waiting.",
        "- **The CPU-bound thread** gives up the GIL only when the 5 ms switch interval",
        "  forces it. A bare timer pays that wait once per fire; token_refresh and",
        "  APScheduler hand each fire from their timer thread to a worker pool, and can pay",
        "  it twice.",
        "- **100,000 due within 2 s** is 50,000 refreshes a second: there the one-thread",
        "  contenders fall behind, and lateness measures refresh throughput, not timer",
        "  precision.",
        "",
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
            f"p50 / p99 milliseconds for N refreshes due within {meta['window']:g} s.",
            "",
        ]
        lines += table(results, names, lateness_sizes, lateness_cell(results, mode))
    lines += notes(results, names)
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
    names = list(results["contenders"])
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
            "RSS per pending session (dotted: 1 KiB target)",
            "bytes",
            sizes,
            lambda name, n: ops_value(results, name, n, "rss_per_session"),
        ),
        (
            axes[1][0],
            "firing lateness p99, calm (dotted: 2 ms target)",
            "milliseconds",
            lateness_sizes,
            lambda name, n: lateness(results, name, n, "calm", "p99_ms"),
        ),
        (
            axes[1][1],
            "firing lateness p99, CPU-bound thread running (dotted: 20 ms)",
            "milliseconds",
            lateness_sizes,
            lambda name, n: lateness(results, name, n, "busy", "p99_ms"),
        ),
        (axes[2][0], "close() with N pending (dotted: 100 ms)", "milliseconds", sizes, close_ms),
        (axes[2][1], "threads added with N pending (dotted: 4)", "threads", sizes, threads),
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
    for axis, level in ((axes[0][1], 1024), (axes[1][0], 2), (axes[1][1], 20), (axes[2][0], 100)):
        axis.axhline(level, color="grey", linestyle=":", linewidth=1)
    axes[2][1].axhline(4, color="grey", linestyle=":", linewidth=1)
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


# -- the storm section -------------------------------------------------------

STORM_HEADING = "## Many refreshes due at once"
STORM_AIM_MS = 1000.0  # the aim: p99 under one second ...
STORM_AIMS = (("calm", 5000), ("busy", 1000))  # ... at 5,000 calm and 1,000 beside a CPU hog
STORM_MODES = (("calm", "calm"), ("busy", "beside a CPU-bound thread"))


def storm_result(results: Result, name: str, n: int, mode: str) -> Result | None:
    found: Result | None = results.get("storm", {}).get(name, {}).get(str(n), {}).get(mode)
    return found


def storm_p99(results: Result, name: str, n: int, mode: str) -> float | None:
    """p99 delivery lateness in ms; None if it did not run or over 1% were never delivered."""
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


def storm_row(results: Result, name: str, n: int, mode: str) -> str:
    result = storm_result(results, name, n, mode)
    why = blank(result)
    if why is not None or result is None:
        return f"| {n:,} | {name} | {why or '-'} | | | | |"
    unfired = int(result.get("unfired", 0))
    waited = float(results["meta"]["storm_window"]) + float(results["meta"]["storm_drain"])
    last = float(result.get("last_after_first_due_s", math.nan))
    if unfired:
        reached = f"{int(result['fired']):,} of {n:,} by {sig(last, 2)} s; **{unfired:,} never**"
    else:
        reached = f"{sig(last, 2)} s"
    notes = []
    if result.get("killed"):
        notes.append("stopped at its time limit, read from its log")
    elif unfired:
        notes.append(f"waited {waited:g} s after the window opened")
    if result.get("overran_seconds", -1) > 0:
        notes.append(f"scheduling ran {result['overran_seconds']:.1f} s into the window")
    if result.get("closed") is False:
        notes.append(f"close() still running after {float(result['close_seconds']):.0f} s")
    max_text = seconds(float(result["max_ms"]))
    within = float(result.get("within_5s", math.nan))
    return (
        f"| {n:,} | {name} | {seconds(float(result['p50_ms']))} | "
        f"{seconds(float(result['p99_ms']))} | {max_text} | {within:.1%} | {reached}"
        + (f" ({'; '.join(notes)})" if notes else "")
        + " |"
    )


def storm_takeover(results: Result, mode: str) -> str:
    """Where the thread backend stops meeting the aim and the heap backend still does."""
    sizes: list[int] = results["meta"]["storm_sizes"]
    held = [n for n in sizes if (p99 := storm_p99(results, THREAD, n, mode)) and p99 < STORM_AIM_MS]
    lost = [n for n in sizes if n not in held]
    heap_held = [
        n for n in lost if (p99 := storm_p99(results, HEAP, n, mode)) and p99 < STORM_AIM_MS
    ]
    label = dict(STORM_MODES)[mode]
    if not lost:
        return f"{label}: the thread backend's p99 stays under 1 s at every N measured."
    text = (
        f"{label}: the thread backend's p99 is under 1 s up to N = {max(held):,}"
        if held
        else (f"{label}: the thread backend's p99 is over 1 s already at N = {min(lost):,}")
    )
    if heap_held:
        text += "; from N = " + f"{min(lost):,} the heap backend is the one that keeps it"
        return (
            text
            + " ("
            + ", ".join(
                f"{seconds(storm_p99(results, HEAP, n, mode) or math.nan)} at {n:,}"
                for n in heap_held
            )
            + ")."
        )
    return text + "; neither backend keeps it above that."


def storm_ratios(results: Result, mode: str) -> str:
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
            parts.append(f"{n:,}: " + ", ".join(pieces))
    label = dict(STORM_MODES)[mode]
    if not parts:
        return f"- {label}: no ratio (the thread backend's p99 is never, or a run is missing)."
    return f"- {label}, the thread backend's p99 at N = " + "; ".join(parts) + "."


def storm_section(results: Result) -> list[str]:
    """The "Many refreshes due at once" section, from results["storm"]."""
    meta = results["meta"]
    machine = meta["machine"]
    sizes: list[int] = meta["storm_sizes"]
    names = list(results["storm"])
    window, drain = float(meta["storm_window"]), float(meta["storm_drain"])
    before = ", ".join(f"{value:.2f}" for value in meta["storm_load_before"])
    after = ", ".join(f"{value:.2f}" for value in meta["storm_load_after"])
    lines = [
        STORM_HEADING,
        "",
        f"N refreshes due at random instants within {window:g} s, each timed where its token",
        "is *delivered*: `on_refresh` minus the due time, through the real `Scheduler`",
        "(`get_access_token` returns at once; default `max_workers=4` and `fetch_timeout`),",
        "and the timer's callback for the bare `threading.Timer`. *≤ 5 s* is the share of",
        "the N delivered at most 5 s late; *last delivery* is the time from the first due",
        "time to the last delivery (about the window on an unloaded scheduler).",
        "",
    ]
    aims = []
    for mode, n in STORM_AIMS:
        if n not in sizes:
            continue
        p99 = storm_p99(results, THREAD, n, mode)
        result = storm_result(results, THREAD, n, mode)
        measured = "-" if result is None else seconds(float(result.get("p99_ms", math.nan)))
        verdict = (
            "n/a" if result is None else ("PASS" if p99 and p99 < STORM_AIM_MS else "**FAIL**")
        )
        aims.append(
            f"| thread backend p99 < 1 s at N = {n:,}, {dict(STORM_MODES)[mode]} "
            f"| {measured} | {verdict} |"
        )
    if aims:
        lines += ["| aim (issue 8) | measured | result |", "| --- | --- | --- |", *aims, ""]
    for mode, label in STORM_MODES:
        if not any(storm_result(results, name, n, mode) for name in names for n in sizes):
            continue
        lines += [
            f"### {label[0].upper()}{label[1:]}",
            "",
            "| N | contender | p50 | p99 | max | ≤ 5 s | last delivery |",
            "| ---: | --- | ---: | ---: | ---: | ---: | --- |",
        ]
        lines += [storm_row(results, name, n, mode) for n in sizes for name in names]
        lines.append("")
    lines += ["What the figures show:", ""]
    for mode, _ in STORM_MODES:
        if any(storm_result(results, THREAD, n, mode) for n in sizes):
            lines.append("- " + storm_takeover(results, mode))
    for mode, _ in STORM_MODES:
        if any(storm_result(results, THREAD, n, mode) for n in sizes):
            lines.append(storm_ratios(results, mode))
    lines += [
        "",
        "Method and caveats:",
        "",
        f"- Run {meta['started']}, `{meta['command']}`, {meta['elapsed'] / 60:.1f} minutes;"
        f" {machine['cpu']}, {machine['nproc']} cores shared with other work, load average"
        f" {before} before and {after} after (Linux counts runnable threads, and a storm of",
        "  timer threads adds its own); token_refresh git "
        f"{meta['versions'].get('git')}, {machine['python']}.",
    ]
    if "storm_proc_loadavg" in meta:
        first, last = meta["storm_proc_loadavg"]
        lines.append(f"- `/proc/loadavg` before: `{first}`; after: `{last}`.")
    lines += [
        "- Sizes in the outer loop, contenders inner, each (N, contender, calm or busy) in a",
        "  fresh worker process; compare the contenders within a row group, not across runs:",
        "  on a shared 2-core machine a neighbour's test run can land on one worker and not",
        "  the next.",
        "- All N are scheduled before the first is due (starting a thread per session takes",
        "  up to a millisecond each, so the thread contenders get a lead of 1 ms per",
        "  session; a run whose scheduling still ran into the window says so); *busy* starts a",
        "  pure-Python loop in another thread of the process as scheduling ends (it gives up",
        "  the GIL only at the 5 ms switch interval).",
        f"- Every run is bounded: it waits {drain:g} s after the window for the last",
        "  deliveries, and one not delivered by then counts as never (infinitely late). A",
        "  worker whose main thread cannot get the GIL back is stopped at its time limit",
        "  and its figures read from its memory-mapped delivery log.",
        "- The *Firing lateness* rows above time when `get_access_token` starts on a worker;",
        "  these time the delivery after it, so a scheduler's hand-offs (timer thread to",
        "  worker, worker to `on_refresh`) are inside them.",
        "",
    ]
    return lines


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
