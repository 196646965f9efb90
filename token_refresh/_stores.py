"""Where a SharedToken keeps its record: one process, one host (files) or every host (Redis).

Each store gives the same three guarantees: ``read`` never blocks on a
writer, ``try_lease`` lets one caller fetch while the others wait (a lease
only saves calls), and ``write`` is a compare-and-set on the record's version
(the version keeps the record right: a write loses only to a newer successful
one).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import socket
import stat
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import quote

from ._format import fingerprint, looks_like_credential

if TYPE_CHECKING:
    import redis

__all__ = [
    "FileStore",
    "Grant",
    "Lease",
    "MemoryStore",
    "Record",
    "RedisStore",
    "Store",
    "StoreUnavailable",
]


class StoreUnavailable(ConnectionError):
    """The store failed (unreachable, refused, unwritable); the message names the key."""


@dataclass(frozen=True, slots=True)
class Grant:
    """What a token request returned: the access token and, when rotating, the refresh token.

    ``expires_at`` (Unix seconds) is for opaque tokens whose lifetime the
    server told (``time.time() + expires_in``); a JWT's ``exp`` is read from it
    by itself. The repr shows fingerprints, never the tokens.
    """

    access_token: str
    refresh_token: str | None = None
    expires_at: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.access_token, str) or not self.access_token:
            raise TypeError("Grant.access_token must be a non-empty str")
        if self.refresh_token is not None and not isinstance(self.refresh_token, str):
            raise TypeError("Grant.refresh_token must be a str or None")

    def __repr__(self) -> str:
        refresh = None if self.refresh_token is None else fingerprint(self.refresh_token)
        return (
            f"Grant(access_token={fingerprint(self.access_token)}, refresh_token={refresh}, "
            f"expires_at={self.expires_at!r})"
        )


@dataclass(frozen=True, slots=True)
class Record:
    """A key's entry in a store: the last grant stored, its version and any hold-back."""

    grant: Grant | None
    version: int = 0  #: one more for every successful write; 0: never written
    fetched_at: float = 0.0  #: wall time the grant was fetched
    blocked_until: float = 0.0  #: wall time before which nobody fetches (429)
    #: the process that fetched the grant, ``host:pid:nonce`` ("": not known)
    writer: str = ""


_HOST = socket.gethostname()
# A random part, new in every process: a restarted container may have the
# same host name and pid as the process that wrote a record before it.
_process: tuple[int, str] = (0, "")


def this_process() -> str:
    """This process as a Record's ``writer``: ``host:pid:nonce``."""
    global _process
    pid = os.getpid()
    if _process[0] != pid:
        _process = (pid, f"{_HOST}:{pid}:{secrets.token_hex(4)}")
    return _process[1]


def served_by(writer: str) -> Literal["thread", "process", "host", "unknown"]:
    """Who, from this process's point of view, fetched a record written by ``writer``."""
    host, _, rest = writer.partition(":")
    if not rest:
        return "unknown"
    if host != _HOST:
        return "host"
    return "thread" if writer == this_process() else "process"


def _dump(record: Record) -> str:
    grant = record.grant
    data = {
        "version": record.version,
        "fetched_at": record.fetched_at,
        "blocked_until": record.blocked_until,
        "writer": record.writer,
        "grant": None
        if grant is None
        else [grant.access_token, grant.refresh_token, grant.expires_at],
    }
    return json.dumps(data)


def _load(text: str | bytes) -> Record | None:
    """Parse a stored record; None for anything unreadable (a newer write replaces it)."""
    try:
        data = json.loads(text)
        grant = None if data["grant"] is None else Grant(*data["grant"])
        writer = data.get("writer", "")  # absent from 0.1's records
        return Record(
            grant,
            int(data["version"]),
            data["fetched_at"],
            data["blocked_until"],
            writer if isinstance(writer, str) else "",
        )
    except (ValueError, KeyError, TypeError):
        return None


class Lease(Protocol):
    """The right to fetch for a key, held by one caller until ``release()`` or its ttl."""

    def release(self) -> None: ...


class Store(Protocol):
    """What a SharedToken needs from a store. Errors are raised as ``StoreUnavailable``."""

    def read(self, key: str) -> Record | None:
        """The key's record, or None; never waits for a writer."""
        ...

    def try_lease(self, key: str, ttl: float) -> Lease | None:
        """Take the key's lease for at most ``ttl`` seconds, or None if someone holds it."""
        ...

    def write(self, key: str, record: Record) -> bool:
        """Store ``record`` if the key's version is ``record.version - 1``; False if not."""
        ...

    def hold_back(self, key: str, until: float) -> None:
        """Tell every caller not to fetch for ``key`` before wall time ``until``."""
        ...


# -- one process ---------------------------------------------------------------

_memory_stores: weakref.WeakSet[MemoryStore] = weakref.WeakSet()


