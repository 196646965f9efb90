"""Which session a token source is refreshing: a context variable the scheduler sets."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_session_id: ContextVar[str | None] = ContextVar("token_refresh_session_id", default=None)


def current_session_id() -> str | None:
    """The session whose refresh is calling ``get_access_token``; None outside one.

    A Scheduler sets it around every ``get_access_token`` call, so a token
    source with per-session credentials knows which ones to use. It follows
    the call into threads started with ``contextvars.copy_context()``, as a
    ``SharedToken`` fetch is.
    """
    return _session_id.get()


@contextmanager
def session_context(session_id: str | None) -> Iterator[None]:
    """Make ``current_session_id()`` return ``session_id`` inside the block."""
    reset = _session_id.set(session_id)
    try:
        yield
    finally:
        _session_id.reset(reset)
