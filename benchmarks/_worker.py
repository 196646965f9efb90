"""One measurement in a fresh process: ``python benchmarks/_worker.py '<json spec>'``.

The spec names a phase (``probe``, ``ops``, ``lateness``, ``storm`` or ``budget``), a
contender and N. The result is one JSON object on the last line of stdout. The process ends
with ``os._exit`` so that thousands of leftover timer threads cannot make
interpreter shutdown slow; ``faulthandler`` dumps the stacks if a phase hangs
past the spec's ``timeout`` (the parent kills it a little later).
"""

from __future__ import annotations

import base64
import faulthandler
import gc
import json
import math
import mmap
import os
import random
import resource
import statistics
import sys
import threading
import time
from array import array
from collections.abc import Callable, Sequence
from typing import Any

from _budget import Meter, install
from _contenders import CONTENDERS, Contender, FireCallback, Unavailable

Result = dict[str, Any]

_HEADER = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()


def mint_jwt(exp: float) -> str:
    """An unsigned JWT whose payload is just ``{"exp": exp}``."""
    payload = base64.urlsafe_b64encode(json.dumps({"exp": exp}).encode()).rstrip(b"=").decode()
    return f"{_HEADER}.{payload}.x"


def proc_status(field: str) -> int:
    """A number from /proc/self/status (VmRSS in kB, Threads)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_bytes() -> int:
    return proc_status("VmRSS") * 1024


def os_threads() -> int:
    return proc_status("Threads")


def cpu_seconds() -> tuple[float, int]:
    """Process CPU time (all threads) and context switches so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime, usage.ru_nvcsw + usage.ru_nivcsw


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return float("nan")
    rank = math.ceil(fraction * len(sorted_values)) - 1
    return sorted_values[max(0, min(len(sorted_values) - 1, rank))]


def make(name: str, on_fire: FireCallback | None, *, at_delivery: bool = False) -> Contender:
    """Build a contender; ``at_delivery``: ``on_fire`` marks the token's delivery."""
    entry = CONTENDERS[name]
    if at_delivery and on_fire is not None and entry.delivered is not None:
        return entry.delivered(on_fire)
    return entry.factory(on_fire)


