"""One token, fetched once, for every thread, process (FileStore) or host (RedisStore)."""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Set
from contextlib import contextmanager
from dataclasses import replace
from typing import NoReturn, TypeVar

from . import _retry, _stores
from ._context import current_session_id, in_refresh, note_served_by
from ._expiry import SKEW_THRESHOLD, SkewTracker, expires, received_skew, reuse_until
from ._format import fingerprint, format_skew
from ._jwt import decode_jwt_expiry
from ._retry import RetryPolicy
from ._stores import (
    REDIS_COMMANDS,
    FileStore,
    Grant,
    Lease,
    MemoryStore,
    Record,
    RedisStore,
    Store,
    StoreUnavailable,
)
from ._stores import printable as _printable
from ._stores import seconds as _seconds
from ._stores import served_by as _served_by
from ._stores import this_process as _this_process
from .events import ServedBy

__all__ = [
    "FETCH_TIMEOUT",
    "REDIS_COMMANDS",
    "FetchTimeout",
    "FileStore",
    "Grant",
    "InvalidGrant",
    "Lease",
    "MemoryStore",
    "NoFreshToken",
    "RateLimited",
    "Record",
    "RedisStore",
    "SharedToken",
    "Store",
    "StoreUnavailable",
]

_log = logging.getLogger("token_refresh.shared")
_V = TypeVar("_V")

#: Seconds a call waits for its token beyond ``lease_ttl`` unless ``fetch_timeout=`` says
#: otherwise, so that a caller outlasts a dead holder's lease and still fetches.
FETCH_TIMEOUT = 5.0
#: Seconds between looks at the store while another process holds the lease.
_POLL_INTERVAL = 0.02
#: Fetches still running past fetch_timeout for one key before calls fail at once.
_MAX_STUCK = 3

_live_tokens: weakref.WeakSet[SharedToken] = weakref.WeakSet()
#: Seconds an exiting interpreter waits, in all, for delivered tokens still being stored.
_EXIT_WAIT = 5.0
_writing: set[threading.Thread] = set()  # threads storing a token their callers already have


@atexit.register
def _finish_writes() -> None:
    """At exit, let tokens already delivered reach the store (``_EXIT_WAIT`` seconds in all)."""
    give_up = time.monotonic() + _EXIT_WAIT
    for thread in list(_writing):
        thread.join(max(0.0, give_up - time.monotonic()))


class _Default:
    """The type of a keyword's "not given" marker."""


_DEFAULT = _Default()


class FetchTimeout(TimeoutError):
    """No token for the key within ``fetch_timeout``: the fetch or the store did not answer."""


class RateLimited(Exception):
    """Raise it from a fetch told to wait: a 429 with ``Retry-After``, or a failing endpoint.

    Every caller sharing the key, in every process the store reaches, then
    gets a ``RateLimited`` without fetching until ``retry_after`` seconds
    have passed.
    """

    def __init__(self, retry_after: float, key: str | None = None) -> None:
        self.retry_after = _seconds(retry_after, "retry_after")
        self.key = key
        where = "" if key is None else f" for key {key!r}"
        super().__init__(f"token endpoint{where} asked to retry after {self.retry_after:.3g}s")


class InvalidGrant(Exception):
    """Raise it from a rotating fetch whose refresh token was refused (OAuth ``invalid_grant``).

    It may only mean that a sibling rotated first, so the SharedToken waits
    up to ``invalid_grant_wait`` seconds for a newer record before the call
    fails with it.
    """


class NoFreshToken(LookupError):
    """A reader's store holds no good token for the key (``SharedToken(None, store)``).

    Nothing was stored for the key, or the stored token expires within
    ``min_ttl`` (or a server refused it): whatever keeps the key fresh (a
    ``token-refresh agent``) is not running, or is failing. The message names
    the key and the store, never the token.
    """


