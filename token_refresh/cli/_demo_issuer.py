"""``token-refresh demo --issuer URL``: keep one session fresh against a real OAuth2 server."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TextIO

from token_refresh import _scheduler, events
from token_refresh._format import fingerprint, format_seconds
from token_refresh._jwt import decode_jwt_expiry
from token_refresh._scheduler import MAX_REFRESH_FAILURES, Scheduler
from token_refresh.oauth import ClientCredentials, OAuthError, discover
from token_refresh.shared import InvalidGrant, RateLimited

from ._demo import Story
from ._duration import human_duration

SESSION = "demo"
WATCH = 3.0  # seconds: each token is refreshed this long after it was issued, at most
RETRY_DELAY = 1.0
SLACK = 10.0  # seconds added to the deadline for the whole story


class TokenSource:
    """get_access_token() for the scheduler: token_refresh.oauth's client_credentials grant.

    With a secret, ``client_auth="auto"``: Basic, or the form for a server that
    takes only client_secret_post; without one, a public client.
    """

    def __init__(self, token_url: str, client_id: str, client_secret: str | None) -> None:
        self.fetch = ClientCredentials(token_url, client_id, client_secret, client_auth="auto")
        self.token_url = token_url
        self.expires_in: float | None = None  # the last one the server sent
        self.expires_at: dict[str, float] = {}  # opaque tokens' expiry, from expires_in
        self.last_error = ""
        self.failures = 0

    def get_access_token(self) -> str:
        asked = time.time()  # no later than the request was sent: expires_in is at least this
        try:
            grant = self.fetch()
        except (OAuthError, InvalidGrant, RateLimited) as error:
            self.failures += 1
            self.last_error = str(error)  # for the story: it never quotes a token
            raise
        if grant.expires_at is not None:
            self.expires_in = grant.expires_at - asked
            self.expires_at = {grant.access_token: grant.expires_at}
        return grant.access_token

    def expiry(self, token: str) -> float:
        """When ``token`` expires (Unix seconds): its exp, else from its expires_in."""
        exp = decode_jwt_expiry(token)
        if exp:
            return float(exp)
        if token not in self.expires_at:
            raise OAuthError("the token is no JWT with an exp, and came with no expires_in")
        return self.expires_at[token]


@dataclass
class Held:
    """The session's current token, and how it is doing."""

    token: str = field(repr=False)  # token material stays out of reprs
    expires: float
    refreshes: int = 0
    #: For each refresh that came too late, how long the token it replaced had been expired.
    lapses: list[float] = field(default_factory=list)


