"""Draw ``docs/_static/timeline.svg``: one session's life, recorded from a real Scheduler.

The picture is not drawn by hand. :func:`record` runs a real
:class:`~token_refresh.Scheduler` on a :class:`~token_refresh.testing.ManualClock`
with the default timings and keeps every event ``on_event`` reports and every
token ``on_refresh`` delivers; :func:`draw` turns that record into SVG.
``tests/test_docs.py`` fails while the committed file differs from what this
script draws, so after a change to the scheduler run::

    python docs/_scripts/timeline.py

and look at the new picture before committing it.
"""

from __future__ import annotations

import base64
import json
import sys
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from token_refresh import Scheduler, decode_jwt_expiry, events, format_duration
from token_refresh.testing import ManualClock

OUTPUT = Path(__file__).resolve().parent.parent / "_static" / "timeline.svg"

START = 1_800_000_000.0  # the ManualClock's wall time when the story begins
MINUTE = 60.0
TOKEN_LIFETIME = 60 * MINUTE  # of every token the (fake) token server issues
CANCEL_AT = 130 * MINUTE  # when the application ends the session
SESSION = "s1"
#: What get_access_token does on its first calls; after these it returns a fresh token.
OUTAGE: tuple[Exception | None, ...] = (None, ConnectionError("token server unreachable"))


def unsigned_jwt(exp: float) -> str:
    """A token whose payload carries ``exp``, as a token server would issue (unsigned)."""
    payload = base64.urlsafe_b64encode(json.dumps({"exp": exp}).encode()).decode()
    return f"e30.{payload.rstrip('=')}.unsigned"


@dataclass
class Token:
    """One token in the story: when it was handed over, and its ``exp``."""

    number: int
    issued: float  # seconds since START
    expires: float
    replaced: float = 0.0  # when the next token took over (or the session ended)


@dataclass
class Record:
    """What one run of the scheduler reported."""

    events: list[events.Event] = field(default_factory=list)
    tokens: list[Token] = field(default_factory=list)


def record() -> Record:
    """Run one session through a real Scheduler on a ManualClock and keep what it reports."""
    clock = ManualClock(start=START)
    run = Record()
    outage = list(OUTAGE)

    def get_access_token() -> str | None:
        if outage:
            failure = outage.pop(0)
            if failure is not None:
                raise failure
            return None
        return unsigned_jwt(clock.time() + TOKEN_LIFETIME)

    def keep(token: str, issued: float) -> None:
        expiry = decode_jwt_expiry(token)
        assert expiry is not None
        run.tokens.append(Token(len(run.tokens), issued - START, expiry - START))

    def on_refresh(session_id: str, token: str) -> None:
        keep(token, clock.time())

    scheduler = Scheduler(get_access_token, on_refresh, clock=clock, on_event=run.events.append)
    first = unsigned_jwt(START + TOKEN_LIFETIME)
    keep(first, START)
    scheduler.schedule(SESSION, first)
    clock.advance(CANCEL_AT)
    scheduler.cancel(SESSION)
    scheduler.close()
    for token, successor in zip(run.tokens, run.tokens[1:], strict=False):
        token.replaced = successor.issued
    run.tokens[-1].replaced = CANCEL_AT
    return run


# -- drawing ----------------------------------------------------------------

WIDTH, HEIGHT = 960, 480
LEFT, RIGHT = 160.0, 850.0  # where the time axes start and end
STYLE = """
text { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       font-size: 15px; fill: #1f2328; }
.lane { font-weight: 600; font-size: 16px; }
.note, .tick { font-size: 13.5px; fill: #57606a; }
.small { font-size: 14px; }
.axis { stroke: #57606a; stroke-width: 1.5; }
.tickmark { stroke: #8c959f; stroke-width: 1; }
.grid { stroke: #d0d7de; stroke-width: 1; stroke-dasharray: 2 3; }
.in-use { fill: #0969da; }
.spare { fill: #b6d4fb; }
.buffer { fill: url(#hatch); stroke: #bc4c00; stroke-width: 1; }
.buffer-label { fill: #bc4c00; font-size: 13.5px; }
.token-label { fill: #ffffff; font-size: 13px; font-weight: 600; }
.timer { fill: none; stroke: #6e7781; stroke-width: 1.4; marker-end: url(#arrow); }
.cancelled { fill: none; stroke: #8c959f; stroke-width: 1.2; stroke-dasharray: 5 4; }
.ok { fill: #1a7f37; }
.failed { fill: #cf222e; }
.scheduled { fill: #ffffff; stroke: #0969da; stroke-width: 2; }
.stop { fill: #1f2328; }
.glyph { fill: none; stroke: #ffffff; stroke-width: 2; stroke-linecap: round; }
.zoom { fill: #f6f8fa; stroke: #d0d7de; stroke-width: 1; }
.zoom-link { stroke: #afb8c1; stroke-width: 1; stroke-dasharray: 4 3; fill: none; }
"""