class _MemoryLease:
    def __init__(self, store: MemoryStore, key: str) -> None:
        self._store, self._key = store, key

    def release(self) -> None:
        self._store._release(self._key, self)


class MemoryStore:
    """A store for one process: every SharedToken given it shares its records."""

    def __init__(self) -> None:
        self._records: dict[str, Record] = {}
        self._after_fork()
        _memory_stores.add(self)

    def _after_fork(self) -> None:
        # A child starts with the parent's records but none of its leases: the
        # threads that held them do not exist there, and the lock may be held.
        self._lock = threading.Lock()
        self._leases: dict[str, tuple[float, _MemoryLease]] = {}

    def __repr__(self) -> str:
        return f"MemoryStore(keys={len(self._records)})"

    def read(self, key: str) -> Record | None:
        return self._records.get(key)

    def try_lease(self, key: str, ttl: float) -> Lease | None:
        now = time.monotonic()
        with self._lock:
            held = self._leases.get(key)
            if held is not None and held[0] > now:
                return None
            lease = _MemoryLease(self, key)
            self._leases[key] = (now + ttl, lease)
            return lease

    def _release(self, key: str, lease: _MemoryLease) -> None:
        with self._lock:
            held = self._leases.get(key)
            if held is not None and held[1] is lease:
                del self._leases[key]

    def write(self, key: str, record: Record) -> bool:
        with self._lock:
            current = self._records.get(key)
            if (0 if current is None else current.version) != record.version - 1:
                return False
            self._records[key] = record
            return True

    def hold_back(self, key: str, until: float) -> None:
        with self._lock:
            self._records[key] = replace(self._records.get(key, Record(None)), blocked_until=until)


def printable(key: str) -> str:
    """The key for messages: a part that looks like a credential (a session id) is fingerprinted."""
    return "/".join(
        fingerprint(part) if looks_like_credential(part) else part for part in key.split("/")
    )


# -- one host: files -------------------------------------------------------------

# Locks this process holds, so that a forked child can close its copies: a
# parent that dies then frees the lease at once, as flock promises.
_held_flocks: set[_Flock] = set()


class _Flock:
    """An exclusive ``flock`` on a file that is never unlinked, so all lock one inode."""

    def __init__(self, path: Path, *, blocking: bool) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)  # one made by an older umask, or by hand
            fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._pid = fd, os.getpid()
        _held_flocks.add(self)

    def release(self) -> None:
        fd, self._fd = self._fd, -1
        if fd < 0:
            return  # released already, or closed in a forked child
        _held_flocks.discard(self)
        # The lock belongs to the open file description, which a forked child
        # shares: only the process that took it unlocks, else a child that
        # returns through our code would free its parent's lease.
        if os.getpid() == self._pid:  # pragma: no branch - the other way runs in a child
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def _close_in_child(self) -> None:  # pragma: no cover - runs in forked children
        fd, self._fd = self._fd, -1
        os.close(fd)  # closing our copy leaves the parent's lock held


@contextlib.contextmanager
def _os_errors(what: str, key: str) -> Iterator[None]:
    try:
        yield
    except OSError as error:
        # strerror, not str(error): the OSError's text quotes the file name, which holds the key.
        reason = error.strerror or (type(error).__name__ if error.filename else str(error))
        raise StoreUnavailable(f"{what} failed for key {printable(key)!r}: {reason}") from None