class _Flight:
    """One fetch in progress (or just done) for a key, shared by the calls that join it."""

    __slots__ = ("done", "error", "fetched", "finished", "grant", "key", "started")

    def __init__(self, key: str) -> None:
        self.key = key
        self.started = time.monotonic()
        self.finished = 0.0  # monotonic: a clock step neither stretches nor ends the sharing
        self.done = threading.Event()
        self.grant: Grant | None = None
        self.fetched: ServedBy | None = None  # who fetched the grant, for the flight's starter
        self.error: BaseException | None = None


def _own_copy(error: BaseException) -> BaseException:
    """The shared failure as one caller's own exception: same type, message and attributes.

    Raising one object from many threads would tie each caller's traceback
    and ``__context__`` (what it was handling) to the others'.
    """
    try:
        own = type(error).__new__(type(error), *error.args)
        # An OSError subclass with its own __init__ (OAuthError) gets no args from __new__.
        own.args = error.args
        own.__dict__.update(vars(error))
    except Exception:  # a class that cannot be made without its __init__: share it
        return error
    return own


def _holds(record: Record | None, token: str, *, refused: bool | None = None) -> bool:
    """Whether the record's access token is ``token`` (and it is marked ``refused`` or not)."""
    return (
        record is not None
        and record.grant is not None
        and record.grant.access_token == token
        and refused in (None, record.refused)
    )


def _checked_fetch(
    fetch: Callable[..., str | Grant | None] | None,
) -> Callable[..., str | Grant | None] | None:
    if fetch is not None and not callable(fetch):
        raise TypeError("fetch must be callable, or None for a reader")
    return fetch


def _raise_own(error: BaseException) -> NoReturn:
    """Raise a shared failure to one caller: its own copy, chained to the fetch's exception."""
    own = _own_copy(error)
    if own is error:
        raise error
    raise own from error


def _alive(record: Record | None) -> str | None:
    """The record's token if it has not expired and no server refused it, else None.

    An opaque token whose lifetime is not known (no ``expires_at``) may have
    expired: None.
    """
    if record is None or record.grant is None or record.refused:
        return None
    token = record.grant.access_token
    expiry = record.grant.expires_at or decode_jwt_expiry(token)
    return None if expiry is None or expiry <= time.time() else token


def _only(values: dict[str, _V], keys: Set[str]) -> dict[str, _V]:
    """The entries of ``values`` whose key is in ``keys``."""
    return {key: value for key, value in values.items() if key in keys}


def _warn(key: str, error: StoreUnavailable, outcome: str) -> None:
    _log.warning("[shared:%s] %s; %s", _printable(key), error, outcome)


#: A metrics hook: called as ``observe(kind, value, attributes)`` with kind
#: "call" (1, served_by or error.type), "fetch" (seconds, error.type on a
#: failure), "lease_wait" (seconds), "store_error" (1, operation, error.type),
#: "reject" (1: a refused token forced a fetch) or "clock_skew" (seconds, when it changed).
_Observer = Callable[[str, float, dict[str, str]], None]


