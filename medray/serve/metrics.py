"""Prometheus metrics for GET /metrics, gathered in one small deployment.

Ingress and model replicas come and go with autoscaling, and a scrape of /metrics lands on
any ingress replica; so every replica buffers its observations and sends them, once a
second, to this one replica, which holds the registry and renders it. (A handle call per
request cost more than the request itself on small models.) Ray's own metrics endpoint on
each node (Serve's built-in ray_serve_* series) stays available beside it.
"""

from __future__ import annotations

import asyncio
import logging

from ray import serve

log = logging.getLogger(__name__)
FLUSH_S = 1.0


class MetricsBuffer:
    """A replica's observations since the last flush; flushed by a task on its event loop."""

    def __init__(self, handle):
        self.handle = handle
        self.requests: list[tuple] = []
        self.models: list[dict] = []
        self._task: asyncio.Task | None = None

    def request(self, route: str, method: str, code: int, seconds: float) -> None:
        self.requests.append((route, method, code, seconds))
        self._ensure_flushing()

    def model(self, **fields) -> None:
        self.models.append(fields)
        self._ensure_flushing()

    def _ensure_flushing(self) -> None:
        if self._task is None or self._task.done():
            try:
                self._task = asyncio.get_running_loop().create_task(self._flush_soon())
            except RuntimeError:  # no loop here (a worker thread): the next call on the loop starts it
                pass

    async def _flush_soon(self) -> None:
        await asyncio.sleep(FLUSH_S)
        requests, models = self.requests, self.models
        self.requests, self.models = [], []
        try:
            await self.handle.record.remote(requests, models)
        except Exception as e:  # metrics never fail a request; a lost second of them is logged
            log.warning("could not send metrics: %s", type(e).__name__)

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
        self.engine_waiting = Gauge("medray_engine_waiting", "Requests queued inside the engine for a place in "
                                    "the running batch or room in the KV cache (vLLM), per model replica",
                                    ["model", "replica"], registry=self.registry)
        self.kv_cache = Gauge("medray_kv_cache_usage", "Share of the KV cache in use (vLLM), per model replica",
                              ["model", "replica"], registry=self.registry)
        self.tokens = Counter("medray_generated_tokens", "Generated (completion) tokens",
                              ["model"], registry=self.registry)

    def record(self, requests: list[tuple], models: list[dict]) -> None:
        for route, method, code, seconds in requests:
            self.requests.labels(route, method, str(code)).inc()
            self.latency.labels(route, method).observe(seconds)
        for m in models:  # in the order observed, so the last queue depth wins
            if m.get("queue_depth") is not None:
                self.queue.labels(m["model"], m["replica"]).set(m["queue_depth"])
            if m.get("engine_waiting") is not None:
                self.engine_waiting.labels(m["model"], m["replica"]).set(m["engine_waiting"])
            if m.get("kv_cache_usage") is not None:
                self.kv_cache.labels(m["model"], m["replica"]).set(m["kv_cache_usage"])
            if m.get("batch_size") is not None:
                self.batch.labels(m["model"]).observe(m["batch_size"])
            if m.get("generated_tokens"):
                self.tokens.labels(m["model"]).inc(m["generated_tokens"])

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
