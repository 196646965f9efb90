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
import hashlib
import json
import logging
import math
import os
import secrets
import socket
import stat
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import quote

from . import _validate
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


_log = logging.getLogger("token_refresh.shared")


def _monotonic() -> float:
    """This host's monotonic clock (a seam: the tests move it with the wall clock)."""
    return time.monotonic()


def seconds(value: object, name: str, *, optional: bool = False) -> float:
    """A duration option checked: not negative (``optional``: None means for ever).

    The package's one rule (``_validate``): any real number or a ``timedelta``,
    never a bool, NaN or an infinity.
    """
    if value is None and optional:
        return math.inf
    return _validate.at_least(value, name, 0.0)


def _instant(value: object, name: str, *, optional: bool = False) -> None:
    """Refuse anything but a finite number (Unix seconds) for ``name``."""
    if value is None and optional:
        return
    _validate.seconds(value, name)


@dataclass(frozen=True, slots=True)
class Grant:
    """What a token request returned: the access token and, when rotating, the refresh token.

    ``expires_at`` (Unix seconds, this host's clock) is when the token
    expires as the server told (``expires_in`` counted from when the request
    was sent); a JWT's ``exp`` is read from the token by itself, and the
    earlier of the two wins. ``refresh_at`` (Unix seconds, this host's clock)
    is when the server asked for it to be refreshed (``refresh_in``): a
    SharedToken stops reusing the grant then. ``clock_skew`` is the token
    server's clock minus this host's, in seconds, as seen when the grant was
    received (from the token's ``iat`` or the response's ``Date``; None: not
    known); past a threshold it moves the JWT's ``exp`` onto this host's clock.
    The repr shows fingerprints, never the tokens.
    """

    access_token: str
    refresh_token: str | None = None
    expires_at: float | None = None
    refresh_at: float | None = None
    clock_skew: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.access_token, str) or not self.access_token:
            raise TypeError("Grant.access_token must be a non-empty str")
        if self.refresh_token is not None and not isinstance(self.refresh_token, str):
            raise TypeError("Grant.refresh_token must be a str or None")
        _instant(self.expires_at, "Grant.expires_at", optional=True)
        _instant(self.refresh_at, "Grant.refresh_at", optional=True)
        _instant(self.clock_skew, "Grant.clock_skew", optional=True)

    def __repr__(self) -> str:
        refresh = None if self.refresh_token is None else fingerprint(self.refresh_token)
        hints = "".join(
            f", {name}={value!r}"
            for name, value in (("refresh_at", self.refresh_at), ("clock_skew", self.clock_skew))
            if value is not None
        )
        return (
            f"Grant(access_token={fingerprint(self.access_token)}, refresh_token={refresh}, "
            f"expires_at={self.expires_at!r}{hints})"
        )


@dataclass(frozen=True, slots=True)
class Record:
    """A key's entry in a store: the last grant stored, its version and any hold-back."""

    grant: Grant | None
    version: int = 0  #: one more for every successful write; 0: never written
    fetched_at: float = 0.0  #: wall time the grant was fetched
    #: wall time, by the reader's clock, before which nobody fetches (429); stores
    #: keep the hold-back on their own clock and convert it when they read
    blocked_until: float = 0.0
    #: the process that fetched the grant, ``host:pid:nonce`` ("": not known)
    writer: str = ""
    #: a server refused the grant's access token (``SharedToken.reject``): not reused, and
    #: the next fetch starts from the grant (its refresh token)
    refused: bool = False

    def __post_init__(self) -> None:
        if self.grant is not None and not isinstance(self.grant, Grant):
            raise TypeError("Record.grant must be a Grant or None")
        if isinstance(self.version, bool) or not isinstance(self.version, int):
            raise TypeError("Record.version must be an int")
        if self.version < 0:
            raise ValueError("Record.version must not be negative")
        _instant(self.fetched_at, "Record.fetched_at")
        _instant(self.blocked_until, "Record.blocked_until")
        if not isinstance(self.writer, str):
            raise TypeError("Record.writer must be a str")
        if not isinstance(self.refused, bool):
            raise TypeError("Record.refused must be a bool")


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


