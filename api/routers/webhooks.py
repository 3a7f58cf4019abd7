"""``/webhooks``: the caller's signing secret, and the state and delivery attempts of webhooks.

A webhook is registered by ``callback_url`` in ``POST /jobs`` or ``POST /sweeps`` and delivered by the worker
(``worker.webhooks``); the signature scheme is :mod:`ncservice.webhooks`'s.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api.deps import OwnerDep, SessionDep, SettingsDep
from api.problems import ApiProblem, problem_responses
from db import jobs as dbjobs
from db import webhooks as dbhooks
from ncservice import webhooks as signing

router = APIRouter(prefix="/webhooks", tags=["webhooks"])


class WebhookSecret(BaseModel):
    """How to verify the webhooks of this API key."""

    secret: str = Field(description="HMAC-SHA256 key of this API key's webhooks (hex text, used as UTF-8 bytes)")
    header: str = Field(signing.SIGNATURE_HEADER, description="header carrying `sha256=<hex digest of the body>`")
    algorithm: str = "hmac-sha256"


class DeliveryOut(BaseModel):
    attempt: int
    at: datetime
    status_code: int | None
    ok: bool
    error: str | None
    duration_ms: float


class WebhookOut(BaseModel):
    id: str = Field(description="also sent as X-NCS-Delivery")
    event: str = Field(examples=["job.finished"])
    url: str
    status: str = Field(description="waiting | pending | delivered | failed")
    attempts: int
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    deliveries: list[DeliveryOut]


@router.get("/secret", response_model=WebhookSecret, summary="The signing secret of the caller's webhooks")
def webhook_secret(settings: SettingsDep, owner: OwnerDep) -> WebhookSecret:
    """The secret whose HMAC-SHA256 of the raw body is in ``X-NCS-Signature-256`` of every webhook of the
    calling API key (with auth off: the server's secret). Verify with ``ncservice.webhooks.verify``."""
    return WebhookSecret(secret=signing.secret_for(settings, owner))


@router.get("", response_model=list[WebhookOut], summary="Webhooks of a job or a sweep, with their attempts",
            responses=problem_responses(404, 422))
def list_webhooks(session: SessionDep, owner: OwnerDep, job_id: str | None = None,
                  sweep_id: str | None = None) -> list[WebhookOut]:
    """Exactly one of ``job_id`` and ``sweep_id``."""
    if (job_id is None) == (sweep_id is None):
        raise ApiProblem(422, "invalid-query", "give exactly one of job_id and sweep_id", field="query.job_id")
    if job_id is not None:
        dbjobs.get_job(session, job_id, owner=owner)
    else:
        dbjobs.get_sweep(session, sweep_id, owner=owner)
    hooks = dbhooks.webhooks_of(session, job_id=job_id, sweep_id=sweep_id)
    return [WebhookOut(id=h.id, event=h.event, url=h.url, status=h.status, attempts=h.attempts,
                       next_attempt_at=h.next_attempt_at, delivered_at=h.delivered_at,
                       deliveries=[DeliveryOut(attempt=d.attempt, at=d.at, status_code=d.status_code, ok=d.ok,
                                               error=d.error, duration_ms=d.duration_ms)
                                   for d in dbhooks.deliveries(session, h.id)]) for h in hooks]
