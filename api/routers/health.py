"""Liveness (``GET /health``) and readiness (``GET /ready``: DB reachable and migrated, broker reachable)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field
from sqlalchemy import text
from sqlalchemy.orm import Session

import ncengine
from api.deps import QueueDep, SessionDep
from api.problems import problem_response, problem_responses
from api.queue import JobQueue

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str = Field(examples=["0.1.0"])


class Check(BaseModel):
    ok: bool
    detail: str | None = None


class Ready(BaseModel):
    status: Literal["ready", "not ready"]
    checks: dict[str, Check] = Field(examples=[{"database": {"ok": True, "detail": "at head 0001"},
                                                "migrations": {"ok": True, "detail": "at head 0001"},
                                                "broker": {"ok": True, "detail": None}}])


@router.get("/health", summary="Liveness: the process answers", response_model=Health)
def health() -> Health:
    """Always 200 while the process runs; it checks nothing else (use ``/ready`` for dependencies)."""
    return Health(version=ncengine.__version__)


def _migration_heads() -> set[str]:
    """Head revision of the Alembic scripts shipped in ``migrations/``."""
    import migrations

    return {migrations.head()}


def _check_db(session: Session) -> tuple[Check, Check]:
    from alembic.runtime.migration import MigrationContext

    try:
        conn = session.connection()
        conn.execute(text("SELECT 1"))
        current = set(MigrationContext.configure(conn).get_current_heads())
    except Exception as exc:  # noqa: BLE001 - any driver error means "not reachable"
        session.rollback()
        return Check(ok=False, detail=f"database unreachable: {type(exc).__name__}"), \
            Check(ok=False, detail="unknown (database unreachable)")
    finally:
        session.rollback()
    try:
        heads = _migration_heads()
    except Exception as exc:  # noqa: BLE001
        return Check(ok=True), Check(ok=False, detail=f"cannot read migration scripts: {type(exc).__name__}")
    if current == heads:
        return Check(ok=True), Check(ok=True, detail=f"at head {', '.join(sorted(heads))}")
    return Check(ok=True), Check(ok=False, detail=f"database at {sorted(current) or 'no revision'}, "
                                                 f"code expects {sorted(heads)}; run `ncservice migrate`")


def _check_broker(queue: JobQueue) -> Check:
    try:
        queue.ping(timeout=2.0)
    except Exception as exc:  # noqa: BLE001 - any transport error means "not reachable"
        return Check(ok=False, detail=f"broker unreachable: {type(exc).__name__}")
    return Check(ok=True)


@router.get("/ready", summary="Readiness: database reachable and migrated, broker reachable",
            response_model=Ready, responses=problem_responses(503))
async def ready(session: SessionDep, queue: QueueDep):
    """200 when the database answers and is at the migrations' head and the broker answers; else 503
    problem+json whose ``field`` names the first failing check and whose ``checks`` give each result."""
    db_check, mig_check = await run_in_threadpool(_check_db, session)
    broker_check = await run_in_threadpool(_check_broker, queue)
    checks = {"database": db_check, "migrations": mig_check, "broker": broker_check}
    failing = [name for name, c in checks.items() if not c.ok]
    if failing:
        return problem_response(
            None, 503, "not-ready", "Service Unavailable",
            "; ".join(f"{n}: {checks[n].detail}" for n in failing), field=failing[0],
            headers={"Retry-After": "5"},
            extra={"checks": {k: v.model_dump() for k, v in checks.items()}, "instance": "/ready"})
    return Ready(status="ready", checks=checks)