def hashed(key: str) -> str:
    """A key as it names files and Redis keys: fixed length, no credential-like text."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _dump(record: Record, key: str, **extra: object) -> str:
    grant = record.grant
    data = {
        "key": printable(key),  # for people and tools; the store finds records by hashed(key)
        "version": record.version,
        "fetched_at": record.fetched_at,
        "writer": record.writer,
        "refused": record.refused,
        "grant": None
        if grant is None
        else [grant.access_token, grant.refresh_token, grant.expires_at],
        **extra,
    }
    # Beside the grant, not in it: a reader from before they existed ignores them.
    if grant is not None and grant.refresh_at is not None:
        data["refresh_at"] = grant.refresh_at
    if grant is not None and grant.clock_skew is not None:
        data["clock_skew"] = grant.clock_skew
    return json.dumps(data)


# Unreadable records already logged, (key, the text's fingerprint): once each, not per call.
_reported: set[tuple[str, str]] = set()


def _unreadable(key: str, text: str | bytes, reason: str) -> None:
    seen = (key, fingerprint(text if isinstance(text, str) else text.decode("latin-1")))
    if seen not in _reported:
        if len(_reported) > 1024:
            _reported.clear()
        _reported.add(seen)
        _log.warning(
            "[shared:%s] the stored record is unreadable (%s); the next fetch replaces it",
            printable(key),
            reason,
        )


def _parse(text: str | bytes, key: str) -> dict[str, Any] | None:
    """A stored record's JSON object, or None (logged once) when it is not one."""
    try:
        data = json.loads(text)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError too
        data = None
    if isinstance(data, dict):
        return data
    _unreadable(key, text, "not a JSON object")
    return None


def _load(text: str | bytes, key: str, *, version: int | None = None) -> Record | None:
    """The Record stored as ``text``, or None (logged once) for anything malformed."""
    data = _parse(text, key)
    if data is None:
        return None
    try:
        grant = data["grant"]
        if grant is not None:
            if not isinstance(grant, list) or len(grant) != 3:
                raise TypeError("grant must be a list of three")
            # refresh_at and clock_skew: absent from records of earlier versions
            hints = data.get("refresh_at"), data.get("clock_skew")
            grant = Grant(grant[0], grant[1], grant[2], *hints)
        writer = data.get("writer", "")  # absent from 0.1's records
        return Record(
            grant,
            data["version"] if version is None else version,
            data["fetched_at"],
            writer=writer if isinstance(writer, str) else "",
            refused=data.get("refused", False),
        )
    except (ValueError, KeyError, TypeError) as error:
        _unreadable(key, text, f"{type(error).__name__} in its fields")
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
        """Take the key's lease, or None while a live holder has it (``ttl``: see each store)."""
        ...

    def write(self, key: str, record: Record, *, expect: int | None = None) -> bool:
        """Store ``record`` if the key's version is ``expect``; False if not.

        ``expect`` is the version the writer read (0 when there was no readable
        record); None means ``record.version - 1``. A successful write ends any
        hold-back (``record.blocked_until`` is not stored; see :meth:`hold_back`).
        """
        ...

    def hold_back(self, key: str, *, seconds: float) -> None:
        """Tell every caller not to fetch for ``key`` for ``seconds``, counted by the store."""
        ...

    def reject(self, key: str, version: int, *, interval: float) -> bool:
        """Mark the record at ``version`` refused, unless a mark was made within ``interval`` s.

        False when the key's version is no longer ``version``, its record is
        marked already, or the last mark is less than ``interval`` seconds old
        (counted by the store); the mark outlives the writes that follow it.
        """
        ...


def _expected(record: Record, expect: int | None) -> int:
    return record.version - 1 if expect is None else expect


def _may_refuse(current: Record | None, version: int) -> bool:
    """Whether ``reject`` may mark ``current``: still at ``version``, with a grant, not marked."""
    return (
        current is not None
        and current.grant is not None
        and current.version == version
        and not current.refused
    )


# -- one process ---------------------------------------------------------------

_memory_stores: weakref.WeakSet[MemoryStore] = weakref.WeakSet()


class _MemoryLease:
    def __init__(self, store: MemoryStore, key: str) -> None:
        self._store, self._key = store, key

    def release(self) -> None:
        self._store._release(self._key, self)


