"""Draw ``docs/_static/metrics.svg``: the metrics of one simulated day, read from OpenTelemetry.

The figures are not made up. :func:`record` runs a real
:class:`~token_refresh.Scheduler` on a :class:`~token_refresh.testing.ManualClock`
for a day: 40 sessions with one-hour tokens, a token server that fails one
request in ten, and a host that is paused four times (for 20 s, 3 min, 15 min
and 50 min). :func:`token_refresh.otel.instrument` records on a real
OpenTelemetry SDK ``MeterProvider``, and the picture is drawn from what its
``InMemoryMetricReader`` collected: the ``token_refresh.lateness`` histogram
and the ``token_refresh.refreshes`` and ``token_refresh.fetches`` counters.
``tests/test_docs.py`` fails while the committed file differs from what this
script draws; after a change to the scheduler run::

    python docs/_scripts/metrics.py

and look at the new picture before committing it.
"""

from __future__ import annotations

import base64
import json
import math
import random
import sys
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
)

from token_refresh import Scheduler, otel
from token_refresh.testing import ManualClock

OUTPUT = Path(__file__).resolve().parent.parent / "_static" / "metrics.svg"

START = 1_800_000_000.0
HOUR = 3600.0
SESSIONS = 40
TOKEN_LIFETIME = HOUR
FAILURE_RATE = 0.1
#: (hours into the day, seconds asleep): when the host is paused, and for how long.
PAUSES = ((3.2, 20.0), (7.5, 180.0), (12.1, 900.0), (18.7, 3000.0))
SEED = 2026


def unsigned_jwt(exp: float) -> str:
    payload = base64.urlsafe_b64encode(json.dumps({"exp": exp}).encode()).decode()
    return f"e30.{payload.rstrip('=')}.unsigned"


@dataclass
class Figures:
    """What the reader collected at the end of the day."""

    #: (upper bound in seconds, count) per lateness bucket; the last bound is inf
    lateness: list[tuple[float, int]] = field(default_factory=list)
    #: (outcome, trigger) -> refreshes
    refreshes: dict[tuple[str, str], int] = field(default_factory=dict)
    #: outcome -> get_access_token calls
    fetches: dict[str, int] = field(default_factory=dict)
    late_refreshes: int = 0


def record() -> Figures:
    """Run the day and return what OpenTelemetry collected."""
    clock = ManualClock(start=START)
    rng = random.Random(SEED)

    def get_access_token() -> str | None:
        if rng.random() < FAILURE_RATE:
            raise ConnectionError("token server unreachable")
        return unsigned_jwt(clock.time() + TOKEN_LIFETIME)

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    scheduler = Scheduler(get_access_token, lambda _s, _t: None, clock=clock, label="daemon")
    otel.instrument(scheduler, provider)
    for number in range(SESSIONS):
        # sessions log in over the first hour, each with a fresh one-hour token
        clock.advance(HOUR / SESSIONS)
        scheduler.schedule(f"session-{number}", unsigned_jwt(clock.time() + TOKEN_LIFETIME))
    elapsed = HOUR
    for at, asleep in PAUSES:
        clock.advance(at * HOUR - elapsed)
        clock.suspend(asleep)
        elapsed = at * HOUR
    clock.advance(24 * HOUR - elapsed)
    scheduler.close()

    figures = Figures()
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    attributes = dict(point.attributes or {})
                    if isinstance(point, HistogramDataPoint):
                        if metric.name == "token_refresh.lateness":
                            _add_buckets(figures, point)
                    elif isinstance(point, NumberDataPoint):
                        count = int(point.value)
                        if metric.name == "token_refresh.refreshes":
                            key = (
                                str(attributes["token_refresh.outcome"]),
                                str(attributes["token_refresh.trigger"]),
                            )
                            figures.refreshes[key] = figures.refreshes.get(key, 0) + count
                        elif metric.name == "token_refresh.fetches":
                            outcome = str(attributes["token_refresh.outcome"])
                            figures.fetches[outcome] = figures.fetches.get(outcome, 0) + count
    figures.late_refreshes = sum(count for bound, count in figures.lateness if bound > 1.0)
    provider.shutdown()
    return figures


def _add_buckets(figures: Figures, point: HistogramDataPoint) -> None:
    """Add one lateness point (one trigger's) to the day's histogram."""
    counts = [count for _, count in figures.lateness] or [0] * len(point.bucket_counts)
    bounds = [*point.explicit_bounds, float("inf")]
    figures.lateness = [
        (bound, total + count)
        for bound, total, count in zip(bounds, counts, point.bucket_counts, strict=True)
    ]


# -- drawing ---------------------------------------------------------------------

WIDTH, HEIGHT = 1100, 470
STYLE = """
text { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       font-size: 14px; fill: #1f2328; }
.title { font-weight: 600; font-size: 16px; }
.note, .tick { font-size: 12.5px; fill: #57606a; }
.value { font-size: 12.5px; }
.axis { stroke: #8c959f; stroke-width: 1; }
.bar { fill: #0969da; }
.late { fill: #bc4c00; }
.delivered { fill: #1a7f37; }
.failed { fill: #cf222e; }
.stale { fill: #8c959f; }
"""