class FileStore:
    """A store for every process on one host: a directory of small files (POSIX, stdlib only).

    Per key, ``<key>.json`` holds the record (replaced atomically, read
    without a lock) and ``<key>.lease`` is ``flock``-ed by the fetching
    process (never unlinked; a process that dies frees it at once). One
    ``.write.lock`` serialises the brief compare-and-set of every write. The
    directory is created 0700 and every file 0600.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self._directory = Path(directory)
        with _os_errors(f"FileStore({str(self._directory)!r})", "*"):
            self._directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = os.lstat(self._directory)
        # Anyone who can write there could plant a token or hold the lease for ever.
        if not stat.S_ISDIR(info.st_mode) or info.st_mode & 0o022 or info.st_uid != os.geteuid():
            raise PermissionError(
                f"FileStore({str(self._directory)!r}): the directory must be a real directory "
                "of this user that no one else may write to (mode 0700)"
            )

    def __repr__(self) -> str:
        return f"FileStore({str(self._directory)!r})"

    def _path(self, key: str, suffix: str) -> Path:
        return self._directory / f"{quote(key, safe='')}{suffix}"

    def read(self, key: str) -> Record | None:
        with _os_errors(repr(self), key):
            try:
                return _load(self._path(key, ".json").read_bytes())
            except FileNotFoundError:
                return None

    def try_lease(self, key: str, ttl: float) -> Lease | None:
        with _os_errors(repr(self), key):
            try:
                return _Flock(self._path(key, ".lease"), blocking=False)
            except BlockingIOError:
                return None

    def write(self, key: str, record: Record) -> bool:
        return self._update(key, lambda current: record, expect=record.version - 1)

    def hold_back(self, key: str, until: float) -> None:
        self._update(key, lambda current: replace(current or Record(None), blocked_until=until))

    def _update(
        self, key: str, change: Callable[[Record | None], Record], expect: int | None = None
    ) -> bool:
        with _os_errors(repr(self), key):
            lock = _Flock(self._directory / ".write.lock", blocking=True)
            try:
                current = self.read(key)
                if expect is not None and (0 if current is None else current.version) != expect:
                    return False
                fd, temporary = tempfile.mkstemp(dir=self._directory, prefix=".tmp-")  # 0600
                try:
                    with os.fdopen(fd, "w", encoding="utf-8") as file:
                        file.write(_dump(change(current)))
                    os.replace(temporary, self._path(key, ".json"))
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(temporary)
                    raise
                return True
            finally:
                lock.release()


# -- every host: Redis ----------------------------------------------------------

# Delete the lease only if it is still ours (redis-py's Lock does the same).
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
# Compare-and-set on the version: ARGV = new version, record JSON.
_WRITE = """
local current = tonumber(redis.call('hget', KEYS[1], 'version') or '0')
if current ~= tonumber(ARGV[1]) - 1 then return 0 end
redis.call('hset', KEYS[1], 'version', ARGV[1], 'record', ARGV[2])
redis.call('hdel', KEYS[1], 'blocked_until')  -- a token again: the hold-back is over
return 1
"""


class _RedisLease:
    def __init__(self, store: RedisStore, key: str, token: str) -> None:
        self._store, self._key, self._token = store, key, token

    def release(self) -> None:
        with self._store._errors(self._key):
            self._store._release(keys=[self._store._lease_key(self._key)], args=[self._token])


class RedisStore:
    """A store for every host: a Redis hash per key and a ``SET NX PX`` lease.

    Takes a ``redis.Redis`` client (``pip install "token_refresh[redis]"``).
    A holder that dies frees its lease after its ttl. Every call is bounded by
    the client's own settings: give it a ``socket_timeout`` (redis-py's
    default is 5 s) and mind its retries (by default up to 10, with backoff),
    or a frozen server holds a fetch that long; ``SharedToken``'s
    ``fetch_timeout`` bounds what its callers wait either way.
    """

    def __init__(self, client: redis.Redis, *, prefix: str = "token_refresh:") -> None:
        try:
            import redis
        except ImportError as error:
            raise ImportError('RedisStore needs: pip install "token_refresh[redis]"') from error
        self._client, self._prefix, self._redis_error = client, prefix, redis.RedisError
        self._release = client.register_script(_RELEASE)
        self._write = client.register_script(_WRITE)

    def __repr__(self) -> str:
        return f"RedisStore(prefix={self._prefix!r})"

    def _record_key(self, key: str) -> str:
        return f"{self._prefix}{{{key}}}"  # a hash tag: record and lease share a cluster slot

    def _lease_key(self, key: str) -> str:
        return f"{self._record_key(key)}:lease"

    @contextlib.contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        try:
            yield
        except self._redis_error as error:
            raise StoreUnavailable(
                f"Redis failed for key {printable(key)!r}: {type(error).__name__}: {error}"
            ) from None

    def read(self, key: str) -> Record | None:
        with self._errors(key):
            fields: dict[Any, Any] = self._client.hgetall(self._record_key(key))
        text = fields.get(b"record", fields.get("record"))
        blocked = float(fields.get(b"blocked_until", fields.get("blocked_until", 0)))
        record = None if text is None else _load(text)
        if record is None:
            return Record(None, blocked_until=blocked) if blocked else None
        return replace(record, blocked_until=blocked)

    def try_lease(self, key: str, ttl: float) -> Lease | None:
        token = secrets.token_hex(16)  # names this holder; not a credential
        with self._errors(key):
            taken = self._client.set(
                self._lease_key(key), token, nx=True, px=max(1, int(ttl * 1000))
            )
        return _RedisLease(self, key, token) if taken else None

    def write(self, key: str, record: Record) -> bool:
        with self._errors(key):
            stored = self._write(keys=[self._record_key(key)], args=[record.version, _dump(record)])
        return bool(stored)

    def hold_back(self, key: str, until: float) -> None:
        with self._errors(key):
            self._client.hset(self._record_key(key), "blocked_until", repr(until))


def _after_fork_in_child() -> None:  # pragma: no cover - runs in forked children
    for store in list(_memory_stores):
        store._after_fork()
    for flock in list(_held_flocks):
        flock._close_in_child()
    _held_flocks.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
