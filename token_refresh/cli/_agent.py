"""``token-refresh agent --config FILE``: keep a host's tokens fresh in a FileStore (and sinks)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import queue
import signal
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import cast

from token_refresh import _validate
from token_refresh._format import fingerprint
from token_refresh._jwt import decode_jwt_expiry
from token_refresh._retry import RetryPolicy
from token_refresh._scheduler import Scheduler
from token_refresh._stores import replace_file
from token_refresh.oauth import _checked_url
from token_refresh.shared import FileStore, SharedToken

from ._grant import (
    CLIENT_AUTH,
    EXIT_UNREACHABLE,
    Fetcher,
    GrantOptions,
    expiry,
    read_secret,
)

_log = logging.getLogger("token_refresh.agent")

#: Seconds the agent takes, at most, to stop its schedulers on SIGTERM (then it exits anyway).
STOP_TIMEOUT = 5.0
#: ``refresh_buffer`` of a key whose table names none (the Scheduler's default).
REFRESH_BUFFER = 300.0
#: A JWT that expired long ago: ``Scheduler.schedule`` refreshes it at once, on the
#: scheduler's threads with its retries (a Scheduler has no "refresh now" of its own).
_DUE_NOW = "eyJhbGciOiJub25lIn0.eyJleHAiOjF9."  # {"alg":"none"}.{"exp":1}.

AGENT_DESCRIPTION = """\
Keep every key of a TOML file fresh in a FileStore, so that `token-refresh token`,
SharedToken(None, FileStore(dir)) readers and sink files always find a good token.
SIGHUP re-reads the file; SIGTERM (or Ctrl-C) stops the agent within seconds.
"""

AGENT_EPILOG = """\
The file (secrets only from the environment or files, never in it):

  store = "/run/token-refresh"          # the FileStore directory (made 0700)

  [retry]                               # optional: the outage-proof policy's settings
  first_delay = 10                      # seconds before the first retry (default 10)
  cap = 300                             # the longest delay, at most 3600 (default 300)
  multiplier = 2                        # growth per failure (default 2)
  jitter = 0.2                          # up to this fraction shorter, at random (default 0.2)

  [keys.billing]                        # one table per key; the key is its name
  token_endpoint = "https://auth.example.com/oauth/token"   # or issuer = "https://..."
  client_id = "billing-worker"
  client_secret_file = "/etc/token-refresh/billing.secret"  # or client_secret_env = "VAR"
  scope = "billing:read"                # a string, or a list of strings
  audience = "https://billing.example.com"
  client_auth = "basic"                 # basic (default), post, none or auto
  refresh_buffer = 300                  # seconds before expiry to refresh (default 300)
  sink = "/run/billing/token"           # optional: the token alone, 0600, replaced atomically

