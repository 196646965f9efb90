"""Which session a token source is refreshing: a context variable the scheduler sets."""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from .events import ServedBy

_T = TypeVar("_T")

_session_id: ContextVar[str | None] = ContextVar("token_refresh_session_id", default=None)


def current_session_id() -> str | None:
    """The session whose refresh is calling ``get_access_token``; None outside one.

    A Scheduler sets it around every ``get_access_token`` call, so a token
    source with per-session credentials knows which ones to use. It follows
    the call into threads started with ``contextvars.copy_context()``, as a
    ``SharedToken`` fetch is.
    """
    return _session_id.get()


class session_context:  # lower case: used as a function
    """Make ``current_session_id()`` return ``session_id`` inside the block (tests)."""

    __slots__ = ("_reset", "_session_id")

    def __init__(self, session_id: str | None) -> None:
        self._session_id = session_id

    def __enter__(self) -> None:
        self._reset = _session_id.set(self._session_id)

    def __exit__(self, *exc_info: object) -> None:
        _session_id.reset(self._reset)


class ServedBySlot:
    """Where the token of the get_access_token call in progress came from."""

    __slots__ = ("skew", "value")

    def __init__(self) -> None:
        self.value: ServedBy | None = None
        self.skew: float | None = None  # the server's clock minus ours, when the token came


_served_by: ContextVar[ServedBySlot | None] = ContextVar("token_refresh_served_by", default=None)


class served_by_context:  # lower case: used as a function
    """A refresh's slot, set inside the block (tests; the Scheduler uses call_as_refresh)."""

    __slots__ = ("_reset", "_slot")

    def __enter__(self) -> ServedBySlot:
        self._slot = ServedBySlot()
        self._reset = _served_by.set(self._slot)
        return self._slot

    def __exit__(self, *exc_info: object) -> None:
        _served_by.reset(self._reset)


def call_as_refresh(session_id: str, slot: ServedBySlot, call: Callable[[], _T]) -> _T:
    """Call ``call`` as a Scheduler's refresh of ``session_id`` (a SharedToken inside
    says in ``slot`` who served it).

    Both variables are set in a copy of the caller's context, which nothing
    has to undo: an interrupt at any line (a ``KeyboardInterrupt`` on a
    ManualClock's thread) cannot leave them set for the calls after it.
    """

    def refresh() -> _T:
        _session_id.set(session_id)
        _served_by.set(slot)
        return call()

    return contextvars.copy_context().run(refresh)


def in_refresh() -> bool:
    """Whether a Scheduler's refresh is the caller (it wants a new token, not the last one)."""
    return _served_by.get() is not None


def note_served_by(value: ServedBy, skew: float | None = None) -> None:
    """Tell the scheduler calling us (if any) who fetched the token, and the skew then seen."""
    slot = _served_by.get()
    if slot is not None:
        slot.value, slot.skew = value, skew


def served_so_far() -> tuple[ServedBy | None, float | None]:
    """Inside a get_access_token call: who served its token and the skew it noted, if told."""
    slot = _served_by.get()
    return (None, None) if slot is None else (slot.value, slot.skew)
