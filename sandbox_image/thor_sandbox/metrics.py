"""Prometheus metrics of the sandbox service, on a registry the service owns.

Owns: metric names, labels and buckets (prefix `thor_sandbox_`, unit suffixes per
Prometheus conventions). Does not own: when they change (pool.py, app.py).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class SandboxMetrics:
    """All metrics of one service instance (no module-level registry)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.executions = Counter(
            "thor_sandbox_executions_total",
            "Snippets executed, by outcome (ok, error, timeout, oom, output_capped, sandbox_error).",
            ["outcome"],
            registry=r,
        )
        self.duration = Histogram(
            "thor_sandbox_execution_duration_seconds",
            "Wall time of a snippet inside the jail.",
            ["outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_duration = Histogram(
            "thor_sandbox_request_duration_seconds",
            "End-to-end time of an API request, queueing included.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("thor_sandbox_queue_depth", "Snippets waiting for a free worker.", registry=r)
        self.workers = Gauge("thor_sandbox_workers", "Workers by state (idle, busy, starting).", ["state"], registry=r)
        self.worker_restarts = Counter(
            "thor_sandbox_worker_restarts_total",
            "Workers replaced, by reason (crash, timeout, oom, dirty, recycled, cancelled, start_failed).",
            ["reason"],
            registry=r,
        )
        self.rejected = Counter(
            "thor_sandbox_rejected_total",
            "Snippets refused because the pool was busy, by reason (queue_full, queue_timeout).",
            ["reason"],
            registry=r,
        )
        self.disconnects = Counter(
            "thor_sandbox_client_disconnects_total",
            "Requests whose client went away mid-run; their snippets were stopped and the workers replaced.",
            ["route"],
            registry=r,
        )
        self.bad_requests = Counter(
            "thor_sandbox_bad_requests_total", "Requests refused as invalid (4xx).", ["route"], registry=r
        )
