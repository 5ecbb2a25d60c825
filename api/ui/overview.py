"""The overview: counts by status, outcomes per minute over the last hour, queue depth,
run times, the views' lag and the workers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from api.http import context, in_thread
from api.system import list_workers, projection_lags
from api.tasks import STATUSES
from api.ui.render import page
from api.ui.sessions import require_session
from projections.queries import counts_by_status, outcomes_per_minute, queue_depth, run_times

CHART_MINUTES = 60
OUTCOMES = ("completed", "failed", "expired")
# The chart's coordinates (its viewBox).
CHART_WIDTH, CHART_HEIGHT, CHART_LEFT, CHART_BOTTOM = 720.0, 200.0, 40.0, 24.0


@dataclass(frozen=True)
class Bar:
    kind: str
    x: float
    y: float
    width: float
    height: float
    title: str


def chart(minutes: list[dict[str, Any]]) -> dict[str, Any]:
    """Stacked bars of the outcomes of each minute, and the scale's top."""
    top = max([sum(m[k] for k in OUTCOMES) for m in minutes] + [1])
    plot_width = CHART_WIDTH - CHART_LEFT
    plot_height = CHART_HEIGHT - CHART_BOTTOM - 8
    step = plot_width / max(len(minutes), 1)
    bars = []
    for index, minute in enumerate(minutes):
        base = CHART_HEIGHT - CHART_BOTTOM
        for kind in OUTCOMES:
            count = minute[kind]
            if not count:
                continue
            height = plot_height * count / top
            base -= height
            bars.append(
                Bar(
                    kind,
                    CHART_LEFT + index * step + 1,
                    base,
                    max(step - 2, 1),
                    height,
                    f"{minute['minute']:%H:%M} UTC: {count} {kind}",
                )
            )
    return {
        "bars": bars,
        "top": top,
        "width": CHART_WIDTH,
        "height": CHART_HEIGHT,
        "left": CHART_LEFT,
        "baseline": CHART_HEIGHT - CHART_BOTTOM,
        "first": minutes[0]["minute"] if minutes else None,
        "last": minutes[-1]["minute"] if minutes else None,
    }


async def overview(request: Request) -> Response:
    session = await require_session(request)
    principal = session.principal
    ctx = context(request)

    def read() -> dict[str, Any]:
        now = ctx.ledger.clock.now()
        hour_ago = now - timedelta(minutes=CHART_MINUTES)
        with ctx.queries.connection() as conn:
            counts = counts_by_status(conn, ctx.schema, tenant=principal.scope)
            minutes = outcomes_per_minute(
                conn, ctx.schema, tenant=principal.scope, since=hour_ago, until=now
            )
            depth = queue_depth(conn, ctx.schema, tenant=principal.scope, now=now)
            runs = run_times(conn, ctx.schema, tenant=principal.scope, since=hour_ago)
            lags = projection_lags(ctx, conn)
        return {
            "counts": [(status, counts.get(status, 0)) for status in STATUSES],
            "total": sum(counts.values()),
            "minutes": minutes,
            "chart": chart(minutes),
            "queue_depth": depth,
            "run_time": runs,
            "lags": lags,
            "workers": list_workers(ctx, principal),
        }

    values = await in_thread(request, read)
    workers = values["workers"]
    values["slots"] = sum(w["slots"] for w in workers if w["state"] == "alive")
    values["busy"] = sum(w["busy"] for w in workers if w["state"] == "alive")
    return page(request, "overview.html", **values)
