"""Which session a get_access_token call is refreshing, for per-session credentials."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

_session: ContextVar[str | None] = ContextVar("token_refresh_session", default=None)


def current_session_id() -> str | None:
    """The session whose refresh is calling ``get_access_token`` now; None outside one.

    A token source whose sessions have their own credentials reads it::

        def get_access_token() -> str | None:
            return oauth_clients[current_session_id()].fetch_token()
    """
    return _session.get()


@contextlib.contextmanager
def refreshing(session_id: str) -> Iterator[None]:
    """Run the block as the refresh of ``session_id``."""
    token = _session.set(session_id)
    try:
        yield
    finally:
        _session.reset(token)