A failing token server is retried with backoff until it answers: only invalid_client,
unauthorized_client or invalid_grant end a key's refreshes (then SIGHUP restarts them).
It logs one line per refresh (a token's fingerprint, never the token) on stderr.
exit status: 0 stopped by SIGTERM or SIGINT, 2 the command line or the file is wrong.
"""

_KEY_FIELDS = frozenset(
    {
        "issuer",
        "token_endpoint",
        "client_id",
        "client_secret_env",
        "client_secret_file",
        "scope",
        "audience",
        "client_auth",
        "refresh_buffer",
        "sink",
    }
)


class ConfigError(ValueError):
    """The agent's file cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class KeyConfig:
    """One ``[keys.NAME]`` table."""

    name: str
    grant: GrantOptions
    refresh_buffer: float
    sink: Path | None


@dataclass(frozen=True)
class AgentConfig:
    """The whole file: the store and its keys."""

    store: Path
    keys: tuple[KeyConfig, ...]
    retry: RetryPolicy  # the outage-proof policy every key's Scheduler runs on


def load_config(path: Path) -> AgentConfig:
    """Read and check the agent's TOML file; ConfigError for anything wrong."""
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except OSError as error:
        raise ConfigError(f"{path}: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not TOML: {error}") from None
    unknown = sorted(set(document) - {"store", "keys", "retry"})
    if unknown:
        raise ConfigError(
            f"{path}: unknown setting {unknown[0]!r} (store, [retry] and [keys.NAME] only)"
        )
    store, keys = document.get("store"), document.get("keys")
    if not isinstance(store, str) or not store:
        raise ConfigError(f"{path}: store = DIR is missing (the FileStore directory)")
    if not isinstance(keys, dict) or not keys:
        raise ConfigError(f"{path}: no [keys.NAME] table: nothing to keep fresh")
    keyed = tuple(_key(path, name, table) for name, table in keys.items())
    return AgentConfig(Path(store), keyed, _retry(path, document.get("retry", {})))


def _retry(path: Path, table: object) -> RetryPolicy:
    """The ``[retry]`` table: RetryPolicy's first_delay, cap, multiplier and jitter."""
    where = f"{path}: [retry]"
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = sorted(set(table) - {"first_delay", "cap", "multiplier", "jitter"})
    if unknown:
        raise ConfigError(f"{where}: unknown setting {unknown[0]!r}")
    try:
        return RetryPolicy(**table)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from None


def _key(path: Path, name: str, table: object) -> KeyConfig:
    where = f"{path}: [keys.{name}]"
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    if "client_secret" in table:
        raise ConfigError(
            f'{where}: a secret never goes in the file: use client_secret_env = "VARIABLE" '
            'or client_secret_file = "/path"'
        )
    unknown = sorted(set(table) - _KEY_FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown setting {unknown[0]!r}")
    try:
        grant = _grant(table)
        Fetcher(grant)  # checks the token endpoint and the client now, not at the first refresh
        buffer, sink = _buffer_and_sink(table)
    except (OSError, TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {getattr(error, 'strerror', None) or error}") from None
    return KeyConfig(name, grant, buffer, sink)


def _buffer_and_sink(table: dict[str, object]) -> tuple[float, Path | None]:
    buffer = _validate.at_least(table.get("refresh_buffer", REFRESH_BUFFER), "refresh_buffer", 0)
    sink = table.get("sink")
    if sink is not None and (not isinstance(sink, str) or not sink):
        raise ValueError("sink must be a path")
    return float(buffer), None if sink is None else Path(sink)


def _grant(table: dict[str, object]) -> GrantOptions:
    if ("issuer" in table) == ("token_endpoint" in table):
        raise ValueError("give issuer or token_endpoint (one of them)")
    issuer = table.get("issuer")
    if issuer is not None:
        _checked_url(issuer, "issuer", query=False)
    client_auth = table.get("client_auth", "basic")
    if client_auth not in CLIENT_AUTH:
        raise ValueError(f"client_auth must be one of {', '.join(CLIENT_AUTH)}")
    scope = table.get("scope")
    if scope is not None and not (
        isinstance(scope, str)
        or (isinstance(scope, list) and all(isinstance(s, str) for s in scope))
    ):
        raise ValueError("scope must be a string or a list of strings")
    return GrantOptions(
        cast(str, table.get("client_id")),  # ClientCredentials checks it
        issuer=cast("str | None", issuer),
        token_endpoint=cast("str | None", table.get("token_endpoint")),
        client_secret=_secret(table),
        scope=scope,
        audience=cast("str | None", table.get("audience")),
        client_auth=client_auth,
    )


def _secret(table: dict[str, object]) -> str | None:
    variable, file = table.get("client_secret_env"), table.get("client_secret_file")
    if variable is not None and file is not None:
        raise ValueError("give client_secret_env or client_secret_file, not both")
    if file is not None:
        try:
            return read_secret(cast(str, file))
        except OSError as error:
            raise ValueError(f"client_secret_file: {error.strerror}") from None
    if variable is None:
        return None
    secret = os.environ.get(cast(str, variable))
    if not secret:
        raise ValueError(f"client_secret_env: ${variable} is not set")
    return secret


def write_sink(path: Path, token: str) -> None:
    """Replace the sink file with ``token``: a 0600 temporary file, then os.replace.

    A reader sees the old token or the new one, never a partial file.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    replace_file(path, token)


class KeyKeeper:
    """One key kept fresh: a SharedToken on the store, a Scheduler, and the key's sink."""

    def __init__(self, config: KeyConfig, store: FileStore, retry: RetryPolicy) -> None:
        self.config, self.store = config, store
        self.fetcher = Fetcher(config.grant)
        # max_age=None: at its refresh time a token is replaced, however young (a token that
        # lives less than max_age would otherwise be handed back, and refreshed in a loop).
        # On the policy, a failed fetch holds the key back in the store for every process.
        self.shared = SharedToken(
            self.fetcher,
            store,
            key=config.name,
            min_ttl=config.refresh_buffer,
            max_age=None,
            retry_policy=retry,
        )
        self.scheduler = Scheduler(
            self.shared,
            self._on_refresh,
            label=f"agent:{config.name}",
            refresh_buffer=config.refresh_buffer,
            # The outage-proof policy: back off and retry until the token server answers;
            # only a terminal error (invalid_client, ...) ends the key's chain until SIGHUP.
            retry_policy=retry,
        )

    def start(self) -> None:
        """Refresh at once: a token still good in the store is reused, with no new grant."""
        self.scheduler.schedule(self.config.name, _DUE_NOW)

    def _on_refresh(self, name: str, token: str) -> None:
        expires_at = expiry(token, self.fetcher, self.store, name)
        if decode_jwt_expiry(token):
            self.scheduler.schedule(name, token)  # exp - refresh_buffer, or now if it passed
        elif expires_at is not None:
            self.scheduler.schedule_from_expires_in(name, max(expires_at - time.time(), 0.0))
        # else: the scheduler's follow-up refresh comes after follow_up_interval
        if self.config.sink is not None:
            write_sink(self.config.sink, token)
        due = self.scheduler.next_refresh_at(name)  # None: the follow-up, armed after we return
        _log.info(
            "key %s: token %s, expires %s; next refresh %s",
            name,
            fingerprint(token),
            _when(expires_at),
            "after the follow-up interval (30m)" if due is None else _when(due),
        )

    def close(self, timeout: float) -> None:
        self.scheduler.close(timeout)


def _when(unix_seconds: float | None) -> str:
    if unix_seconds is None:
        return "unknown"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix_seconds))


class Agent:
    """The keys of one config file kept fresh until ``stop``; ``reload`` re-reads the file.

    Signal handlers only put an event on ``events``; :meth:`run` does the work.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.events: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._keepers: list[KeyKeeper] = []

    def start(self) -> None:
        """Read the file and start every key (ConfigError if the file is wrong)."""
        config = load_config(self.path)
        store = FileStore(config.store)
        keepers = [KeyKeeper(key, store, config.retry) for key in config.keys]
        self._close()
        self._keepers = keepers
        for keeper in keepers:
            keeper.start()
        _log.info("keeping %d keys fresh in %s", len(keepers), config.store)

    def run(self) -> None:
        """Handle events until "stop": "reload" re-reads the file (a bad one keeps the old)."""
        while self.events.get() != "stop":
            try:
                self.start()
            except (ConfigError, OSError) as error:
                _log.error("reload failed, keeping the keys as they were: %s", error)
        _log.info("stopping")
        self._close()

    def _close(self) -> None:
        give_up = time.monotonic() + STOP_TIMEOUT
        for keeper in self._keepers:
            keeper.close(max(0.0, give_up - time.monotonic()))
        self._keepers = []


def add_agent_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``agent`` command's options."""
    agent = commands.add_parser(
        "agent",
        help="keep the keys of a TOML file fresh in a FileStore (and sink files)",
        description=AGENT_DESCRIPTION,
        epilog=AGENT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    agent.add_argument("--config", required=True, type=Path, metavar="FILE", help="the TOML file")


@contextlib.contextmanager
def _signals(agent: Agent) -> Iterator[None]:
    """SIGHUP: reload; SIGTERM, SIGINT: stop. Restored afterwards."""

    def handle(signum: int, frame: FrameType | None) -> None:
        agent.events.put("reload" if signum == signal.SIGHUP else "stop")  # no lock, no I/O

    wanted = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
    previous = {signum: signal.signal(signum, handle) for signum in wanted}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _logging() -> Iterator[None]:
    """The agent's lines (and the library's warnings) on stderr, one per event."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    library = logging.getLogger("token_refresh")
    levels = library.level, _log.level
    library.addHandler(handler)
    library.setLevel(logging.WARNING)
    _log.setLevel(logging.INFO)
    try:
        yield
    finally:
        library.removeHandler(handler)
        library.setLevel(levels[0])
        _log.setLevel(levels[1])


def run_agent(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run the agent until SIGTERM or SIGINT; 2 when the file cannot be used at start."""
    agent = Agent(args.config)
    with _logging(), _signals(agent):
        try:
            agent.start()
        except ConfigError as error:
            parser.exit(2, f"{parser.prog}: error: {error}\n")
        except OSError as error:  # the store's directory cannot be used
            parser.exit(EXIT_UNREACHABLE, f"{parser.prog}: error: {error}\n")
        agent.run()
    return 0