class MemoryStore:
    """A store for one process: every SharedToken given it shares its records.

    A lease is held until its holder releases it, whatever its ttl (a live
    thread keeps it, as a live process keeps a ``FileStore`` lease), and a
    hold-back runs on this process's monotonic clock.
    """

    def __init__(self) -> None:
        self._records: dict[str, Record] = {}
        self._holds: dict[str, float] = {}  # key -> monotonic deadline
        self._rejects: dict[str, float] = {}  # key -> monotonic time of the next allowed mark
        self._after_fork()
        _memory_stores.add(self)

    def _after_fork(self) -> None:
        # A child starts with the parent's records but none of its leases: the
        # threads that held them do not exist there, and the lock may be held.
        self._lock = threading.Lock()
        self._leases: dict[str, _MemoryLease] = {}

    def __repr__(self) -> str:
        return f"MemoryStore(keys={len(self._records)})"

    def read(self, key: str) -> Record | None:
        with self._lock:
            record, hold = self._records.get(key), self._holds.get(key, 0.0)
        left = hold - _monotonic()
        if left <= 0:
            return record
        return replace(record or Record(None), blocked_until=time.time() + left)

    def try_lease(self, key: str, ttl: float) -> Lease | None:
        with self._lock:
            if key in self._leases:
                return None
            lease = self._leases[key] = _MemoryLease(self, key)
            return lease

    def _release(self, key: str, lease: _MemoryLease) -> None:
        with self._lock:
            if self._leases.get(key) is lease:
                del self._leases[key]

    def write(self, key: str, record: Record, *, expect: int | None = None) -> bool:
        with self._lock:
            current = self._records.get(key)
            if (0 if current is None else current.version) != _expected(record, expect):
                return False
            self._records[key] = replace(record, blocked_until=0.0)
            self._holds.pop(key, None)
            return True

    def hold_back(self, key: str, *, seconds: float) -> None:
        with self._lock:
            self._holds[key] = _monotonic() + seconds

    def reject(self, key: str, version: int, *, interval: float) -> bool:
        now = _monotonic()
        with self._lock:
            current = self._records.get(key)
            if not _may_refuse(current, version) or self._rejects.get(key, now) > now:
                return False
            assert current is not None
            self._records[key] = replace(current, refused=True)
            self._rejects[key] = now + interval
            return True


def printable(key: str) -> str:
    """The key for messages: a part that looks like a credential (a session id) is fingerprinted."""
    return "/".join(
        fingerprint(part) if looks_like_credential(part) else part for part in key.split("/")
    )


# -- one host: files -------------------------------------------------------------

# Locks this process holds or is taking, so that a forked child can close its
# copies: a parent that dies then frees the lease at once, as flock promises.
# A lock is recorded before flock() is called, under _fork_guard, which a fork
# waits for: no child is ever forked holding a copy the hook does not know.
_held_flocks: set[_Flock] = set()
_fork_guard = threading.Lock()
#: Seconds between tries while another process holds a FileStore's write lock.
_LOCK_POLL = 0.005


class _Flock:
    """An exclusive ``flock`` on a file that is never unlinked, so all lock one inode.

    ``wait``: seconds to wait for a lock another process holds (0: not at all);
    past it, ``BlockingIOError``.
    """

    def __init__(self, path: Path, *, wait: float = 0.0) -> None:
        with _fork_guard:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            self._pid = os.getpid()
            _held_flocks.add(self)
        try:
            os.fchmod(self._fd, 0o600)  # one made by an older umask, or by hand
            give_up = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return
                except BlockingIOError:
                    if time.monotonic() >= give_up:
                        raise
                time.sleep(_LOCK_POLL)
        except BaseException:
            self._close()
            raise

    def _close(self) -> None:
        with _fork_guard:
            fd, self._fd = self._fd, -1
            _held_flocks.discard(self)
        os.close(fd)

    def release(self) -> None:
        fd = self._fd
        if fd < 0:
            return  # released already, or closed in a forked child
        # The lock belongs to the open file description, which a forked child
        # shares: only the process that took it unlocks, else a child that
        # returns through our code would free its parent's lease.
        if os.getpid() == self._pid:  # pragma: no branch - the other way runs in a child
            fcntl.flock(fd, fcntl.LOCK_UN)
        self._close()

    def _close_in_child(self) -> None:  # pragma: no cover - runs in forked children
        fd, self._fd = self._fd, -1
        os.close(fd)  # closing our copy leaves the parent's lock held


@contextlib.contextmanager
def _os_errors(what: str, key: str) -> Iterator[None]:
    try:
        yield
    except BlockingIOError:
        raise StoreUnavailable(
            f"{what} failed for key {printable(key)!r}: another process held the write lock "
            "past lock_timeout"
        ) from None
    except OSError as error:
        # strerror, not str(error): the OSError's text quotes the file name.
        reason = error.strerror or (type(error).__name__ if error.filename else str(error))
        raise StoreUnavailable(f"{what} failed for key {printable(key)!r}: {reason}") from None


