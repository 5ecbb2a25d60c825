"""Prometheus metrics of the API process.

The task counters count what this process appended: a repeated submission answered from
its idempotency key, or a cancel the rules refused, counts nothing. The projection lag is
read from the database at every scrape of /metrics (and on /api/stats and /readyz).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "taskledger_http_requests_total",
            "HTTP requests answered, by route and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "taskledger_http_request_duration_seconds",
            "Time to answer an HTTP request.",
            ["method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60),
            registry=self.registry,
        )
        self.tasks_submitted = Counter(
            "taskledger_tasks_submitted_total",
            "Tasks submitted (TaskSubmitted appended by this process), by language.",
            ["language"],
            registry=self.registry,
        )
        self.tasks_cancelled = Counter(
            "taskledger_tasks_cancelled_total",
            "Tasks cancelled (TaskCancelled appended by this process), by language.",
            ["language"],
            registry=self.registry,
        )
        self.projection_lag = Gauge(
            "taskledger_projection_lag_events",
            "Events in the log a projection has not applied yet (an upper bound: positions "
            "can have holes).",
            ["projection"],
            registry=self.registry,
        )
        self.projection_lag_seconds = Gauge(
            "taskledger_projection_lag_seconds",
            "Age of the oldest event a projection has not applied yet (0 when caught up).",
            ["projection"],
            registry=self.registry,
        )

    def set_projection_lag(self, projection: str, events: int, seconds: float) -> None:
        self.projection_lag.labels(projection).set(events)
        self.projection_lag_seconds.labels(projection).set(seconds)


class WebhookMetrics:
    """The deliverer's: attempts by outcome, and how long each took."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.deliveries = Counter(
            "taskledger_webhook_deliveries_total",
            "Webhook delivery attempts recorded, by outcome (delivered, failed: tried again "
            "later, gave-up: its retry window ended).",
            ["outcome"],
            registry=self.registry,
        )
        self.delivery_seconds = Histogram(
            "taskledger_webhook_delivery_seconds",
            "Time of one webhook delivery attempt, from connecting to the receiver's answer.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
