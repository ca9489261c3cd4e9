"""Prometheus metrics for GET /metrics, gathered in one small deployment.

Ingress and model replicas come and go with autoscaling, and a scrape of /metrics lands on
any ingress replica; so every replica sends its observations (fire and forget) to this one
replica, which holds the registry and renders it. Ray's own metrics endpoint on each node
(Serve's built-in ray_serve_* series) stays available beside it.
"""

from __future__ import annotations

from ray import serve

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("medray_http_requests", "HTTP requests by route, method and status code",
                                ["route", "method", "code"], registry=self.registry)
        self.latency = Histogram("medray_http_request_duration_seconds", "HTTP request latency by route",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch = Histogram("medray_batch_size", "Requests merged into one generate call",
                               ["model"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.queue = Gauge("medray_queue_depth", "Requests waiting or generating, per model replica",
                           ["model", "replica"], registry=self.registry)
        self.tokens = Counter("medray_generated_tokens", "Generated (completion) tokens",
                              ["model"], registry=self.registry)

    def record_request(self, route: str, method: str, code: int, seconds: float) -> None:
        self.requests.labels(route, method, str(code)).inc()
        self.latency.labels(route, method).observe(seconds)

    def record_model(self, model: str, replica: str, queue_depth: int | None = None,
                     batch_size: int | None = None, generated_tokens: int | None = None) -> None:
        if queue_depth is not None:
            self.queue.labels(model, replica).set(queue_depth)
        if batch_size is not None:
            self.batch.labels(model).observe(batch_size)
        if generated_tokens:
            self.tokens.labels(model).inc(generated_tokens)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