class FileStore:
    """A store for every process on one host: a directory of small files (POSIX, stdlib only).

    Per key, ``<hash>.json`` holds the record (replaced atomically, read
    without a lock; ``<hash>`` is the first 32 hex digits of the key's SHA-256,
    and the record names its key, with a credential-like session part
    fingerprinted) and ``<hash>.lease`` is ``flock``-ed by the fetching
    process (never unlinked; a process that dies frees it at once). One
    ``.write.lock`` serialises the brief compare-and-set of every write; a
    writer waits for it at most ``lock_timeout`` seconds, then the write fails
    with ``StoreUnavailable`` (the fetched token is delivered all the same).
    A hold-back runs on the host's monotonic clock, which every process on
    the host shares and no clock step moves. The directory is created 0700
    and every file 0600.
    """

    def __init__(self, directory: str | os.PathLike[str], *, lock_timeout: float = 5.0) -> None:
        self._directory = Path(directory)
        self._lock_timeout = seconds(lock_timeout, "lock_timeout")
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
        return self._directory / f"{hashed(key)}{suffix}"

    def _legacy(self, key: str) -> Path:
        """Where token_refresh 0.2 kept the key's record: the key, %-quoted."""
        return self._directory / f"{quote(key, safe='')}.json"

    def read(self, key: str) -> Record | None:
        with _os_errors(repr(self), key):
            try:
                text = self._path(key, ".json").read_bytes()
            except FileNotFoundError:
                return self._read_legacy(key)
        record = _load(text, key)
        if record is None:
            return None
        left = _hold_left(json.loads(text).get("hold"))  # a readable record is a JSON object
        return record if left <= 0 else replace(record, blocked_until=time.time() + left)

    def _read_legacy(self, key: str) -> Record | None:
        """A 0.2 record, as version 0: its refresh token is used once, then the file goes."""
        try:
            text = self._legacy(key).read_bytes()
        except OSError:  # none, or a name too long to have been written
            return None
        return _load(text, key, version=0)

    def try_lease(self, key: str, ttl: float) -> Lease | None:
        with _os_errors(repr(self), key):
            try:
                return _Flock(self._path(key, ".lease"))
            except BlockingIOError:
                return None

    def write(self, key: str, record: Record, *, expect: int | None = None) -> bool:
        with self._locked(key):
            current = self.read(key)
            if (0 if current is None else current.version) != _expected(record, expect):
                return False
            self._store(key, replace(record, blocked_until=0.0))  # a write ends a hold-back
            with contextlib.suppress(OSError):  # a 0.2 record must not come back
                os.unlink(self._legacy(key))
            return True

    def hold_back(self, key: str, *, seconds: float) -> None:
        with self._locked(key):
            current = self.read(key) or Record(None)
            self._store(key, replace(current, blocked_until=time.time() + seconds))

    def reject(self, key: str, version: int, *, interval: float) -> bool:
        with self._locked(key):
            current = self.read(key)
            mark = self._path(key, ".reject")  # [monotonic time the mark ends, interval]
            try:
                last = json.loads(mark.read_bytes())
            except (OSError, ValueError):  # none yet, or unreadable: no mark counts
                last = None
            if not _may_refuse(current, version) or _hold_left(last) > 0:
                return False
            assert current is not None
            self._store(key, replace(current, refused=True))
            self._replace(mark, json.dumps([_monotonic() + interval, interval]))
            return True

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        """Hold the write lock (waiting at most lock_timeout), OSErrors as StoreUnavailable."""
        with _os_errors(repr(self), key):
            lock = _Flock(self._directory / ".write.lock", wait=self._lock_timeout)
            try:
                yield
            finally:
                lock.release()

    def _store(self, key: str, record: Record) -> None:
        """Write the record, its hold-back (if any) on this host's monotonic clock."""
        left = record.blocked_until - time.time()
        hold = {"hold": [_monotonic() + left, left]} if left > 0 else {}
        self._replace(
            self._path(key, ".json"), _dump(replace(record, blocked_until=0.0), key, **hold)
        )

    def _replace(self, path: Path, text: str) -> None:
        replace_file(path, text)


