"""The FastAPI application factory of the NC service (DESIGN.md §2).

``create_app(settings)`` builds everything from the settings passed in (nothing at import time): the DB engine
and session factory (``db.session``), the Celery producer (built on first enqueue), the problem+json handlers
and the routers. ``uvicorn --factory api.app:create_app`` serves it with settings read from ``NCS_*``.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

import ncengine
from api.auth import check_startup
from api.head import HeadAsGet
from api.metrics import install_metrics
from api.problems import install_problem_handlers
from api.routers import dashboard, events, figures, health, jobs, measure, sweeps, webhooks
from db.session import make_engine, make_read_sessionmaker, make_sessionmaker
from ncservice.settings import Settings, get_settings

DESCRIPTION = """\
Neural Collapse (NC) research service.

* **POST /sweeps** trains a grid of the thesis's MLPs (batch norm + weight decay) on Celery workers;
  poll **GET /jobs/{id}** (cheap: `ETag` / `If-None-Match`) and fetch **GET /sweeps/{id}/results**.
* **POST /measure** takes last-layer features (multipart `.npy/.npz/.safetensors/.pt/.json`, or JSON) and
  answers the NC metrics and the bound of Theorem 2.3.1 (small inputs at once, large ones as a job).
  Every metric key is defined in `docs/metrics.md`, the bound in `docs/bounds.md` (in the repository).

Every error is RFC 9457 `application/problem+json` with a `field` naming the input at fault.
POSTs honour `Idempotency-Key`. Lists page by cursor: `{items, next_cursor}`.
"""

TAGS = [
    {"name": "sweeps", "description": "Training sweeps: a grid over a base run config, one job per bundle."},
    {"name": "jobs", "description": "Jobs (train, measure, ufm): state, progress, metrics, bounds, cancel."},
    {"name": "measure", "description": "NC metrics and the thesis's bound of uploaded features."},
    {"name": "health", "description": "Liveness and readiness probes."},
]


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API.

    Args:
        settings: service settings; ``None`` reads them from the ``NCS_*`` environment (``get_settings()``).

    Returns:
        The FastAPI app. ``app.state`` holds ``settings``, ``engine``, ``sessionmaker`` (writers),
        ``read_sessionmaker`` (GET/HEAD requests, ``db.session.make_read_sessionmaker``) and ``queue`` (the
        Celery producer, created on first use; a test may set it, or override ``api.deps.get_queue``).
    """
    settings = settings or get_settings()
    if settings.is_sqlite:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.resolved_database_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        check_startup(settings, app.state.sessionmaker)  # AuthConfigError: refuse to start, saying why
        # everything imported so far (torch, pydantic models, SQLAlchemy) lives as long as the process: move it
        # out of the collector's reach, so a full collection walks only what requests allocate (with ~300k
        # startup objects one took ~0.2-0.8 s, a pause every request in flight waited for)
        gc.collect()
        gc.freeze()
        yield
        queue = getattr(app.state, "queue", None)
        if queue is not None and hasattr(queue, "close"):
            queue.close()
        engine.dispose()

    app = FastAPI(title="NC service", version=ncengine.__version__, description=DESCRIPTION,
                  openapi_tags=TAGS, lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = make_sessionmaker(engine)
    app.state.read_sessionmaker = make_read_sessionmaker(engine)  # GET/HEAD: SQLite readers never wait
    app.state.queue = None
    install_problem_handlers(app)
    install_metrics(app)
    for module in (sweeps, jobs, events, figures, webhooks, measure, health, dashboard):
        app.include_router(module.router)
    app.add_middleware(HeadAsGet)  # outermost: every GET route answers HEAD
    return app
