"""Prometheus metrics of the API (``GET /metrics``, text exposition format, prometheus-client).

Per app (its own ``CollectorRegistry``, so several apps in one process never clash):
``ncs_http_requests_total{method, route, status}`` and ``ncs_http_request_duration_seconds{method, route}``,
labelled by the route *template* (``/jobs/{job_id}``), never the raw path, so label cardinality stays bounded.
"""

from __future__ import annotations

import time

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest


def install_metrics(app: FastAPI) -> None:
    """Add the request-counting middleware and the ``GET /metrics`` route to ``app``."""
    registry = CollectorRegistry(auto_describe=True)
    requests = Counter("ncs_http_requests", "HTTP requests answered", ["method", "route", "status"],
                       registry=registry)
    duration = Histogram("ncs_http_request_duration_seconds", "Time to answer an HTTP request",
                         ["method", "route"], registry=registry)
    app.state.metrics_registry = registry
    from api.job_metrics import JobCollector  # jobs by state, queue length, job durations (from the DB)

    registry.register(JobCollector(lambda: app.state.sessionmaker()))

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            template = getattr(route, "path", None) or "<unmatched>"
            requests.labels(request.method, template, str(status)).inc()
            duration.labels(request.method, template).observe(time.perf_counter() - start)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics (text exposition format)",
             response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {"example": "ncs_http_requests_total{...} 3.0"}}}})
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