def replace_file(path: Path, text: str) -> None:
    """Replace the file at ``path`` atomically: a 0600 temporary file beside it, then os.replace.

    A reader sees the old text or the new, never a partial file.
    """
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _hold_left(hold: object) -> float:
    """Seconds left of a FileStore hold-back ``[monotonic deadline, seconds]``; 0 if none.

    A deadline further away than the hold-back's own length comes from
    another boot (or is malformed): it is over, so it can never stretch a
    ``Retry-After``.
    """
    if not isinstance(hold, list) or len(hold) != 2:
        return 0.0
    deadline, length = hold
    if not all(isinstance(n, (int, float)) and math.isfinite(n) for n in (deadline, length)):
        return 0.0
    left = float(deadline) - _monotonic()
    return left if 0 < left <= length else 0.0


# -- every host: Redis ----------------------------------------------------------

# Delete the lease only if it is still ours (redis-py's Lock does the same).
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
# Compare-and-set on the version: KEYS = record, hold-back; ARGV = expected version,
# new version, record JSON. A missing or unreadable version counts as 0, as it does
# for the reader, so that a flushed or restarted Redis takes the next write.
_WRITE = """
local current = tonumber(redis.call('hget', KEYS[1], 'version')) or 0
if current ~= tonumber(ARGV[1]) then return 0 end
redis.call('hset', KEYS[1], 'version', ARGV[2], 'record', ARGV[3], 'refused', '0')
redis.call('del', KEYS[2])  -- a token again: the hold-back is over
return 1
"""
# Mark the record refused: KEYS = record, last mark; ARGV = version, interval in ms.
# The mark is a key Redis expires, so the interval is counted on Redis's clock.
_REJECT = """
local current = tonumber(redis.call('hget', KEYS[1], 'version')) or 0
if current == 0 or current ~= tonumber(ARGV[1]) then return 0 end  -- 0: no grant stored
if redis.call('hget', KEYS[1], 'refused') == '1' then return 0 end
if redis.call('get', KEYS[2]) then return 0 end
redis.call('hset', KEYS[1], 'refused', '1')
redis.call('set', KEYS[2], '1', 'PX', ARGV[2])
return 1
"""
#: What a Redis ACL user must be allowed for RedisStore (``+@read`` alone is not enough).
#: The scripts run ``get``, ``hget`` and ``hset`` themselves, and ACLs check those too.
REDIS_COMMANDS = ("hgetall", "hget", "hset", "get", "pttl", "set", "del", "evalsha", "script|load")


class _RedisLease:
    def __init__(self, store: RedisStore, key: str, token: str) -> None:
        self._store, self._key, self._token = store, key, token

    def release(self) -> None:
        with self._store._errors(self._key):
            self._store._release(keys=[self._store._name(self._key, ":lease")], args=[self._token])


def _field(fields: dict[Any, Any], name: str) -> Any:
    """A hash field read with or without ``decode_responses``."""
    return fields.get(name.encode(), fields.get(name))


def _version(text: object) -> int:
    """A hash's ``version`` field as the write script reads it: 0 when missing or not a number."""
    if not isinstance(text, (str, bytes)):
        return 0
    try:
        return max(0, int(text))
    except ValueError:
        return 0


