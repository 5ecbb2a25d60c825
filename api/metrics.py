"""Prometheus metrics of the API process."""

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
            "Tasks accepted by the API, by language.",
            ["language"],
            registry=self.registry,
        )
        self.projection_lag = Gauge(
            "taskledger_projection_lag_events",
            "Events in the log a projection has not applied yet (as of the last check).",
            ["projection"],
            registry=self.registry,
        )
