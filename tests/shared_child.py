"""A process that shares a token with the test's: test_shared.py runs ``shared_child.py SPEC``.

SPEC is JSON: ``store`` ("file" with ``path`` a directory, or "redis" with
``path`` a unix socket), ``key``, ``mode`` and, by mode:

- ``storm``: fork ``processes`` children (cheaper than starting as many
  interpreters), each of which prints ``ready``, waits for one byte on stdin,
  then calls the token from ``threads`` threads at once and prints the tokens
  they got as a JSON line. With ``refused`` (a token): a thread that got it
  rejects it (the server answered 401) and calls the token again.
- ``hold``: call the token with a fetch that prints ``fetching`` and then
  blocks for ever (until the test kills this process).
- ``fork-hold``: take the key's lease, fork a child that lives on, print
  ``forked <pid>`` (the child prints ``child``) and block for ever.
- ``fork-in-flock``: take the key's lease with a fork made between opening the
  lease file and locking it (as another thread's fork may land), print as
  ``fork-hold`` does, then ``locked``, and block for ever.

Every fetch appends a line to the file ``count``, so the test counts fetches
across processes.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

from token_refresh.shared import FileStore, RedisStore, SharedToken, Store


def make_store(spec: dict[str, Any]) -> Store:
    if spec["store"] == "file":
        return FileStore(spec["path"])
    import redis

    return RedisStore(redis.Redis(unix_socket_path=spec["path"]))


def main() -> None:
    spec: dict[str, Any] = json.loads(sys.argv[1])
    store = make_store(spec)

    def fetch() -> str:
        with open(spec["count"], "a", encoding="utf-8") as count:
            count.write(f"{os.getpid()}\n")
        if spec["mode"] == "hold":
            print("fetching", flush=True)
            sys.stdin.read()  # blocks until the test kills this process
        time.sleep(spec.get("fetch_seconds", 0.05))  # a token request's network time
        return f"token-from-{os.getpid()}"

    token = SharedToken(fetch, store, spec["key"], lease_ttl=spec.get("lease_ttl", 30.0))
    if spec["mode"] == "fork-in-flock":
        fork_in_flock(store, spec["key"])
        return
    if spec["mode"] == "fork-hold":
        lease = store.try_lease(spec["key"], 30.0)
        assert lease is not None
        fork_a_child_that_lives_on()
        sys.stdin.read()
        return
    if spec["mode"] == "hold":
        token()
        return
    children = []
    for _ in range(spec["processes"]):
        pid = os.fork()
        if pid == 0:
            storm(token, spec["threads"], refused=spec.get("refused"))
            sys.exit(0)  # as a worker exits: the at-exit hook lets the token reach the store
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)


def fork_a_child_that_lives_on() -> None:
    """Fork; the child prints ``child`` and waits for ever, the parent prints ``forked <pid>``."""
    pid = os.fork()
    if pid == 0:
        os.write(1, b"child\n")  # the at-fork hooks have run
        sys.stdin.read()  # the child lives on
        os._exit(0)
    os.write(1, f"forked {pid}\n".encode())


def fork_in_flock(store: Store, key: str) -> None:
    import fcntl

    real_flock = fcntl.flock

    def forking_flock(fd: Any, operation: int) -> None:
        fcntl.flock = real_flock  # one fork, on the first lock taken
        fork_a_child_that_lives_on()
        real_flock(fd, operation)

    fcntl.flock = forking_flock
    lease = store.try_lease(key, 30.0)
    assert lease is not None
    os.write(1, b"locked\n")
    sys.stdin.read()


def storm(token: SharedToken, threads: int, *, refused: str | None) -> None:
    # One write each (under PIPE_BUF, so atomic): the children share the pipe.
    os.write(1, b"ready\n")
    os.read(0, 1)  # one byte each: the go signal for every child at once
    results: list[str | None] = []

    def call() -> None:
        got = token()
        if got is not None and got == refused:
            token.reject(got)
            got = token()
        results.append(got)

    callers = [threading.Thread(target=call) for _ in range(threads)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    os.write(1, f"{json.dumps(results)}\n".encode())


if __name__ == "__main__":
    main()
