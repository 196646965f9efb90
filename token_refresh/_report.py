"""One table from each outcome to its log line and its event, and a reporter that never raises.

Every outcome the scheduler tells about is a row of :data:`OUTCOMES`: the
event it sends (if any), the level of its log line and the line itself (if
any), whose ``{name}`` fields come from the outcome's fields, formatted as
the seed prints them. Nothing else in the package words an outcome.
"""

from __future__ import annotations

import contextlib
import logging
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import events
from ._format import format_duration, format_instant, format_seconds, format_skew, session_label

_log = logging.getLogger("token_refresh")

DEBUG, WARNING, ERROR = logging.DEBUG, logging.WARNING, logging.ERROR


@dataclass(frozen=True, slots=True)
class Line:
    """An outcome's event (and the fields it takes from the outcome) and its log line."""

    event: type[events.Event] | None
    level: int
    message: str | None
    fields: tuple[str, ...] = ()


_SCHEDULED = ("due", "delay", "reason")
_FAILED = (
    "attempt",
    "max_attempts",
    "error_type",
    "final",
    "called",
    "trigger",
    "fetch_duration",
)

OUTCOMES: dict[str, Line] = {
    "kept": Line(
        events.TimerKept,
        DEBUG,
        "Could not decode JWT expiry for sessionId={session}, token {token_fingerprint}, "
        "keeping existing timer",
        ("token_fingerprint",),
    ),
    "scheduled_exp": Line(
        events.Scheduled,
        DEBUG,
        "Scheduled token refresh for sessionId={session} in {delay} "
        "(expires={expires}, buffer={buffer}s)",
        _SCHEDULED,
    ),
    "scheduled_expires_in": Line(
        events.Scheduled,
        DEBUG,
        "Scheduled token refresh for sessionId={session} in {delay} "
        "(expires_in={expires_in}s, buffer={buffer}s)",
        (*_SCHEDULED, "after_expiry"),
    ),
    "after_expiry": Line(
        None,
        WARNING,
        "Refresh for sessionId={session} comes {late} after its token expires "
        "(expires_in is under the {floor}s floor)",
    ),
    "scheduled_now": Line(
        events.Scheduled,
        DEBUG,
        "Token for sessionId={session} expires={expires} (past or within buffer), "
        "refreshing immediately",
        _SCHEDULED,
    ),
    "scheduled_retry": Line(events.Scheduled, DEBUG, None, _SCHEDULED),
    "scheduled_follow_up": Line(
        events.Scheduled,
        DEBUG,
        "Scheduled follow-up refresh for sessionId={session} in {delay}",
        _SCHEDULED,
    ),
    "started": Line(events.RefreshStarted, DEBUG, None, ("due", "lateness", "trigger", "attempt")),
    "raised": Line(None, ERROR, "get_access_token raised {error_type} for sessionId={session}"),
    "not_a_token": Line(
        None,
        ERROR,
        "get_access_token returned {error_type}, not a str or None, for sessionId={session}",
    ),
    "still_hung": Line(
        None,
        ERROR,
        "get_access_token for sessionId={session} still runs from an earlier attempt; "
        "not called again",
    ),
    "returned_late": Line(
        None,
        WARNING,
        "get_access_token for sessionId={session} returned after fetch_timeout; result dropped",
    ),
    "pool_full": Line(
        None,
        WARNING,
        "{stuck} get_access_token calls are hung past fetch_timeout; no more "
        "workers are added, so refreshes wait for one to return",
    ),
    "stale": Line(
        events.StaleDropped,
        DEBUG,
        "Refresh for sessionId={session} stale (gen {generation} vs {current}), skipping",
        ("trigger", "fetch_duration"),
    ),
    "failed": Line(
        events.RefreshFailed,
        ERROR,
        "No access token available for refresh, sessionId={session} "
        "(failure {attempt}{max_attempts})",
        _FAILED,
    ),
    "timed_out": Line(
        events.RefreshTimedOut,
        ERROR,
        "get_access_token timed out after {timeout}s for sessionId={session}\n"
        "No access token available for refresh, sessionId={session} "
        "(failure {attempt}{max_attempts})",
        (*_FAILED, "timeout"),
    ),
    "gave_up": Line(
        events.GaveUp,
        ERROR,
        "Giving up on sessionId={session} after {failures} consecutive failures",
        ("failures", "reason"),
    ),
    "gave_up_terminal": Line(
        events.GaveUp,
        ERROR,
        "Giving up on sessionId={session}: the error is {reason} (failure {failures})",
        ("failures", "reason"),
    ),
    "no_timer": Line(
        events.GaveUp,
        ERROR,
        "Could not start a timer thread; refresh chain for sessionId={session} stopped",
        ("failures", "reason"),
    ),
    "terminal_raised": Line(
        None,
        ERROR,
        "retry policy's terminal() raised {error_type} for sessionId={session}; "
        "the built-in rule decides",
    ),
    "retry_dropped": Line(events.RetryDropped, DEBUG, None, ("trigger",)),
    "refreshed": Line(
        events.Refreshed,
        DEBUG,
        "Refreshing token for sessionId={session}: new token {token_fingerprint}",
        (
            "token_fingerprint",
            "trigger",
            "attempts",
            "fetch_duration",
            "expires_at",
            "served_by",
        ),
    ),
    "callback_error": Line(
        events.CallbackError,
        ERROR,
        "on_refresh raised {error_type} for sessionId={session}",
        ("error_type",),
    ),
    "cancelled": Line(events.Cancelled, DEBUG, None),
    "clock_skew": Line(
        events.ClockSkew,
        WARNING,
        "Clock skew: the token server's clock is {skew} this host's (learned for "
        "sessionId={session}); refresh times follow token lifetimes counted from receipt",
        ("skew", "threshold"),
    ),
    "clock_skew_ended": Line(
        events.ClockSkew,
        WARNING,
        "Clock skew back within {threshold}s (learned for sessionId={session}); "
        "refresh times follow exp again",
        ("skew", "threshold"),
    ),
    "dropped_at_shutdown": Line(None, DEBUG, "Refresh for sessionId={session} dropped: shut down"),
    "forked": Line(
        None,
        WARNING,
        "Forked: {dropped} session(s) scheduled in the parent process are not refreshed "
        "in this one (pid {pid}); schedule this process's own sessions",
    ),
    "on_event_raised": Line(None, ERROR, "on_event raised {error_type}"),
    "observer_raised": Line(None, ERROR, "metrics observer raised {error_type}"),
}