def run_issuer_demo(
    out: TextIO, issuer: str, *, client_id: str, client_secret: str | None, refreshes: int = 3
) -> int:
    """Tell the story on ``out``; return 0 if the session was kept fresh, else 1.

    Kept fresh means: every refresh came while the token it replaced was still
    valid, all ``refreshes`` came in time, and the last token is valid at the end.

    Raises OAuthError (an OSError), InvalidGrant or RateLimited if the issuer
    cannot be used at all.
    """
    done = threading.Event()  # the session has ended, or the reader has gone
    story = Story(out, wake=done.set)
    story.say(f"token_refresh demo against {issuer}: keep one session's token fresh.", stamp=False)
    source = TokenSource(discover(issuer).token_endpoint, client_id, client_secret)
    first = source.get_access_token()
    held = Held(first, source.expiry(first))
    lifetime = held.expires - time.time()
    if lifetime <= 0:
        raise OAuthError("the server's token has already expired (are the clocks apart?)")
    jwt = bool(decode_jwt_expiry(first))
    refresh_after = min(WATCH, lifetime / 2)
    cycle = refresh_after if jwt else max(refresh_after, _scheduler.EXPIRES_IN_FLOOR)
    how = (
        "schedule(session, token) reads each token's exp"
        if jwt
        else "the tokens are no JWTs, so schedule_from_expires_in(session, expires_in), "
        f"which waits {format_seconds(_scheduler.EXPIRES_IN_FLOOR)}s at least"
    )
    story.say(
        f"Token endpoint {source.token_url}, grant client_credentials, client {client_id!r}.\n"
        f"Its tokens live {_duration(source.expires_in or lifetime)}. So you can watch, "
        f"refresh_buffer="
        f"{format_seconds(round(lifetime - refresh_after, 1))}s: a token is refreshed "
        f"{_duration(cycle)} after it is issued;\n"
        f"{how}. {refreshes} refreshes, then the session ends.\n",
        stamp=False,
    )
    if cycle >= lifetime:
        story.say(
            f"Beware: {_duration(cycle)} is not before the tokens expire: each refresh will come "
            "too late, and the demo will say so.\n",
            stamp=False,
        )

    def schedule(token: str) -> str:
        if jwt:
            scheduler.schedule(SESSION, token)
        else:
            scheduler.schedule_from_expires_in(SESSION, source.expiry(token) - time.time())
        due = scheduler.next_refresh_at(SESSION)
        return "now" if due is None else f"at {story.at(due)}"

    def on_refresh(session_id: str, token: str) -> None:
        lapsed = time.time() - held.expires  # >= 0: the token this one replaces has expired
        held.token, held.expires, held.refreshes = token, source.expiry(token), held.refreshes + 1
        news = (
            f"refreshed ({held.refreshes} of {refreshes}): token {fingerprint(token)}, "
            f"expires {story.at(held.expires)}"
        )
        if lapsed >= 0:
            held.lapses.append(lapsed)
            news += f"; TOO LATE: the token it replaced had expired {lapsed:.1f}s before"
        if held.refreshes < refreshes:
            story.say(f"{news}; next refresh {schedule(token)}")
            return
        scheduler.cancel(session_id)  # allowed inside a callback
        story.say(f"{news}; session over: cancel()")
        done.set()

    def on_event(event: events.Event) -> None:
        if isinstance(event, events.RefreshFailed):
            retry = event.attempt < event.max_attempts
            story.say(
                f"refresh failed ({event.attempt} of {event.max_attempts}): {source.last_error}"
                + (f"; retry in {format_seconds(RETRY_DELAY)}s" if retry else "")
            )
        elif isinstance(event, events.GaveUp):
            story.say(f"gave up after {event.failures} failures in a row")
            done.set()

    scheduler = Scheduler(
        source.get_access_token,
        on_refresh,
        label="demo",
        refresh_buffer=lifetime - refresh_after,
        retry_delay=RETRY_DELAY,
        follow_up_interval=max(cycle, _scheduler.MIN_DELAY),  # for tokens of a second or two
        expires_in_floor=_scheduler.EXPIRES_IN_FLOOR,
        on_event=on_event,
    )
    with scheduler:
        story.say(f"got token {fingerprint(first)}, expires {story.at(held.expires)}")
        story.say(
            f"{'schedule' if jwt else 'schedule_from_expires_in'}(): refresh {schedule(first)}"
        )
        in_time = done.wait(refreshes * (cycle + MAX_REFRESH_FAILURES * RETRY_DELAY) + SLACK)
        story.check()
        story.say("close() the scheduler: it cancels what is left and stops its threads")
    left = held.expires - time.time()
    state = f"fresh for {left:.1f}s more" if left > 0 else "EXPIRED"
    story.say(
        f"\nSummary: {held.refreshes} refreshes, {source.failures} failed attempts, "
        f"{len(held.lapses)} too late; holds token {fingerprint(held.token)}, {state}.",
        stamp=False,
    )
    if in_time and held.refreshes == refreshes and left > 0 and not held.lapses:
        story.say("The session was kept fresh; the scheduler is closed.", stamp=False)
        return 0
    why = (
        f"{len(held.lapses)} of {held.refreshes} refreshes came after the token they replaced "
        f"had expired (by up to {max(held.lapses):.1f}s)"
        if held.lapses
        else "the session was not kept fresh"
    )
    story.say(f"FAILED: {why}. --verbose shows the log.", stamp=False)
    return 1


def _duration(seconds: float) -> str:
    """``"0.5s"``, ``"3s"``, ``"1h"``: tenths show under a minute."""
    return human_duration(seconds) if seconds >= 60 else f"{seconds:.2g}s"