def _n(number: float) -> str:
    return f"{number:.1f}".rstrip("0").rstrip(".")


def _bound(seconds: float) -> str:
    if seconds == float("inf"):
        return "more"
    if seconds < 1:
        return f"{_n(seconds * 1000)} ms"
    if seconds < 60:
        return f"{_n(seconds)} s"
    return f"{_n(seconds / 60)} min"


class Svg:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def text(self, x: float, y: float, text: str, cls: str = "", anchor: str = "start") -> None:
        klass = f' class="{cls}"' if cls else ""
        self.parts.append(
            f'<text x="{_n(x)}" y="{_n(y)}"{klass} text-anchor="{anchor}">{escape(text)}</text>'
        )

    def rect(self, x: float, y: float, width: float, height: float, cls: str) -> None:
        self.parts.append(
            f'<rect x="{_n(x)}" y="{_n(y)}" width="{_n(width)}" height="{_n(height)}" '
            f'class="{cls}"/>'
        )

    def line(self, x1: float, y1: float, x2: float, y2: float) -> None:
        self.parts.append(
            f'<line x1="{_n(x1)}" y1="{_n(y1)}" x2="{_n(x2)}" y2="{_n(y2)}" class="axis"/>'
        )

    def document(self, title: str, description: str) -> str:
        return "\n".join(
            [
                f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
                f'width="{WIDTH}" height="{HEIGHT}" role="img">',
                f"<title>{escape(title)}</title>",
                f"<desc>{escape(description)}</desc>",
                f"<style>{STYLE}</style>",
                f'<rect width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>',
                *self.parts,
                "</svg>",
                "",
            ]
        )


def _draw_lateness(svg: Svg, figures: Figures) -> None:
    left, top, width, height = 60.0, 70.0, 560.0, 300.0
    svg.text(left, 30, "token_refresh.lateness: refresh attempts by how late they started", "title")
    svg.text(
        left, 50, "attempts started at most this late (LATENESS_BUCKETS); log-scaled bars", "note"
    )
    buckets = figures.lateness
    tallest = max(count for _, count in buckets)
    scale = height / _log(tallest)
    step = width / len(buckets)
    svg.line(left, top + height, left + width, top + height)
    for index, (bound, count) in enumerate(buckets):
        x = left + index * step
        bar = scale * _log(count) if count else 0.0
        svg.rect(x + 3, top + height - bar, step - 6, bar, "late" if bound > 1.0 else "bar")
        if count:
            svg.text(x + step / 2, top + height - bar - 5, str(count), "value", "middle")
        label_y = top + height + 16 + (index % 2) * 14
        svg.text(x + step / 2, label_y, _bound(bound), "tick", "middle")
    svg.text(
        left,
        top + height + 62,
        f"{figures.late_refreshes} attempts started more than 1 s late: the four pauses",
        "note",
    )


def _log(count: float) -> float:
    return math.log10(count + 1)


def _draw_refreshes(svg: Svg, figures: Figures) -> None:
    left, top, width = 690.0, 70.0, 360.0
    svg.text(left, 30, "token_refresh.refreshes", "title")
    fetched = sum(figures.fetches.values())
    refreshed = sum(figures.refreshes.values())
    svg.text(
        left,
        50,
        f"by outcome and trigger: {refreshed} refreshes took {fetched} fetches",
        "note",
    )
    rows = sorted(figures.refreshes.items(), key=lambda item: (-item[1], item[0]))
    tallest = max(count for _, count in rows)
    row_height = 30.0
    for index, ((outcome, trigger), count) in enumerate(rows):
        y = top + index * row_height
        bar = max(2.0, (width - 150) * count / tallest)
        svg.text(left + 140, y + 17, f"{outcome}, {trigger}", "tick", "end")
        svg.rect(left + 150, y + 4, bar, row_height - 10, outcome)
        svg.text(left + 156 + bar, y + 17, str(count), "value")
    y = top + len(rows) * row_height + 24
    for outcome in sorted(figures.fetches):
        count = figures.fetches[outcome]
        svg.text(left, y, f"token_refresh.fetches, {outcome}: {count}", "note")
        y += 18


def render(figures: Figures | None = None) -> str:
    """The SVG for ``figures`` (by default: a fresh :func:`record`)."""
    figures = record() if figures is None else figures
    svg = Svg()
    _draw_lateness(svg, figures)
    _draw_refreshes(svg, figures)
    return svg.document(
        "A simulated day of one scheduler's metrics",
        f"{SESSIONS} sessions with one-hour tokens for a day; one token request in ten "
        "fails; the host is paused four times. Left: the lateness histogram. Right: "
        "refreshes by outcome and trigger, and the fetches they took.",
    )


def main(argv: list[str]) -> int:
    target = Path(argv[1]) if len(argv) > 1 else OUTPUT
    target.write_text(render(), encoding="utf-8")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
