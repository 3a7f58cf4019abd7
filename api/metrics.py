"""Prometheus metrics of the API (``GET /metrics``, text exposition format, prometheus-client).

Per app (its own ``CollectorRegistry``, so several apps in one process never clash):
``ncs_http_requests_total{method, route, status}`` and ``ncs_http_request_duration_seconds{method, route}``,
labelled by the route *template* (``/jobs/{job_id}``), never the raw path, so label cardinality stays bounded.

The counting is a plain ASGI middleware (not Starlette's ``BaseHTTPMiddleware``, whose task group and body
streams cost more than the rest of a 304 answer) that caches its labelled children, so a request costs two
dict lookups, a counter increment and a histogram observation.
"""

from __future__ import annotations

import os
import time
from typing import Any

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

#: set (to an empty folder) before the API processes start when uvicorn runs several workers
#: (``ncservice.service``): prometheus-client then keeps every process's values in files there and
#: ``GET /metrics`` answers their sum, whichever worker the scrape reaches
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class MetricsMiddleware:
    """ASGI middleware: count HTTP requests and time them, by method, route template and status."""

    def __init__(self, app: Any, *, requests: Counter, duration: Histogram) -> None:
        self.app = app
        self.requests = requests
        self.duration = duration
        self._counters: dict[tuple[str, str, int], Any] = {}
        self._timers: dict[tuple[str, str], Any] = {}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")  # set in place by the router when a route matched
            template = getattr(route, "path", None) or "<unmatched>"
            method = scope["method"]
            key = (method, template, status)
            counter = self._counters.get(key)
            if counter is None:
                counter = self._counters[key] = self.requests.labels(method, template, str(status))
            timer = self._timers.get(key[:2])
            if timer is None:
                timer = self._timers[key[:2]] = self.duration.labels(method, template)
            counter.inc()
            timer.observe(time.perf_counter() - start)


def install_metrics(app: FastAPI) -> None:
    """Add the request-counting middleware and the ``GET /metrics`` route to ``app``."""
    registry = CollectorRegistry(auto_describe=True)
    requests = Counter("ncs_http_requests", "HTTP requests answered", ["method", "route", "status"],
                       registry=registry)
    duration = Histogram("ncs_http_request_duration_seconds", "Time to answer an HTTP request",
                         ["method", "route"], registry=registry)
    app.state.metrics_registry = registry
    from api.job_metrics import JobCollector  # jobs by state, queue length, job durations (from the DB)

    job_collector = JobCollector(lambda: app.state.read_sessionmaker())
    registry.register(job_collector)

    app.add_middleware(MetricsMiddleware, requests=requests, duration=duration)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics (text exposition format)",
             response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {"example": "ncs_http_requests_total{...} 3.0"}}}})
    def metrics() -> Response:
        if os.environ.get(MULTIPROC_ENV):  # several uvicorn workers: sum the counters of every process
            from prometheus_client import multiprocess

            scrape = CollectorRegistry()
            multiprocess.MultiProcessCollector(scrape)
            scrape.register(job_collector)
            return Response(generate_latest(scrape), media_type=CONTENT_TYPE_LATEST)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
