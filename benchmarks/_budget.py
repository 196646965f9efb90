"""What one refresh costs: lock acquisitions, waits and context switches, counted.

``install()`` replaces ``threading.Lock``, ``RLock`` and ``Condition`` and
``queue.SimpleQueue`` with counting versions; it must run before
``token_refresh`` is imported (``from threading import Lock`` would keep the
real one), in a process of its own (``benchmarks/_worker.py``'s ``budget``
phase). Everything built on them is counted too: ``threading.Event``,
``Semaphore``, ``Timer``, ``Thread``'s start handshake and ``queue.Queue``.

Each primitive is charged to the line that created it: the innermost frame in
``token_refresh/`` or ``benchmarks/_contenders.py`` (a bare contender's own
code), and the line further out that built its owner. Primitives the harness
creates (its ``Event``, the interpreter's) are left out. Counted, per site:

- ``acquires``: every acquisition of a lock, blocking or not, ``with`` included,
  and a condition's re-acquisition when its ``wait()`` returns;
- ``waits``: ``Condition.wait()`` calls (``Event.wait()`` and ``wait_for()`` go
  through it) and ``SimpleQueue.get()`` calls that found the queue empty: each one a
  thread that blocks and is woken again;
- ``notifies``: ``notify()``/``notify_all()`` calls that had a waiter to wake;
- ``queue_ops``: ``SimpleQueue.put()`` and ``get()`` calls.

Not seen: locks taken inside C code (``SimpleQueue``'s own, the GIL), and
``Thread.join()``'s wait on the thread's end. Context switches come from
``getrusage`` for the process (ended threads included) less the main thread's.
"""

from __future__ import annotations

import _thread
import linecache
import queue
import resource
import sys
import threading
from importlib.util import find_spec
from pathlib import Path
from types import FrameType
from typing import Any

Result = dict[str, Any]
KINDS = ("acquires", "waits", "notifies", "queue_ops")


class Tally:
    """The counts of one creation site. ``list.append`` is atomic: no count is lost."""

    def __init__(self) -> None:
        self.counts: dict[str, list[None]] = {kind: [] for kind in KINDS}

    def snapshot(self) -> dict[str, int]:
        return {kind: len(marks) for kind, marks in self.counts.items()}


#: Creation site ("token_refresh/_runtime.py:211 <source line>") -> its counts.
SITES: dict[str, Tally] = {}
_IGNORED = Tally()  # the harness's primitives: counted nowhere
_ROOTS: tuple[str, ...] = ()


def _site() -> Tally:
    """The tally of the innermost caller frame in token_refresh/ or _contenders.py.

    The key also names the nearest such frame of another function further out
    (the one that built the object holding the lock), so that two instances of
    one class built for different purposes, say the heap timer and the fetch
    watchdog, are told apart.
    """
    frame: FrameType | None = sys._getframe(2)
    inner: FrameType | None = None
    while frame is not None:
        if frame.f_code.co_filename.startswith(_ROOTS):
            if inner is None:
                inner = frame
            elif frame.f_code is not inner.f_code:
                break
        frame = frame.f_back
    if inner is None:
        return _IGNORED
    path = Path(inner.f_code.co_filename)
    key = f"{path.parent.name}/{path.name}:{inner.f_lineno}"
    if frame is not None:
        key += f" (from {Path(frame.f_code.co_filename).name}:{frame.f_lineno})"
    source = linecache.getline(str(path), inner.f_lineno).strip()
    return SITES.setdefault(f"{key} `{source[:70]}`", Tally())


class CountedLock:
    """``threading.Lock``, counting acquisitions."""

    def __init__(self) -> None:
        self._inner = _thread.allocate_lock()
        self._acquires = _site().counts["acquires"]

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        self._acquires.append(None)
        return self._inner.acquire(blocking, timeout)

    def release(self) -> None:
        self._inner.release()

    def locked(self) -> bool:
        return self._inner.locked()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self._inner.release()

    def _is_owned(self) -> bool:
        # What Condition does for a plain lock, without counting its probe.
        if self._inner.acquire(False):
            self._inner.release()
            return False
        return True

    def _at_fork_reinit(self) -> None:
        self._inner._at_fork_reinit()  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)  # anything else a newer Python's lock has