class SharedToken:
    """A ``get_access_token`` that fetches once for every caller sharing its key.

    ``fetch()`` is your real token request: it returns an access token (a
    ``str``, or a :class:`Grant` to tell an opaque token's lifetime) or None.
    ``fetch=None`` makes a reader: a call returns the stored token while it has
    more than ``min_ttl`` seconds left and never fetches; otherwise it raises
    :class:`NoFreshToken` (another process, such as ``token-refresh agent``,
    keeps the key fresh in the store).
    With ``rotating=True`` it is called as ``fetch(previous)`` with the last
    :class:`Grant` stored for the key (None the first time) and returns the
    new :class:`Grant` with its new refresh token, stored together.

    A call returns a token from this process's cache or the store while it is
    good (a JWT, or a Grant with ``expires_at``: more than ``min_ttl`` seconds
    left; an opaque token: younger than ``max_age``), else joins the fetch in
    flight for the key, else starts one: it runs on a daemon thread, under the
    store's lease. The call returns the token, or None when ``fetch`` returned
    None, or raises: ``FetchTimeout`` after ``fetch_timeout`` seconds (default
    ``lease_ttl`` plus :data:`FETCH_TIMEOUT`, None: wait for ever), ``StoreUnavailable`` when the
    store fails before a token is fetched, ``RateLimited`` while the key is
    held back, or the fetch's own exception. A Scheduler counts None and every
    exception as a failure and retries. A failed fetch's outcome is shared
    with the calls that come within ``max_age`` after it, so a storm of callers
    does not hammer a failing endpoint either.

    With ``per_session=True`` each session has its own token, under the key
    ``f"{key}/{current_session_id()}"``; ``fetch`` reads
    :func:`token_refresh.current_session_id` to pick the credentials.

    When a server refuses a token before it expires, :meth:`reject` drops it
    so that the next call fetches, at most once per ``reject_interval``
    seconds (default 30, at least 1) for the key across every process
    sharing the store.

    With ``retry_policy=RetryPolicy(...)`` (for daemons; None: as above), a
    failed fetch holds the key back in the store for the policy's delay, so
    every process sharing it makes one token request per backoff step; and a
    call that would fail (or get None) returns instead the last good token
    while it has not expired (a JWT's ``exp`` or a Grant's ``expires_at``),
    with one WARNING per token. A Scheduler's refresh still gets the failure:
    it wants a new token, and backs off on its own ``retry_policy``.
    """

    def __init__(
        self,
        fetch: Callable[..., str | Grant | None] | None,
        store: Store | None = None,
        key: str = "default",
        min_ttl: float = 300.0,
        max_age: float | None = 5.0,
        lease_ttl: float = 30.0,
        *,
        fetch_timeout: float | _Default | None = _DEFAULT,
        per_session: bool = False,
        rotating: bool = False,
        invalid_grant_wait: float = 2.0,
        reject_interval: float = 30.0,
        retry_policy: RetryPolicy | None = None,
    ) -> None:
        if not isinstance(key, str) or not key:
            raise TypeError("key must be a non-empty str")
        self._fetch = _checked_fetch(fetch)
        self._store: Store = MemoryStore() if store is None else store
        self._key = key
        self._min_ttl = _seconds(min_ttl, "min_ttl")
        self._max_age = 0.0 if max_age is None else _seconds(max_age, "max_age")  # None: never
        self._lease_ttl = _seconds(lease_ttl, "lease_ttl")
        self._fetch_timeout = (
            self._lease_ttl + FETCH_TIMEOUT
            if isinstance(fetch_timeout, _Default)
            else _seconds(fetch_timeout, "fetch_timeout", optional=True)
        )
        if self._lease_ttl == 0 or self._fetch_timeout == 0:
            raise ValueError("lease_ttl and fetch_timeout must be positive")
        self._per_session = bool(per_session)
        self._rotating = bool(rotating)
        self._invalid_grant_wait = _seconds(invalid_grant_wait, "invalid_grant_wait")
        self._reject_interval = _seconds(reject_interval, "reject_interval")
        if self._reject_interval < 1:
            raise ValueError(f"reject_interval must be at least 1 second, not {reject_interval!r}")
        self._policy = _retry.checked(retry_policy)
        self._cache: dict[str, Record] = {}  # the last record this process saw, per key
        self._observers: tuple[_Observer, ...] = ()  # token_refresh.otel's hook
        self._prune_at = 64
        self._skew = SkewTracker()  # what this SharedToken's own fetches saw; reported once
        self._after_fork()
        _live_tokens.add(self)

    def _after_fork(self) -> None:
        """A new lock and no flights: at construction, and in a forked child."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._flights: dict[str, _Flight] = {}
        self._running: set[_Flight] = set()
        self._held: dict[str, float] = {}  # key -> monotonic time before which calls fail
        self._rejected: dict[str, str] = {}  # key -> the last token reject() dropped
        self._failing: dict[str, float] = {}  # key -> wall time this process saw it start failing
        self._kept: dict[str, str] = {}  # key -> the last good token served through a failure

    def __repr__(self) -> str:
        return f"SharedToken(key={_printable(self._key)!r}, store={self._store!r})"

    def __call__(self) -> str | None:
        """The access token: reused while good, else fetched once for every caller sharing it."""
        if self._pid != os.getpid():
            self._after_fork()  # forked without at-fork hooks (uWSGI)
        try:
            token, served_by = self._served()
        except BaseException as error:
            if self._observers:
                self._notify("call", 1.0, {"error.type": type(error).__name__})
            raise
        if token is not None:
            note_served_by(served_by, self._skew_for(token))
        if self._observers:
            outcome: dict[str, str] = (
                {"error.type": "no_token"}
                if token is None
                else {"token_refresh.served_by": served_by}
            )
            self._notify("call", 1.0, outcome)
        return token

    def _call(self) -> tuple[str | None, ServedBy]:
        key = self._key_for(current_session_id())
        began = time.monotonic()
        with self._lock:
            record = self._cache.get(key)
            if record is not None and record.grant is not None and self._usable(record):
                return record.grant.access_token, _served_by(record.writer)
            held = self._held.get(key, 0.0) - _stores._monotonic()
            if held > 0:
                raise RateLimited(held, _printable(key))
            flight = self._flights.get(key)
            start = flight is None or not self._joinable(flight, began)
            if start:
                if self._stuck(key, began) >= _MAX_STUCK:
                    raise FetchTimeout(
                        f"{_MAX_STUCK} fetches for key {_printable(key)!r} are still running "
                        "past fetch_timeout; not starting another"
                    )
                flight = self._flights[key] = _Flight(key)
                self._running.add(flight)
        assert flight is not None
        if start:
            self._start(flight)
        if not flight.done.wait(min(self._fetch_timeout - (time.monotonic() - began), 1e9)):
            raise FetchTimeout(
                f"no token for key {_printable(key)!r} within {self._fetch_timeout:g}s: "
                "the fetch or the store did not answer"
            )
        if flight.error is not None:
            _raise_own(flight.error)
        served_by: ServedBy = flight.fetched or "unknown"
        if served_by == "fetch" and not start:
            served_by = "thread"  # another call in this process started the fetch
        return (None if flight.grant is None else flight.grant.access_token), served_by

    def _served(self) -> tuple[str | None, ServedBy]:
        """A call's token and who served it (on the retry policy, the last good one if it fails)."""
        try:
            token, served_by = self._call() if self._fetch is not None else self._read()
        except Exception:
            kept = self._last_good()
            if kept is None:
                raise
            return kept
        if token is None:
            return self._last_good() or (None, served_by)
        return token, served_by

    def _last_good(self) -> tuple[str, ServedBy] | None:
        """On the retry policy, the last good token while it has not expired (else None).

        Never for a Scheduler's refresh: it wants a new token, and its failure
        is what makes it back off and retry.
        """
        session_id = current_session_id()
        if self._policy is None or in_refresh() or (self._per_session and session_id is None):
            return None
        key = self._key_for(session_id)
        record = self._last_record(key)
        token = _alive(record)
        if record is None or token is None:
            return None
        self._serving(key, token)
        return token, _served_by(record.writer)

    def _last_record(self, key: str) -> Record | None:
        """This process's last record of the key, else the store's (None if it fails too)."""
        with self._lock:
            record = self._cache.get(key)
        if record is None:
            with contextlib.suppress(Exception):
                record = self._store.read(key)
        return record

    def _serving(self, key: str, token: str) -> None:
        """Log, once per token, that the last good token is served through a failure."""
        with self._lock:
            warn = self._kept.get(key) != token
            self._kept[key] = token
        if warn:
            _log.warning(
                "[shared:%s] no new token (the token endpoint is failing); serving the last "
                "good one, %s, until it expires",
                _printable(key),
                fingerprint(token),
            )

    def _read(self) -> tuple[str, ServedBy]:
        """A reader's call: the cached or stored token while it is good, else NoFreshToken."""
        key = self._key_for(current_session_id())
        with self._lock:
            record = self._cache.get(key)
        if record is None or not self._usable(record):
            with self._store_errors("read"):
                record = self._store.read(key)
        if record is None or record.grant is None:
            problem = "holds no token for it"
        elif record.refused:
            problem = "holds a token a server refused"
        elif not self._usable(record):
            problem = f"holds no token with more than min_ttl={self._min_ttl:g}s left"
        else:
            with self._lock:
                self._cache[key] = record
            return record.grant.access_token, _served_by(record.writer)
        raise NoFreshToken(
            f"key {_printable(key)!r}: {self._store!r} {problem}; is the process that keeps "
            "it fresh (token-refresh agent) running?"
        )

    def _stuck(self, key: str, now: float) -> int:
        """How many of the key's fetches still run past fetch_timeout (lock held).

        A flight that delivered and is writing the store, or one dropped by
        reject() a moment ago, is not stuck.
        """
        return sum(
            running.key == key
            and not running.done.is_set()
            and now - running.started >= self._fetch_timeout
            for running in self._running
        )

    def _start(self, flight: _Flight) -> None:
        """Run the flight on a thread of its own, in a copy of the caller's context."""
        thread = threading.Thread(
            target=self._run,
            args=(flight, contextvars.copy_context()),
            name="token-refresh-shared",
            daemon=True,
        )
        try:
            thread.start()
        except RuntimeError as error:  # the OS refused a thread
            self._finish(flight, error=error)
            with self._lock:
                self._running.discard(flight)
            raise

    def reject(self, token: str) -> bool:
        """Tell that a server refused ``token``; True if this call forced a new fetch.

        If ``token`` is still the key's current token, in this process and in
        the store, it is dropped, so that the next call fetches a new one (a
        rotating fetch gets the refused grant, with its refresh token). If a
        newer token is there already, nothing happens: N concurrent rejections
        of one token, in any number of threads, processes or hosts, force one
        fetch. The first rejection always forces a fetch; after that the key
        gets at most one forced fetch per ``reject_interval`` seconds, counted
        by the store from the last one, so a token refused for ever (a wrong
        audience) costs one fetch per interval. Each forced fetch is logged at
        WARNING and reported to metrics (``token_refresh.shared.rejections``).
        Raises ``StoreUnavailable`` when the store fails. Per-session tokens
        reject the current session's.
        """
        key = self._key_for(current_session_id())
        began = time.monotonic()
        record = self._read_for_reject(key)
        forced = False
        if _holds(record, token, refused=False):
            assert record is not None
            with self._store_errors("reject"):
                forced = self._store.reject(key, record.version, interval=self._reject_interval)
            # Not marked: a sibling marked it or stored a newer token meanwhile, or the key's
            # last forced fetch is younger than reject_interval: then the token stays in use.
            if not forced and _holds(self._read_for_reject(key), token, refused=False):
                return False
        self._drop(key, token, began)
        if forced:
            _log.warning(
                "[shared:%s] a server refused the token; the next call fetches a new one "
                "(at most one forced fetch per %gs)",
                _printable(key),
                self._reject_interval,
            )
            self._notify("reject", 1.0, {})
        return forced

    def _read_for_reject(self, key: str) -> Record | None:
        with self._store_errors("read"):
            return self._store.read(key)

    def _drop(self, key: str, token: str, began: float) -> None:
        """Forget a refused token in this process: cached, or on its way from a flight."""
        with self._lock:
            self._rejected[key] = token  # a flight that read it before the mark does not cache it
            if _holds(self._cache.get(key), token):
                del self._cache[key]
            flight = self._flights.get(key)
            if flight is not None and flight.started <= began:
                del self._flights[key]  # calls from now on start a fetch of their own

    def _notify(self, kind: str, value: float, attributes: dict[str, str]) -> None:
        for observe in self._observers:
            try:
                observe(kind, value, attributes)
            except Exception as error:  # a metrics backend's fault breaks no call
                _log.error("[shared] metrics observer raised %s", type(error).__name__)

    @contextmanager
    def _store_errors(self, operation: str) -> Iterator[None]:
        """Count a StoreUnavailable from one store operation, and let it through."""
        try:
            yield
        except StoreUnavailable:
            self._notify("store_error", 1.0, {"token_refresh.operation": operation})
            raise

    # -- in this process ------------------------------------------------------

    def _key_for(self, session_id: str | None) -> str:
        if not self._per_session:
            return self._key
        if session_id is None:
            raise LookupError(
                f"SharedToken(key={self._key!r}, per_session=True) called outside a session: "
                "current_session_id() is None"
            )
        return f"{self._key}/{session_id}"

    def _usable(self, record: Record) -> bool:
        """Whether the record's token may be handed out now instead of fetching."""
        grant = record.grant
        if grant is None or record.refused:
            return False
        now = time.time()
        expiry = expires(grant.access_token, grant.expires_at, grant.clock_skew, now)
        until = reuse_until(expiry, grant.refresh_at, self._min_ttl)
        # A storm shares one fetch; a record from the future (a host whose clock is ahead,
        # or ours stepped back) is not young: its age is unknown.
        young = 0 <= now - record.fetched_at < self._max_age
        if until is not None:
            return now < until or (young and (expiry is None or expiry > now))
        return young

    def _skew_for(self, token: str) -> float | None:
        """The clock skew the grant of ``token`` was received with (for the Scheduler)."""
        record = self._cache.get(self._key_for(current_session_id()))
        if record is None or record.grant is None or record.grant.access_token != token:
            return None
        return record.grant.clock_skew

    def _joinable(self, flight: _Flight, now: float) -> bool:
        """Whether a new call shares this flight's outcome instead of starting a fetch."""
        if not flight.done.is_set():
            return now - flight.started < self._fetch_timeout  # past it, the fetch counts as stuck
        # A failure (or None) is shared for max_age; a token is shared through the cache.
        return flight.grant is None and _stores._monotonic() - flight.finished < self._max_age

    def _run(self, flight: _Flight, context: contextvars.Context) -> None:
        try:
            context.run(self._obtain, flight)
        except BaseException as error:  # handed to every caller of the flight
            if not flight.done.is_set():
                self._finish(flight, error=error)
            else:  # only this thread finishes a started flight: no race with the check
                _log.error(
                    "[shared:%s] %s after the token was delivered",
                    _printable(flight.key),
                    type(error).__name__,
                )
        finally:
            with self._lock:
                self._running.discard(flight)

    def _finish(
        self,
        flight: _Flight,
        record: Record | None = None,
        error: BaseException | None = None,
        *,
        fetched: bool = False,
    ) -> None:
        """Give the flight its outcome and wake its callers; ``fetched``: by this flight."""
        with self._lock:
            flight.finished = _stores._monotonic()
            if record is not None:
                flight.grant = record.grant
                flight.fetched = "fetch" if fetched else _served_by(record.writer)
                if not _holds(record, self._rejected.get(flight.key, ""), refused=False):
                    self._cache[flight.key] = record
            if isinstance(error, RateLimited):
                self._held[flight.key] = _stores._monotonic() + error.retry_after
            if record is None or record.grant is None:
                self._failing.setdefault(flight.key, time.time())  # a failure, or a hold seen
            else:
                self._failing.pop(flight.key, None)
            if error is not None:
                flight.error = error
                _log.debug(
                    "[shared:%s] fetch failed: %s", _printable(flight.key), type(error).__name__
                )
            flight.done.set()
            if len(self._cache) + len(self._flights) > self._prune_at:
                self._prune(time.monotonic())

    def _prune(self, now: float) -> None:
        """Forget what no call can use any more (lock held), so per-session keys do not pile up."""
        self._cache = {k: r for k, r in self._cache.items() if self._usable(r)}
        self._flights = {k: f for k, f in self._flights.items() if self._joinable(f, now)}
        now_held = _stores._monotonic()
        self._held = {k: until for k, until in self._held.items() if until > now_held}
        self._rejected = {
            k: t for k, t in self._rejected.items() if k in self._cache or k in self._flights
        }
        live = self._cache.keys() | self._flights.keys() | self._held.keys()
        self._failing, self._kept = _only(self._failing, live), _only(self._kept, live)
        self._prune_at = 2 * (len(self._cache) + len(self._flights)) + 64

    # -- through the store (on the flight's thread) ------------------------------

    def _obtain(self, flight: _Flight) -> None:
        """Reuse the stored token, or wait for the lease holder's, or fetch under the lease."""
        key, store = flight.key, self._store
        lease: Lease | None = None
        stop_waiting = time.monotonic() + self._lease_ttl
        waiting: float | None = None  # since when another holder's lease kept us waiting
        try:
            while True:
                with self._store_errors("read"):
                    record = store.read(key)
                if record is not None and self._usable(record):
                    self._finish(flight, record)  # the wait, if any, is reported below
                    return
                now = time.time()
                if record is not None and record.blocked_until > now:
                    raise RateLimited(record.blocked_until - now, _printable(key))
                if lease is not None or (time.monotonic() >= stop_waiting and not self._rotating):
                    break  # a rotating fetch waits for the lease: a refresh token is spent once
                with self._store_errors("lease"):
                    lease = store.try_lease(key, self._lease_ttl)
                if lease is None:
                    if waiting is None:
                        waiting = time.monotonic()
                    time.sleep(_POLL_INTERVAL)
            self._waited(waiting)
            waiting = None
            if lease is None:
                _log.warning(
                    "[shared:%s] lease still held after lease_ttl=%gs; fetching anyway",
                    _printable(key),
                    self._lease_ttl,
                )
            self._fetch_and_store(flight, record)
        finally:
            self._waited(waiting)  # it ended in a token, a 429 or a store error
            if lease is not None:
                try:
                    with self._store_errors("release"):
                        lease.release()
                except StoreUnavailable as error:
                    _warn(key, error, "the lease expires by itself")

    def _waited(self, since: float | None) -> None:
        """Report how long another holder's lease kept this fetch waiting, if it did."""
        if since is not None and self._observers:
            self._notify("lease_wait", time.monotonic() - since, {})

    def _fetch_and_store(self, flight: _Flight, record: Record | None) -> None:
        """Fetch under the lease, deliver the token, then store it (a failed write loses none)."""
        key, store = flight.key, self._store
        previous, stored, version = self._basis(key, record)
        began = time.monotonic()
        try:
            fetch = self._fetch
            assert fetch is not None  # a reader never fetches
            result: object = fetch(previous) if self._rotating else fetch()
        except RateLimited as limited:
            self._fetched(began, "RateLimited")
            try:
                with self._store_errors("hold_back"):
                    store.hold_back(key, seconds=limited.retry_after)
            except StoreUnavailable as error:
                _warn(key, error, "held back in this process only")
            raise
        except InvalidGrant:
            self._fetched(began, "InvalidGrant")
            newer = self._await_newer(key, stored) if self._rotating else None
            if newer is None:
                raise
            self._finish(flight, newer)  # a sibling rotated first: its grant is good
            return
        except BaseException as error:
            self._fetched(began, type(error).__name__)
            self._back_off(key, record, error)
            raise
        grant = self._grant(result, began)
        if grant is None:
            self._back_off(key, record, None)
            self._finish(flight)
            return
        fresh = Record(grant, version, time.time(), writer=_this_process())
        _log.debug("[shared:%s] fetched %s", _printable(key), fingerprint(grant.access_token))
        # Registered before the callers wake: a process that exits as soon as it has its
        # token (token-refresh token) still waits at exit for the record to be stored.
        _writing.add(threading.current_thread())
        try:
            self._finish(flight, fresh, fetched=True)  # first the callers, then the store
            self._write(key, fresh, stored)
        finally:
            _writing.discard(threading.current_thread())

    def _back_off(self, key: str, record: Record | None, error: BaseException | None) -> None:
        """On the retry policy, hold the key back in the store after a failed fetch (``error``).

        The hold grows with how long the key has been failing: since this
        process first saw it fail, and never since before the stored token
        was due for a refresh. Every process sharing the store then waits
        for it, so the key costs one token request per backoff step.
        """
        policy = self._policy
        if policy is None or not isinstance(error, Exception | None):
            return  # an interrupt (KeyboardInterrupt, SystemExit) is no token-server failure
        now = time.time()
        with self._lock:
            since = self._failing.setdefault(key, now)
        if record is not None and record.grant is not None:
            expiry = record.grant.expires_at or decode_jwt_expiry(record.grant.access_token)
            due = record.fetched_at + self._max_age if expiry is None else expiry - self._min_ttl
            since = max(since, due)
        seconds = policy.hold(now - since, random.random())
        with self._lock:
            self._held[key] = _stores._monotonic() + seconds
        try:
            with self._store_errors("hold_back"):
                self._store.hold_back(key, seconds=seconds)
        except StoreUnavailable as error:
            _warn(key, error, "held back in this process only")

    def _basis(self, key: str, record: Record | None) -> tuple[Grant | None, int, int]:
        """What a fetch starts from: the previous grant, the version read and the one to write."""
        with self._lock:
            ours = self._cache.get(key)
        stored = 0 if record is None else record.version  # what the write compares against
        if ours is not None and (
            record is None or record.grant is None or ours.version > record.version
        ):
            record = ours  # the store lost our last write, or never took it: keep its refresh token
        # Versions only grow, even after the store forgot them (a restart, a flush, a deleted
        # file): a process that still caches an older version must never prefer it.
        version = max(stored, 0 if ours is None else ours.version) + 1
        return (None if record is None else record.grant), stored, version

    def _grant(self, result: object, began: float) -> Grant | None:
        """The fetch's result as a Grant (None: no token), its outcome reported."""
        if result is None or result == "":
            self._fetched(began, "no_token")
            return None
        if isinstance(result, str):
            result = Grant(result)
        elif not isinstance(result, Grant):
            self._fetched(began, type(result).__name__)
            raise TypeError(f"fetch returned {type(result).__name__}, not a str, Grant or None")
        self._fetched(began, None)
        return self._clocked(result)

    def _clocked(self, grant: Grant) -> Grant:
        """A grant just fetched, with the clock skew it shows (its own, else its iat's).

        Reported once per change, at WARNING and to the metrics hook.
        """
        skew = grant.clock_skew
        if skew is None:
            skew = received_skew(grant.access_token, time.time())
            if skew is None:
                return grant
            grant = replace(grant, clock_skew=skew)
        effective = self._skew.learn(skew)
        if effective is not None:
            self._report_skew(effective)
        return grant

    def _report_skew(self, skew: float) -> None:
        if skew:
            _log.warning(
                "[shared:%s] clock skew: the token server's clock is %s this host's; tokens "
                "are reused for their lifetime counted from receipt",
                _printable(self._key),
                format_skew(skew),
            )
        else:
            _log.warning(
                "[shared:%s] clock skew back within %gs", _printable(self._key), SKEW_THRESHOLD
            )
        self._notify("clock_skew", skew, {})

    def _write(self, key: str, fresh: Record, stored: int) -> None:
        """Store a delivered record if the store still holds the version read before the fetch."""
        try:
            with self._store_errors("write"):
                written = self._store.write(key, fresh, expect=stored)
        except StoreUnavailable as error:
            _warn(key, error, "the token serves this process only")
            return
        if not written:
            _log.debug("[shared:%s] a newer token was stored meanwhile", _printable(key))

    def _fetched(self, began: float, error_type: str | None) -> None:
        """Report one call of ``fetch``: how long it ran, and its failure if it failed."""
        if self._observers:
            attributes = {} if error_type is None else {"error.type": error_type}
            self._notify("fetch", time.monotonic() - began, attributes)

    def _await_newer(self, key: str, version: int) -> Record | None:
        """A record stored after ``version`` within invalid_grant_wait seconds, or None."""
        give_up = time.monotonic() + self._invalid_grant_wait
        while True:
            with self._store_errors("read"):
                record = self._store.read(key)
            if record is not None and record.version > version and record.grant is not None:
                return record
            if time.monotonic() >= give_up:
                return None
            time.sleep(_POLL_INTERVAL)


def _after_fork_in_child() -> None:  # pragma: no cover - runs in forked children
    for token in list(_live_tokens):
        token._after_fork()


if hasattr(os, "register_at_fork"):  # pragma: no branch - not on Windows
    os.register_at_fork(after_in_child=_after_fork_in_child)