def thread_cpu_ns(threads: Sequence[threading.Thread]) -> int:
    """CPU time the given threads have run, from /proc's schedstat (ns; ended threads: 0)."""
    total = 0
    for thread in threads:
        try:
            with open(f"/proc/self/task/{thread.native_id}/schedstat") as stat:
                total += int(stat.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


class ThreadLimit(Exception):
    """The OS refused a thread: the contender cannot hold this many sessions."""

    def __init__(self, step: str, index: int, error: BaseException) -> None:
        super().__init__(f"{step}: {type(error).__name__}: {error}")
        self.step = step
        self.index = index


class OpTimer:
    """Per-call latencies and per-round wall times for one kind of operation.

    The latency array is allocated up front, so that it is in the RSS baseline.
    """

    def __init__(self, label: str, n: int, rounds: int) -> None:
        self.label = label
        self.n = n
        self.latencies = array("q", bytes(8 * n * rounds))
        self.rounds: list[float] = []

    def run(self, op: Callable[[int], None], order: Sequence[int]) -> None:
        """Run ``op(i)`` for each i in ``order``, timing each call and the round."""
        clock, latencies, offset = time.perf_counter_ns, self.latencies, len(self.rounds) * self.n
        position = 0
        start = time.perf_counter()
        try:
            for position, index in enumerate(order):
                began = clock()
                op(index)
                latencies[offset + position] = clock() - began
        except RuntimeError as error:
            # "can't start new thread" (bare Timer), or token_refresh's wrapper of it.
            raise ThreadLimit(self.label, position, error) from error
        self.rounds.append(time.perf_counter() - start)

    def summary(self) -> Result:
        """The median round's throughput, and latency percentiles over every call."""
        seconds = statistics.median(self.rounds)
        done = sorted(self.latencies[: len(self.rounds) * self.n])
        return {
            "seconds": seconds,
            "ops_per_s": self.n / seconds if seconds > 0 else float("inf"),
            "p50_us": percentile(done, 0.50) / 1000,
            "p99_us": percentile(done, 0.99) / 1000,
            "rounds": len(self.rounds),
        }


def run_ops(spec: Result) -> Result:
    """Throughput and latency per op, RSS and threads per pending session, idle CPU, close().

    Small N are repeated in rounds (schedule, reschedule, cancel) so that a
    round is not over before the clock can see it; memory, threads and idle
    CPU are measured once, in the first round, with exactly N pending.
    """
    name, n, idle = spec["contender"], int(spec["n"]), float(spec["idle"])
    rounds = max(1, min(int(spec.get("rounds", 20)), 10_000 // n))
    rng = random.Random(spec.get("seed", 1))
    ids = [f"session-{i:06d}" for i in range(n)]
    now = time.time()
    # Due an hour or two out, so nothing fires; random order, as real sessions arrive.
    dues = [now + 3600 + rng.random() * 3600 for _ in range(n)]
    later = [due + 60 for due in dues]
    tokens = [mint_jwt(due) for due in dues]
    later_tokens = [mint_jwt(due) for due in later]
    timers = {op: OpTimer(op, n, rounds) for op in ("schedule", "reschedule", "cancel")}
    result: Result = {"phase": "ops", "contender": name, "n": n, "rounds": rounds}

    gc.collect()
    threads_before = os_threads()
    idents_before = {thread.ident for thread in threading.enumerate()}
    contender = make(name, None)
    result["backend"] = getattr(contender, "backend", None)
    for i in range(16):  # first-call costs (a lazily started thread, say) are not per session
        contender.schedule(f"warm-up-{i}", dues[0], tokens[0])
    for i in range(16):
        contender.cancel(f"warm-up-{i}")
    gc.collect()
    rss_before = rss_bytes()
    result["threads_before"] = threads_before

    def schedule(i: int) -> None:
        contender.schedule(ids[i], dues[i], tokens[i])

    def reschedule(i: int) -> None:
        contender.schedule(ids[i], later[i], later_tokens[i])

    def cancel(i: int) -> None:
        contender.cancel(ids[i])

    try:
        for round_ in range(rounds):
            timers["schedule"].run(schedule, rng.sample(range(n), n))
            if round_ == 0:
                gc.collect()
                result["rss_before"] = rss_before
                result["rss_after"] = rss_after = rss_bytes()
                result["rss_per_session"] = (rss_after - rss_before) / n
                result["threads_after"] = threads_after = os_threads()
                result["python_threads_after"] = threading.active_count()
                result["threads_added"] = threads_after - threads_before
                # The scheduler's own threads, and the whole process (read inside
                # the threads' window, so reading /proc is not in theirs).
                mine = [t for t in threading.enumerate() if t.ident not in idents_before]
                threads0 = thread_cpu_ns(mine)
                cpu0, switches0 = cpu_seconds()
                time.sleep(idle)
                cpu1, switches1 = cpu_seconds()
                threads1 = thread_cpu_ns(mine)
                result["idle_seconds"] = idle
                result["idle_cpu_seconds"] = cpu1 - cpu0
                result["idle_switches"] = switches1 - switches0
                result["idle_scheduler_threads"] = len(mine)
                result["idle_scheduler_cpu_seconds"] = (threads1 - threads0) / 1e9
            timers["reschedule"].run(reschedule, rng.sample(range(n), n))
            timers["cancel"].run(cancel, rng.sample(range(n), n))
        for op, timer in timers.items():
            result[op] = timer.summary()
        OpTimer("schedule again", n, 1).run(schedule, range(n))
    except ThreadLimit as limit:
        result["failed_at"] = limit.index
        result["failure"] = str(limit)
        return result
    began = time.perf_counter()
    contender.close()
    result["close_seconds"] = time.perf_counter() - began
    result["threads_after_close"] = os_threads()
    return result


def spin(stop: threading.Event, counter: list[int]) -> None:
    """A CPU-bound Python thread: it gives up the GIL only when forced to."""
    iterations = 0
    while not stop.is_set():
        iterations += 1
    counter.append(iterations)


class FireLog:
    """Due and fire times in a file-backed array, so that they outlive the process.

    With thousands of threads fighting over the GIL, the main thread may not
    run again for many seconds; the parent then kills this process and reads
    the file (see ``lateness_from_file``). Layout, float64: a header (schedule
    seconds, overrun), N due times, N fire times (NaN until fired).
    """

    HEADER = 2

    def __init__(self, path: str, n: int) -> None:
        self.n = n
        size = 8 * (self.HEADER + 2 * n)
        with open(path, "w+b") as file:
            file.truncate(size)
            self._map = mmap.mmap(file.fileno(), size)
        self.view = memoryview(self._map).cast("d")
        self.view[self.HEADER + n :] = array("d", [math.nan]) * n
        self.view[0] = self.view[1] = math.nan

    def set_dues(self, dues: Sequence[float]) -> None:
        self.view[self.HEADER : self.HEADER + self.n] = array("d", dues)


def lateness_stats(view: Sequence[float], n: int) -> Result:
    """Lateness percentiles from a FireLog's numbers; a refresh that never ran counts as late."""
    start = FireLog.HEADER
    late_ms = sorted(
        (fired - due) * 1000
        for due, fired in zip(view[start : start + n], view[start + n : start + 2 * n], strict=True)
        if not math.isnan(fired)
    )
    fired = len(late_ms)
    within_5s = sum(1 for late in late_ms if late <= 5000)
    dues = view[start : start + n]
    fires = [fired for fired in view[start + n : start + 2 * n] if not math.isnan(fired)]
    late_ms += [math.inf] * (n - fired)  # a refresh that never ran is infinitely late
    return {
        "fired": fired,
        "unfired": n - fired,
        "p50_ms": percentile(late_ms, 0.50),
        "p99_ms": percentile(late_ms, 0.99),
        "max_ms": late_ms[-1] if late_ms else math.nan,
        "min_ms": late_ms[0] if late_ms else math.nan,
        "within_5s": within_5s / n if n else math.nan,
        # From the first due time to the last fire (or delivery) that happened.
        "last_after_first_due_s": max(fires) - min(dues) if fires and n else math.nan,
    }


def lateness_from_file(path: str, n: int) -> Result:
    """What a killed lateness worker had recorded (called by the parent)."""
    data = array("d")
    with open(path, "rb") as file:
        data.frombytes(file.read())
    if len(data) != FireLog.HEADER + 2 * n or math.isnan(data[0]):
        return {"error": "killed before its sessions were scheduled"}
    result = lateness_stats(data, n)
    result["schedule_seconds"], result["overran_seconds"] = data[0], data[1]
    return result


class GcLog:
    """The garbage collector's passes from ``begin()`` to ``end()``: per generation, how
    many and the longest (a full pass over 10,000 sessions' objects holds every thread).

    Timed by ``gc.callbacks``, which run Python code: a switch to another
    thread inside one is counted in the pass, so the longest is an upper bound.
    """

    def __init__(self) -> None:
        self._began = 0.0
        self._passes: list[tuple[int, float]] = []
        self._on = False

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if not self._on:
            return
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self._passes.append((info["generation"], time.perf_counter() - self._began))

    def begin(self) -> None:
        self._on = True
        gc.callbacks.append(self._callback)

    def end(self) -> Result:
        self._on = False
        gc.callbacks.remove(self._callback)
        return {
            f"gen{generation}": [
                sum(1 for g, _ in self._passes if g == generation),
                round(max((s for g, s in self._passes if g == generation), default=0.0) * 1e3, 2),
            ]
            for generation in (0, 1, 2)
        }


def run_lateness(spec: Result, meter: Meter | None = None) -> Result:
    """Firing lateness for N sessions due at random instants within ``window`` seconds.

    The ``storm`` phase is the same run, timed where each token is delivered
    (``on_refresh``, for token_refresh) rather than where its refresh starts.
    A ``meter`` counts from the end of scheduling to the last delivery.
    """
    name, n = spec["contender"], int(spec["n"])
    at_delivery = spec["phase"] in ("storm", "budget")
    window, busy, lead = float(spec["window"]), bool(spec["busy"]), float(spec["lead"])
    rng = random.Random(spec.get("seed", 2))
    ids = [f"session-{i:06d}" for i in range(n)]
    offsets = [rng.random() * window for _ in range(n)]
    log = FireLog(spec["log"], n)
    view, slots = log.view, {session: FireLog.HEADER + n + i for i, session in enumerate(ids)}
    hits: list[None] = []
    all_fired = threading.Event()
    wall = time.time

    def on_fire(session_id: str) -> None:
        view[slots[session_id]] = wall()
        hits.append(None)  # list.append is atomic: a count no thread can lose
        if len(hits) >= n:
            all_fired.set()

    threads_before = os_threads()
    contender = make(name, on_fire, at_delivery=at_delivery)
    gc.collect()
    sample = time.perf_counter()
    for _ in range(200):
        mint_jwt(1_800_000_000.5)
    mint_estimate = (time.perf_counter() - sample) / 200 * n
    base = time.time() + lead + mint_estimate
    dues = [base + offset for offset in offsets]
    log.set_dues(dues)
    tokens = [mint_jwt(due) for due in dues]
    result: Result = {"phase": spec["phase"], "contender": name, "n": n, "busy": busy}
    result["window"] = window
    started = time.time()
    try:
        for i in rng.sample(range(n), n):
            contender.schedule(ids[i], dues[i], tokens[i])
    except RuntimeError as error:
        result["failed_at"] = len(hits)
        result["failure"] = f"schedule: {type(error).__name__}: {error}"
        return result
    scheduled = time.time()
    result["schedule_seconds"] = view[0] = scheduled - started
    # Positive when scheduling ran into the window: early timers may have fired late.
    result["overran_seconds"] = view[1] = scheduled - min(dues)
    stop = threading.Event()
    counter: list[int] = []
    spinner = threading.Thread(target=spin, args=(stop, counter), daemon=True)
    if busy:
        spinner.start()
    cpu0, _ = cpu_seconds()
    gc_log = GcLog()
    gc_log.begin()
    if meter is not None:
        meter.begin()
    deadline = base + window + float(spec.get("drain", 3.0))
    while (left := deadline - time.time()) > 0 and not all_fired.wait(min(left, 0.1)):
        if len(hits) + getattr(contender, "missed", 0) >= n:
            break
    if meter is not None:
        meter.end()
    # Collections from the end of scheduling to the last delivery: [passes, longest ms].
    result["gc"] = gc_log.end()
    stop.set()
    if busy:
        spinner.join(10)
    result["cpu_seconds"] = cpu_seconds()[0] - cpu0
    result["wall_seconds"] = time.time() - scheduled
    # After the refreshes ran: token_refresh's worker pool exists now, and for
    # the thread backend every session holds a follow-up timer thread.
    result["threads_added_after_fire"] = os_threads() - threads_before
    result.update(lateness_stats(view, n))
    result["missed"] = getattr(contender, "missed", 0)
    closer = threading.Thread(target=contender.close, daemon=True)
    began = time.perf_counter()
    closer.start()
    closer.join(float(spec.get("close_limit", 10.0)))
    result["close_seconds"] = time.perf_counter() - began
    result["closed"] = not closer.is_alive()
    return result


def run_budget(spec: Result) -> Result:
    """A calm storm run, counting locks, waits and context switches per delivered refresh.

    Instrumented before the contender (and token_refresh) is imported; the
    counts run from the end of scheduling to the last delivery, so they hold
    the timer wake-ups, hand-offs and deliveries, and any timer armed anew.
    """
    install()
    meter = Meter()
    result = run_lateness(spec, meter)
    delivered = int(result.get("fired", 0))
    result.update(meter.result)
    for kind in ("acquires", "waits", "notifies", "queue_ops"):
        result[f"{kind}_per_refresh"] = meter.result.get(kind, 0) / delivered if delivered else None
    switches = meter.result.get("voluntary_switches", 0) + meter.result.get(
        "involuntary_switches", 0
    )
    result["switches_per_refresh"] = switches / delivered if delivered else None
    return result


def run_probe(spec: Result) -> Result:
    """Which contenders can be built here, and why not."""
    status: dict[str, str] = {}
    for name in CONTENDERS:
        try:
            contender = make(name, None)
        except Unavailable as error:
            status[name] = f"unavailable: {error}"
            continue
        contender.close()
        status[name] = "ok: " + str(getattr(contender, "backend", "") or "")
    return {"phase": "probe", "status": status}


PHASES: dict[str, Callable[[Result], Result]] = {
    "probe": run_probe,
    "ops": run_ops,
    "lateness": run_lateness,
    "storm": run_lateness,
    "budget": run_budget,
}


def main() -> None:
    spec: Result = json.loads(sys.argv[1])
    faulthandler.dump_traceback_later(float(spec.get("timeout", 600)), exit=True)
    try:
        result = PHASES[spec["phase"]](spec)
    except Unavailable as error:
        result = {"phase": spec["phase"], "unavailable": str(error)}
    except Exception as error:
        result = {"phase": spec["phase"], "error": f"{type(error).__name__}: {error}"}
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
