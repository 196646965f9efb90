"""A call on the caller's thread leaves every thread of ours parked when it returns.

uWSGI's default mode forks its workers in C without taking the GIL: its C code
holds the GIL from the end of the app's import and releases it just to fork.
A thread of ours that a ``schedule()`` at import started or woke, and that had
not parked yet, takes the GIL right then, and the forked worker waits for it
for ever (``tests/test_prefork.py``'s uWSGI cases hung about one run in three).

Each check here runs in a fresh interpreter, so that no other test's threads
are about: it traces every thread the library starts, makes a call, then
releases the GIL for a moment (as uWSGI does to fork) and asserts that no
thread of ours ran meanwhile. The refreshes are a minute or more out and
the clock watcher first looks after 2 s, so nothing of ours has a reason to run then.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.realclock, pytest.mark.timeout(60)]

SCRIPT = textwrap.dedent(
    """
    import base64, json, sys, threading, time

    from token_refresh import Scheduler

    ran = []  # (thread name, function) of every Python frame a thread of ours runs

    def trace(frame, event, arg):
        ran.append((threading.current_thread().name, frame.f_code.co_name, frame.f_lineno))
        return trace

    threading.settrace(trace)  # every thread started from now on; not this one

    def jwt(lifetime):
        def part(data):
            return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")
        return f"{part({'alg': 'none'})}.{part({'exp': time.time() + lifetime})}.sig"

    def quiet(what):
        # As uWSGI does just before it forks: let any thread that waits for
        # the GIL have it. A thread of ours still busy would run now.
        mark = len(ran)
        time.sleep(0.05)
        return {"call": what, "ran": sorted(set(ran[mark:]))}

    scheduler = Scheduler(
        lambda session_id: jwt(3600),
        lambda session_id, token: None,
        refresh_buffer=30,
        timers=sys.argv[1],
    )
    report = []
    # Refreshes due in a minute or two: a parked thread would wake later
    # than that by itself, so arming them wakes it.
    scheduler.schedule("a", jwt(150))
    report.append(quiet("schedule() of the first session"))
    scheduler.schedule("b", jwt(120))
    report.append(quiet("schedule() of a second session due sooner"))
    scheduler.schedule("a", jwt(90))
    report.append(quiet("schedule() of a new token due sooner than the old one"))
    scheduler.schedule_from_expires_in("c", 3600)
    report.append(quiet("schedule_from_expires_in()"))
    threading.settrace(None)
    scheduler.close()
    print(json.dumps(report))
    """
)


@pytest.mark.parametrize("timers", ["thread", "heap"])
def test_no_thread_of_ours_runs_after_schedule_returns(timers: str) -> None:
    """What a schedule() started or woke has parked by the time it returns."""
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, timers],
        capture_output=True,
        text=True,
        timeout=45,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    busy = [check for check in json.loads(result.stdout) if check["ran"]]
    assert busy == [], f"threads of ours still running after the call returned: {busy}"