class RedisStore:
    """A store for every host: a Redis hash per key and a ``SET NX PX`` lease.

    Takes a ``redis.Redis`` (or ``RedisCluster``) client (``pip install
    "token_refresh[redis]"``). Keys are ``<prefix>{<hash>}`` for the record,
    with ``:lease`` and ``:hold`` beside it in the same hash slot; ``<hash>`` is
    the first 32 hex digits of the key's SHA-256, and the record names its key
    (a credential-like session part fingerprinted). A holder that dies frees
    its lease after its ttl; a hold-back is a key that Redis itself expires
    (``PX``), so no host's clock stretches or cancels it. Every command is
    bounded by the client's own settings: give it a ``socket_timeout``, and
    mind its retries, or a frozen server holds the store write (never the
    token: it is delivered before the write) that long. An ACL user needs the
    commands in :data:`~token_refresh.shared.REDIS_COMMANDS` on the prefix's keys; a refused one
    raises ``StoreUnavailable`` naming it.
    """

    def __init__(self, client: redis.Redis, *, prefix: str = "token_refresh:") -> None:
        try:
            import redis
        except ImportError as error:
            raise ImportError('RedisStore needs: pip install "token_refresh[redis]"') from error
        self._client, self._prefix = client, prefix
        self._redis_error, self._refused = redis.RedisError, redis.exceptions.NoPermissionError
        pool = getattr(client, "connection_pool", None)  # a RedisCluster has none of its own
        if getattr(pool, "connection_kwargs", {}).get("socket_timeout", 0) is None:
            _log.warning(
                "RedisStore: the Redis client has socket_timeout=None, so a frozen server "
                "holds a store write (and its lease) for ever; give it a timeout"
            )
        self._release = client.register_script(_RELEASE)
        self._write = client.register_script(_WRITE)
        self._reject = client.register_script(_REJECT)

    def __repr__(self) -> str:
        return f"RedisStore(prefix={self._prefix!r})"

    def _name(self, key: str, suffix: str = "") -> str:
        # A hash tag: record, lease and hold-back share a cluster slot.
        return f"{self._prefix}{{{hashed(key)}}}{suffix}"

    @contextlib.contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        try:
            yield
        except self._redis_error as error:
            if not isinstance(error, self._refused) and "can't run this command" not in str(error):
                raise StoreUnavailable(
                    f"Redis failed for key {printable(key)!r}: {type(error).__name__}: {error}"
                ) from None
            raise StoreUnavailable(
                f"Redis refused a command for key {printable(key)!r} ({error}); RedisStore "
                f"needs these commands on {self._prefix}*: {' '.join(REDIS_COMMANDS)}"
            ) from None

    def read(self, key: str) -> Record | None:
        with self._errors(key):
            pipeline = self._client.pipeline(transaction=False)
            pipeline.hgetall(self._name(key))
            pipeline.pttl(self._name(key, ":hold"))
            fields, hold = pipeline.execute()
            if not fields:
                legacy = self._client.hgetall(f"{self._prefix}{{{key}}}")  # 0.2's key
                text = _field(legacy, "record")
                record = None if text is None else _load(text, key, version=0)
            else:
                record = self._record(key, fields)
        if hold is None or hold <= 0:  # -2: no hold-back, -1: one without expiry (not ours)
            return record
        return replace(record or Record(None), blocked_until=time.time() + hold / 1000)

    @staticmethod
    def _record(key: str, fields: dict[Any, Any]) -> Record | None:
        """The hash's record; an unreadable one keeps its version, which the next write expects."""
        text = _field(fields, "record")
        record = None if text is None else _load(text, key)
        if record is None:
            version = _version(_field(fields, "version"))
            return Record(None, version) if version else None
        refused = _field(fields, "refused") in (b"1", "1")
        return replace(record, refused=refused)

    def try_lease(self, key: str, ttl: float) -> Lease | None:
        token = secrets.token_hex(16)  # names this holder; not a credential
        with self._errors(key):
            taken = self._client.set(
                self._name(key, ":lease"), token, nx=True, px=max(1, int(ttl * 1000))
            )
        return _RedisLease(self, key, token) if taken else None

    def write(self, key: str, record: Record, *, expect: int | None = None) -> bool:
        with self._errors(key):
            stored = self._write(
                keys=[self._name(key), self._name(key, ":hold")],
                args=[_expected(record, expect), record.version, _dump(record, key)],
            )
            if stored and _expected(record, expect) == 0:
                self._client.delete(f"{self._prefix}{{{key}}}")  # 0.2's record must not come back
        return bool(stored)

    def hold_back(self, key: str, *, seconds: float) -> None:
        with self._errors(key):
            self._client.set(self._name(key, ":hold"), "1", px=max(1, math.ceil(seconds * 1000)))

    def reject(self, key: str, version: int, *, interval: float) -> bool:
        with self._errors(key):
            marked = self._reject(
                keys=[self._name(key), self._name(key, ":reject")],
                args=[version, max(1, math.ceil(interval * 1000))],
            )
        return bool(marked)  # the flag is a hash field: the record keeps its grant


def _before_fork() -> None:  # pragma: no cover - runs around a fork
    _fork_guard.acquire()


def _after_fork_in_parent() -> None:  # pragma: no cover - runs around a fork
    _fork_guard.release()


def _after_fork_in_child() -> None:  # pragma: no cover - runs in forked children
    _fork_guard.release()
    for store in list(_memory_stores):
        store._after_fork()
    for flock in list(_held_flocks):
        flock._close_in_child()
    _held_flocks.clear()


os.register_at_fork(
    before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
)
