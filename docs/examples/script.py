"""A plain script: keep a token fresh while a batch job runs, then exit at once.

    python docs/examples/script.py

The job exports a few pages from an API, each call with the newest token. A
long export would outlive its first token; the scheduler refreshes it five
minutes before it expires. This one is quick, so when it ends the refresh is
still 55 minutes away, and the script exits all the same: the scheduler's timers
are daemon threads, and nothing needs ``close()``.
"""

from __future__ import annotations

import base64
import itertools
import json
import threading
import time

from token_refresh import Scheduler, decode_jwt_payload, format_duration

TOKEN_LIFETIME = 3600.0  # seconds each token lives
PAGES = 3


class AuthServer:
    """Stands in for the token endpoint: issues numbered, unsigned JWTs."""

    def __init__(self) -> None:
        self._serials = itertools.count(1)

    def issue_token(self) -> str:
        payload = {"n": next(self._serials), "exp": time.time() + TOKEN_LIFETIME}
        body = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")
        return f"e30.{body}.unsigned"


class CurrentToken:
    """The newest token; on_refresh replaces it from a scheduler thread."""

    def __init__(self, token: str) -> None:
        self._token = token
        self._lock = threading.Lock()

    def get(self) -> str:
        with self._lock:
            return self._token

    def on_refresh(self, session_id: str, token: str) -> None:
        with self._lock:
            self._token = token


def export_page(page: int, token: str) -> str:
    """Stands in for one API call made with ``token``."""
    payload = decode_jwt_payload(token)
    assert isinstance(payload, dict)
    return f"page {page}: 20 rows (with token #{payload['n']})"


def main() -> int:
    auth = AuthServer()
    current = CurrentToken(auth.issue_token())
    scheduler = Scheduler(auth.issue_token, current.on_refresh, label="export")
    scheduler.schedule("export", current.get())

    for page in range(1, PAGES + 1):
        print(export_page(page, current.get()))

    due = scheduler.next_refresh_at("export")
    assert due is not None
    # To the minute: like the seed's, format_duration(3299.99) says "54m 60s".
    print(f"next refresh due in {format_duration(60 * round((due - time.time()) / 60))}")
    print(f"exported {PAGES} pages")
    return 0  # no close(): the pending refresh does not keep the script alive


if __name__ == "__main__":
    raise SystemExit(main())