@dataclass(frozen=True)
class Axis:
    """Maps seconds since START onto x between LEFT and RIGHT."""

    first: float
    last: float

    def x(self, seconds: float) -> float:
        return LEFT + (seconds - self.first) / (self.last - self.first) * (RIGHT - LEFT)


class Svg:
    """Just enough SVG: elements appended in drawing order, numbers rounded for stable output."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def add(self, tag: str, text: str | None = None, /, **attributes: object) -> None:
        attrs = "".join(
            f' {name.rstrip("_").replace("_", "-")}="{_value(value)}"'
            for name, value in attributes.items()
            if value is not None
        )
        if text is None:
            self.parts.append(f"<{tag}{attrs}/>")
        else:
            self.parts.append(f"<{tag}{attrs}>{escape(text)}</{tag}>")

    def text(self, x: float, y: float, text: str, cls: str = "", anchor: str = "start") -> None:
        self.add("text", text, x=x, y=y, class_=cls or None, text_anchor=anchor)

    def arc(self, start: float, end: float, y: float, cls: str = "timer") -> float:
        """A timer: a curve from where it was armed to where it is due; return its top."""
        height = min(62.0, max(22.0, (end - start) * 0.4))
        self.add(
            "path",
            d=f"M{_n(start)},{_n(y)} C{_n(start)},{_n(y - height)} "
            f"{_n(end)},{_n(y - height)} {_n(end)},{_n(y - 2)}",
            class_=cls,
        )
        return y - height * 0.75

    def marker(self, x: float, y: float, kind: str, radius: float = 7.0) -> None:
        """A step of the session: a refresh that worked or failed, schedule(), cancel()."""
        if kind == "stop":
            self.add(
                "rect",
                x=x - radius,
                y=y - radius,
                width=2 * radius,
                height=2 * radius,
                class_="stop",
            )
            return
        self.add("circle", cx=x, cy=y, r=radius, class_=kind)
        arm = radius * 0.45
        if kind == "ok":  # a tick
            glyph = _polyline((x - arm, y), (x - arm / 3, y + arm), (x + arm, y - arm))
        elif kind == "failed":  # a cross
            glyph = _polyline((x - arm, y - arm), (x + arm, y + arm))
            glyph += " " + _polyline((x - arm, y + arm), (x + arm, y - arm))
        else:
            return
        self.add("path", d=glyph, class_="glyph")

    def document(self, title: str, description: str) -> str:
        head = (
            f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
            f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-labelledby="title desc">'
        )
        defs = (
            "<defs>"
            '<marker id="arrow" viewBox="0 0 10 10" refX="8" refY="5" markerWidth="7" '
            'markerHeight="7" orient="auto-start-reverse"><path d="M0,1 L9,5 L0,9 z" '
            'fill="#6e7781"/></marker>'
            '<pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
            'patternTransform="rotate(45)"><rect width="6" height="6" fill="#fff1e5"/>'
            '<line x1="0" y1="0" x2="0" y2="6" stroke="#fb8f44" stroke-width="2.5"/></pattern>'
            f'<clipPath id="zoom-clip"><rect x="{_n(LEFT - 20)}" y="{_n(SESSION_AXIS + 60)}" '
            f'width="{_n(RIGHT - LEFT + 40)}" height="142"/></clipPath>'
            "</defs>"
        )
        return "\n".join(
            [
                head,
                f'<title id="title">{escape(title)}</title>',
                f'<desc id="desc">{escape(description)}</desc>',
                f"<style>{STYLE}</style>",
                defs,
                f'<rect width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>',
                *self.parts,
                "</svg>",
                "",
            ]
        )


def _n(number: float) -> str:
    """A coordinate with at most one decimal, the same on every platform."""
    text = f"{number:.1f}"
    return text[:-2] if text.endswith(".0") else text


def _polyline(*points: tuple[float, float]) -> str:
    """Path data through ``points``: ``M x,y L x,y ...``."""
    return " ".join(f"{'L' if i else 'M'}{_n(x)},{_n(y)}" for i, (x, y) in enumerate(points))


def _value(value: object) -> str:
    return _n(value) if isinstance(value, float) else escape(str(value))


def _minutes(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole // 60}:{whole % 60:02d}"


WHY = {
    "exp": "exp - refresh_buffer",
    "expires_in": "expires_in - refresh_buffer",
    "retry": "retry_delay",
    "follow_up": "follow_up_interval",
}


def _outcomes(run: Record) -> list[events.Event]:
    """The steps a reader cares about: refreshes that worked or failed, and the cancel."""
    steps = (events.Refreshed, events.RefreshFailed, events.Cancelled)
    return [event for event in run.events if isinstance(event, steps)]


def _timers(run: Record) -> list[tuple[float, events.Scheduled, bool]]:
    """Each armed timer: when it was armed, the event, and whether it fired."""
    cancelled_at = max(e.time for e in run.events if isinstance(e, events.Cancelled))
    return [
        (event.time - START, event, event.due <= cancelled_at)
        for event in run.events
        if isinstance(event, events.Scheduled)
    ]


BAR = 18.0  # height of a token's bar
SESSION_AXIS = 262.0  # y of the main time axis


def _token_row(token: Token) -> float:
    return 62.0 + token.number * 26.0


def _draw_tokens(svg: Svg, run: Record, axis: Axis) -> None:
    svg.text(12, 74, "tokens", "lane")
    svg.text(12, 90, "each refresh hands", "note")
    svg.text(12, 103, "on a new one", "note")
    for token in run.tokens:
        top = _token_row(token)
        start, handover = axis.x(token.issued), axis.x(token.replaced)
        end = axis.x(min(token.expires, axis.last))
        svg.add("rect", x=start, y=top, width=handover - start, height=BAR, class_="in-use")
        svg.add("rect", x=handover, y=top, width=end - handover, height=BAR, class_="spare")
        svg.text(start + 6, top + 14, f"token {token.number}", "token-label")
        if token.expires > axis.last:
            svg.text(end + 5, top + 14, f"exp {_minutes(token.expires)} →", "note")
        else:
            svg.add("line", x1=end, y1=top - 3, x2=end, y2=top + BAR + 3, class_="tickmark")
            svg.text(end + 5, top + 14, f"exp {_minutes(token.expires)}", "note")
    first = run.tokens[0]
    scheduled = next(e for e in run.events if isinstance(e, events.Scheduled))
    buffer_start = axis.x(scheduled.due - START)
    svg.add(
        "rect",
        x=buffer_start,
        y=_token_row(first),
        width=axis.x(first.expires) - buffer_start,
        height=BAR,
        class_="buffer",
    )
    svg.text(
        axis.x(first.expires),
        _token_row(first) - 6,
        f"refresh_buffer: {format_duration(first.expires - (scheduled.due - START))} before exp",
        "buffer-label",
        "end",
    )


def _draw_legend(svg: Svg) -> None:
    x = LEFT + 150
    for cls, label, width in (
        ("in-use", "the token in use", 112),
        ("spare", "replaced, still valid", 138),
        ("buffer", "refresh_buffer", 100),
    ):
        svg.add("rect", x=float(x), y=14.0, width=16.0, height=12.0, class_=cls)
        svg.text(x + 22, 25, label, "note")
        x += width + 50


def _draw_session(svg: Svg, run: Record, axis: Axis) -> None:
    y = SESSION_AXIS
    svg.text(12, y - 12, f"session {SESSION!r}", "lane")
    svg.text(12, y + 4, "timers (arcs) and", "note")
    svg.text(12, y + 17, "refreshes (dots)", "note")
    for minute in range(0, round(axis.last / MINUTE) + 1, 10):
        x = axis.x(minute * MINUTE)
        svg.add("line", x1=x, y1=y + 5, x2=x, y2=y + 10, class_="tickmark")
        svg.text(
            x,
            y + 23,
            f"{minute} min" if minute == round(axis.last / MINUTE) else f"{minute}",
            "tick",
            "middle",
        )
    for token in run.tokens[1:]:  # each delivered token's bar starts at its refresh
        x = axis.x(token.issued)
        svg.add("line", x1=x, y1=_token_row(token) + BAR + 2, x2=x, y2=y - 9, class_="grid")
    svg.add("line", x1=LEFT, y1=y, x2=RIGHT, y2=y, class_="axis")
    named: set[str] = set()
    for armed, timer, fired in _timers(run):
        start, end = axis.x(armed), axis.x(timer.due - START)
        if end - start < 20:
            continue  # the retries: too short to see here, drawn in the enlargement
        top = svg.arc(start, end, y, "timer" if fired else "cancelled")
        # Name each kind of timer once; the arcs that repeat it just say how long.
        label = format_duration(timer.delay)
        if timer.reason not in named:
            label = f"{WHY[timer.reason]}: {label}"
            named.add(timer.reason)
        if not fired:
            label += ", cancelled"
        svg.text((start + end) / 2, top - 5, label, "small", "middle")
    svg.marker(axis.x(0.0), y, "scheduled")
    svg.text(axis.x(0.0), y + 42, "schedule(jwt)", "small", "start")
    for event in _outcomes(run):
        x = axis.x(event.time - START)
        if isinstance(event, events.Cancelled):
            svg.marker(x, y, "stop", 6.0)
            svg.text(x, y + 42, "cancel()", "small", "middle")
        else:
            svg.marker(x, y, "ok" if isinstance(event, events.Refreshed) else "failed", 6.0)


def _draw_enlargement(svg: Svg, run: Record, main: Axis) -> None:
    failures = [e for e in run.events if isinstance(e, events.RefreshFailed)]
    first = failures[0].time - START
    zoom = Axis(first - MINUTE, first + 3 * MINUTE)
    top, y = SESSION_AXIS + 62, SESSION_AXIS + 144
    # Where the enlargement sits on the main axis, and lines that say so.
    left, right = main.x(zoom.first), main.x(zoom.last)
    below = SESSION_AXIS + 14
    svg.add(
        "rect",
        x=left - 2,
        y=below - 28,
        width=right - left + 4,
        height=28.0,
        rx=4.0,
        class_="zoom-link",
    )
    svg.add(
        "path",
        d=f"M{_n(left - 2)},{_n(below)} L{_n(LEFT - 20)},{_n(top)} "
        f"M{_n(right + 2)},{_n(below)} L{_n(RIGHT + 20)},{_n(top)}",
        class_="zoom-link",
    )
    svg.add(
        "rect", x=LEFT - 20, y=top, width=RIGHT - LEFT + 40, height=140.0, rx=6.0, class_="zoom"
    )
    svg.text(12, top + 48, "enlarged:", "lane")
    svg.text(12, top + 64, f"{_minutes(zoom.first)} to {_minutes(zoom.last)}", "note")
    svg.text(12, top + 77, "(minutes:seconds)", "note")
    svg.parts.append('<g clip-path="url(#zoom-clip)">')
    svg.add("line", x1=LEFT - 20, y1=y, x2=RIGHT + 20, y2=y, class_="axis")
    for second in range(round(zoom.first), round(zoom.last) + 1, 30):
        x = zoom.x(float(second))
        svg.add("line", x1=x, y1=y + 4, x2=x, y2=y + 8, class_="tickmark")
        if second % 60 == 0:
            svg.text(x, y + 20, _minutes(second), "tick", "middle")
    for armed, timer, _ in _timers(run):
        if zoom.first <= armed <= zoom.last:
            start, end = zoom.x(armed), zoom.x(timer.due - START)
            arc_top = svg.arc(start, min(end, RIGHT + 60), y)
            label = f"{WHY[timer.reason]}: {format_duration(timer.delay)}"
            middle = (start + end) / 2 if end < RIGHT else RIGHT - 10
            svg.text(
                middle,
                arc_top - 5,
                label + (" →" if end > RIGHT else ""),
                "small",
                "middle" if end < RIGHT else "end",
            )
    svg.parts.append("</g>")
    for event in _outcomes(run):
        at = event.time - START
        if not zoom.first <= at <= zoom.last:
            continue
        x = zoom.x(at)
        if isinstance(event, events.RefreshFailed):
            svg.marker(x, y, "failed")
            why = "returned None" if event.error_type is None else f"raised {event.error_type}"
            svg.text(
                x, y + 38, f"RefreshFailed {event.attempt}/{event.max_attempts}", "small", "middle"
            )
            svg.text(x, y + 52, why, "note", "middle")
        elif isinstance(event, events.Refreshed):
            svg.marker(x, y, "ok")
            svg.text(x, y + 38, "Refreshed", "small", "middle")
            svg.text(x, y + 52, "on_refresh: token 1", "note", "middle")


def draw(run: Record) -> str:
    """The SVG picture of ``run``."""
    svg = Svg()
    axis = Axis(0.0, 150 * MINUTE)
    _draw_legend(svg)
    _draw_tokens(svg, run, axis)
    _draw_session(svg, run, axis)
    _draw_enlargement(svg, run, axis)
    refreshes = sum(isinstance(e, events.Refreshed) for e in run.events)
    failures = sum(isinstance(e, events.RefreshFailed) for e in run.events)
    return svg.document(
        "One session's timeline with the default timings",
        f"schedule() with a JWT that expires in {format_duration(TOKEN_LIFETIME)}; the "
        f"refresh falls due {format_duration(TOKEN_LIFETIME - 300)} later, fails {failures} "
        f"times and is retried each time after a minute; then {refreshes} refreshes deliver "
        f"tokens 30 minutes apart until cancel() at {_minutes(CANCEL_AT)}.",
    )


def render() -> str:
    """Run the scheduler and draw what it did."""
    return draw(record())


def main(argv: list[str]) -> int:
    output = Path(argv[0]) if argv else OUTPUT
    output.write_text(render(), encoding="utf-8")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