def _of(max_attempts: int) -> str:
    """ "/3" of "failure 2/3"; on a retry policy (0: no limit) it retries until terminal."""
    return f"/{max_attempts}" if max_attempts else ", retrying until the error is terminal"


# How a field is printed in a log line (anything else: str()).
_FORMATS: dict[str, Callable[[Any], object]] = {
    "session": session_label,
    "delay": format_duration,
    "late": format_duration,
    "expires": format_instant,
    "expires_in": format_seconds,
    "buffer": format_seconds,
    "floor": format_seconds,
    "timeout": format_seconds,
    "max_attempts": _of,
    "threshold": format_seconds,
    "skew": format_skew,
}


class _Text:
    """A log line's text, formatted only if a handler writes it."""

    __slots__ = ("fields", "template")

    def __init__(self, template: str, fields: dict[str, Any]) -> None:
        self.template, self.fields = template, fields

    def __str__(self) -> str:
        names = {name for _, name, _, _ in string.Formatter().parse(self.template) if name}
        values = {name: _FORMATS.get(name, str)(self.fields[name]) for name in names}
        return self.template.format(**values)


class Reporter:
    """Turns outcomes into log lines and events; never raises into the flow.

    ``on_event`` runs under ``working()``, so that nothing it calls waits for
    the scheduler's own work. A log handler, an observer or ``on_event`` that
    raises, ``BaseException`` included, is reported by type and breaks nothing.
    """

    def __init__(
        self,
        label: str,
        now: Callable[[], float],
        on_event: Callable[[events.Event], None] | None,
    ) -> None:
        self.label = label
        self._now = now
        self.on_event = on_event
        self.observers: tuple[Callable[[events.Event], None], ...] = ()

    def listening(self) -> bool:
        """Whether anything receives events (else none is built)."""
        return self.on_event is not None or bool(self.observers)

    def wanted(self, outcome: str) -> bool:
        """Whether an outcome is logged or sent anywhere (else its fields need not be built)."""
        line = OUTCOMES[outcome]
        logged = line.message is not None and _log.isEnabledFor(line.level)
        return logged or (line.event is not None and self.listening())

    def say(self, outcome: str, session_id: str = "", **fields: Any) -> None:
        """Write an outcome's log line only (lines that have no event)."""
        line = OUTCOMES[outcome]
        assert line.message is not None
        self._write(line.level, line.message, session_id, fields)

    def report(
        self,
        outcome: str,
        session_id: str,
        fields: dict[str, Any],
        working: Callable[[], contextlib.AbstractContextManager[None]],
    ) -> None:
        """Write an outcome's log line and send its event; never raises."""
        line = OUTCOMES[outcome]
        if line.message is not None:
            self._write(line.level, line.message, session_id, fields)
        if line.event is None or not self.listening():
            return
        try:
            values = {name: fields[name] for name in line.fields if name in fields}
            event = line.event(session_id=session_id, label=self.label, time=self._now(), **values)
            self._send(event, working)
        except BaseException as error:  # a bad field or clock is ours to log, not to raise
            self.say("on_event_raised", error_type=type(error).__name__)

    def _send(
        self, event: events.Event, working: Callable[[], contextlib.AbstractContextManager[None]]
    ) -> None:
        for observe in self.observers:
            try:
                observe(event)
            except BaseException as error:  # a metrics backend's fault breaks nothing
                self.say("observer_raised", error_type=type(error).__name__)
        if self.on_event is not None:
            try:
                with working():
                    self.on_event(event)
            except BaseException as error:
                self.say("on_event_raised", error_type=type(error).__name__)

    def _write(self, level: int, template: str, session_id: str, fields: dict[str, Any]) -> None:
        """Log one line; a log handler that raises (BaseException too) cannot break a chain.

        The fields are gathered only for a level that is logged: a storm of
        refreshes at the default level builds nothing here.
        """
        try:
            if _log.isEnabledFor(level):
                values = {"session": session_id, **fields}
                for text in template.split("\n"):
                    _log.log(level, "[%s:token] %s", self.label, _Text(text, values))
        except BaseException:  # nowhere left to report it
            pass