class CountedRLock:
    """``threading.RLock``, counting acquisitions (and re-acquisitions after a wait)."""

    def __init__(self) -> None:
        self._inner: Any = _REAL_RLOCK()
        self._acquires = _site().counts["acquires"]

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        self._acquires.append(None)
        return bool(self._inner.acquire(blocking, timeout))

    def release(self) -> None:
        self._inner.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self._inner.release()

    def _is_owned(self) -> bool:
        return bool(self._inner._is_owned())

    def _release_save(self) -> object:
        return self._inner._release_save()

    def _acquire_restore(self, state: object) -> None:
        self._acquires.append(None)
        self._inner._acquire_restore(state)

    def _at_fork_reinit(self) -> None:
        self._inner._at_fork_reinit()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


_REAL_RLOCK = threading.RLock
_REAL_CONDITION = threading.Condition
_REAL_SIMPLE_QUEUE = queue.SimpleQueue


class CountedCondition(_REAL_CONDITION):
    """``threading.Condition``, counting waits and the notifies that wake someone."""

    def __init__(self, lock: Any = None) -> None:
        super().__init__(lock)
        counts = _site().counts
        self._waits, self._notifies = counts["waits"], counts["notifies"]

    def wait(self, timeout: float | None = None) -> bool:
        self._waits.append(None)
        return super().wait(timeout)

    def notify(self, n: int = 1) -> None:
        if self._waiters and n:  # type: ignore[attr-defined]
            self._notifies.append(None)
        super().notify(n)


class CountedSimpleQueue(_REAL_SIMPLE_QUEUE):  # type: ignore[type-arg]
    """``queue.SimpleQueue``, counting puts and gets (a get on an empty queue: a wait)."""

    def __init__(self) -> None:
        counts = _site().counts
        self._ops, self._waits = counts["queue_ops"], counts["waits"]

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        self._ops.append(None)
        super().put(item, block, timeout)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        self._ops.append(None)
        if block and self.empty():
            self._waits.append(None)
        return super().get(block, timeout)


def install() -> None:
    """Count from now on; ``token_refresh`` must not be imported yet."""
    global _ROOTS
    if "token_refresh" in sys.modules:
        raise RuntimeError("the budget run must instrument threading before token_refresh loads")
    spec = find_spec("token_refresh")
    package = Path(spec.origin).parent if spec is not None and spec.origin else None
    here = str(Path(__file__).resolve().parent / "_contenders.py")
    _ROOTS = (here, *([str(package) + "/"] if package else []))
    vars(threading).update(Lock=CountedLock, RLock=CountedRLock, Condition=CountedCondition)
    vars(queue).update(SimpleQueue=CountedSimpleQueue)


def context_switches() -> tuple[int, int]:
    """Voluntary and involuntary switches of every thread but this one, so far.

    The process's figures include threads that have ended (Linux adds them up
    as they exit); the calling thread's own are taken off.
    """
    process = resource.getrusage(resource.RUSAGE_SELF)
    mine = resource.getrusage(resource.RUSAGE_THREAD)
    return process.ru_nvcsw - mine.ru_nvcsw, process.ru_nivcsw - mine.ru_nivcsw


class Meter:
    """Counts between ``begin()`` and ``end()``, called from the same (main) thread."""

    def __init__(self) -> None:
        self._sites: dict[str, dict[str, int]] = {}
        self._switches = (0, 0)
        self.result: Result = {}

    def begin(self) -> None:
        self._sites = {site: tally.snapshot() for site, tally in list(SITES.items())}
        self._switches = context_switches()

    def end(self) -> None:
        voluntary, involuntary = context_switches()
        sites: dict[str, dict[str, int]] = {}
        for site, tally in list(SITES.items()):
            before = self._sites.get(site, dict.fromkeys(KINDS, 0))
            counts = {kind: count - before[kind] for kind, count in tally.snapshot().items()}
            if any(counts.values()):
                sites[site] = counts
        totals = {kind: sum(counts[kind] for counts in sites.values()) for kind in KINDS}
        self.result = {
            **totals,
            "voluntary_switches": voluntary - self._switches[0],
            "involuntary_switches": involuntary - self._switches[1],
            "sites": sites,
        }
