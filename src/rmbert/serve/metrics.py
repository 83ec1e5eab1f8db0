"""Prometheus metrics through `prometheus-client`, counted by a plain ASGI middleware."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PATHS = frozenset({"/rank", "/news", "/health", "/metrics", "/", "/users"})


class Metrics:
    """One registry per app, so several apps in one process (tests) never share counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "rmbert_requests", "HTTP requests by path and status.", ["path", "status"], registry=self.registry
        )
        self.errors = Counter(
            "rmbert_errors", "HTTP responses with status >= 400.", ["path", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "rmbert_request_seconds",
            "Request latency.",
            ["path"],
            buckets=(0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )
        self.news = Gauge("rmbert_store_news", "News in the store.", registry=self.registry)
        self.dropped = Gauge(
            "rmbert_dropped_requests",
            "Requests dropped unscored (client gone or timed out).",
            registry=self.registry,
        )

    def observe(self, path: str, status: int, seconds: float) -> None:
        self.requests.labels(path, str(status)).inc()
        if status >= 400:
            self.errors.labels(path, str(status)).inc()
        self.latency.labels(path).observe(seconds)

    def render(self, store_size: int, dropped: int) -> bytes:
        self.news.set(store_size)
        self.dropped.set(dropped)
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every HTTP request by path and status, with its latency (plain ASGI: no per-request
    task group or body streams, unlike `@app.middleware`)."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, status = time.perf_counter(), [500]  # an exception that escapes counts as 500

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"] if scope["path"] in PATHS else "other"
            self.metrics.observe(path, status[0], time.perf_counter() - t0)


class BodyLimit:
    """Refuses request bodies over `max_bytes` with 413 before anything parses them: by the
    Content-Length header when there is one (the server then delivers no more than that), else
    by reading the chunked body up to the limit first and replaying it to the app."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                await _too_large(send, self.max_bytes)
                return
            await self.app(scope, receive, send)
            return
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await _too_large(send, self.max_bytes)
                return
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


async def _too_large(send, limit: int) -> None:
    body = b'{"detail":"request body over the limit of %d bytes"}' % limit
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
