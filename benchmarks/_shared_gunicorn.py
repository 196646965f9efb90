"""gunicorn settings and app for benchmarks/shared.py: workers that each keep a token fresh.

``gunicorn -c benchmarks/_shared_gunicorn.py``, configured by the environment:
``BENCH_TOKEN_URL`` (the e2e OAuth server's token endpoint), ``BENCH_COUNT``
(a file each token request appends a line to) and ``BENCH_STORE`` (a
FileStore directory shared by the workers; empty: each worker fetches its own).
Each worker, once forked, fetches a token and keeps it fresh with a Scheduler
(refreshed 1 s before its exp).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

wsgi_app = "_shared_gunicorn:app"
pythonpath = os.path.dirname(os.path.abspath(__file__))
bind = "127.0.0.1:0"
workers = 4
preload_app = False

_keep: list[object] = []  # the worker's Scheduler and token source live as long as it does


def app(environ: dict[str, Any], start_response: Callable[..., object]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok\n"]


def post_fork(server: object, worker: object) -> None:
    from token_refresh import Scheduler
    from token_refresh.oauth import ClientCredentials
    from token_refresh.shared import FileStore, SharedToken

    url, count, directory = (
        os.environ[name] for name in ("BENCH_TOKEN_URL", "BENCH_COUNT", "BENCH_STORE")
    )

    client = ClientCredentials(url, "bench", "bench-secret")

    def fetch() -> str:
        with open(count, "a", encoding="utf-8") as file:
            file.write(f"{os.getpid()}\n")
        return client().access_token

    # min_ttl between the refresh buffer (1 s) and the lifetime: a token a sibling
    # fetched a moment ago is reused, the one about to expire is not.
    source = SharedToken(fetch, FileStore(directory), "bench", min_ttl=1.5) if directory else fetch

    def on_refresh(session_id: str, token: str) -> None:
        scheduler.schedule(session_id, token)

    scheduler = Scheduler(source, on_refresh, refresh_buffer=1.0, label="bench")
    _keep.extend([scheduler, source])
    first = source()
    assert first is not None
    scheduler.schedule("worker", first)
