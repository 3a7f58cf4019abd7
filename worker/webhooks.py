"""Webhook delivery (issue 8): POST a signed JSON body to each ``callback_url`` once its job or sweep ended.

:func:`dispatch` arms the webhooks whose target is terminal, takes the due ones (``db.webhooks.claim_due``)
and POSTs each (httpx, ``settings.webhook_timeout_seconds``). A 2xx answer delivers it; a network error, a
5xx, 408 or 429 schedules a retry after ``backoff * 2**(attempt-1)`` seconds (capped at one hour) until
``settings.webhook_max_attempts``; any other answer fails it at once (retrying will not change a 404).
Every attempt is logged in ``webhook_deliveries``.

It runs in the worker right after a job ends (``worker.tasks``: the first attempt goes out at once) and on
every reconciler pass (retries, and jobs that ended without a worker: canceled while queued, failed by the
reconciler). The signature is :mod:`ncservice.webhooks`'s.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy.orm import Session, sessionmaker

from db import jobs as dbjobs
from db import webhooks as dbhooks
from db.errors import NotFound
from db.models import Webhook, utcnow
from ncservice import webhooks as signing
from ncservice.settings import Settings

log = logging.getLogger("ncservice.webhooks")

RETRY_STATUSES = frozenset({408, 429})
MAX_BACKOFF_SECONDS = 3600.0


def backoff_seconds(settings: Settings, attempt: int) -> float:
    """Wait after failed attempt ``attempt`` (1-based): ``backoff * 2**(attempt-1)``, at most one hour."""
    return min(settings.webhook_backoff_seconds * 2 ** (attempt - 1), MAX_BACKOFF_SECONDS)


def payload(session: Session, hook: Webhook) -> dict[str, Any]:
    """The JSON body of ``hook``: the event, the delivery id, the time and the job's or sweep's summary."""
    body: dict[str, Any] = {"event": hook.event, "delivery": hook.id, "attempt": hook.attempts,
                            "sent_at": utcnow().isoformat()}
    if hook.job_id is not None:
        job = dbjobs.get_job(session, hook.job_id)
        body["job"] = {"id": job.id, "kind": job.kind, "status": job.status, "sweep_id": job.sweep_id,
                       "attempts": job.attempts,
                       "error": {"code": job.error_code, "message": job.error_message} if job.error_code else None,
                       "finished_at": job.finished_at.isoformat() if job.finished_at else None,
                       "location": f"/jobs/{job.id}"}
    else:
        sweep = dbjobs.get_sweep(session, hook.sweep_id)
        jobs = dbjobs.sweep_jobs(session, sweep.id)
        counts: dict[str, int] = {}
        for j in jobs:
            counts[j.status] = counts.get(j.status, 0) + 1
        status = "succeeded" if set(counts) == {"succeeded"} else ("failed" if "failed" in counts else "canceled")
        body["sweep"] = {"id": sweep.id, "name": sweep.name, "preset": sweep.preset, "status": status,
                         "counts": counts, "jobs": [j.id for j in jobs], "location": f"/sweeps/{sweep.id}",
                         "results": f"/sweeps/{sweep.id}/results"}
    return body


def deliver(sm: sessionmaker[Session], settings: Settings, hook: Webhook, http: httpx.Client) -> Webhook:
    """One attempt of a claimed webhook; records it and returns the webhook's new state."""
    with sm() as s:
        try:
            data = json.dumps(payload(s, hook), separators=(",", ":"), default=str).encode()
        except NotFound:  # the job/sweep was deleted: nothing to tell
            return dbhooks.record_attempt(s, hook, status_code=None, error="target deleted", duration_ms=0.0,
                                          ok=False, retry_at=None)
    headers = {"Content-Type": "application/json", "User-Agent": "ncservice-webhook",
               signing.SIGNATURE_HEADER: signing.sign(signing.secret_for(settings, hook.owner), data),
               signing.EVENT_HEADER: hook.event, signing.DELIVERY_HEADER: hook.id}
    t0 = time.perf_counter()
    code: int | None = None
    error: str | None = None
    try:
        response = http.post(hook.url, content=data, headers=headers, timeout=settings.webhook_timeout_seconds)
        code = response.status_code
        if not 200 <= code < 300:
            error = f"HTTP {code}: {response.text[:200]}"
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"[:1000]
    ms = (time.perf_counter() - t0) * 1000.0
    ok = code is not None and 200 <= code < 300
    retryable = not ok and (code is None or code >= 500 or code in RETRY_STATUSES)
    retry_at = None
    if retryable and hook.attempts < settings.webhook_max_attempts:
        retry_at = utcnow() + timedelta(seconds=backoff_seconds(settings, hook.attempts))
    with sm() as s:
        out = dbhooks.record_attempt(s, hook, status_code=code, error=error, duration_ms=ms, ok=ok,
                                     retry_at=retry_at)
    level = logging.INFO if ok else logging.WARNING
    log.log(level, "webhook %s (%s) attempt %d -> %s", hook.id, hook.event, hook.attempts, out.status,
            extra={"job_id": hook.job_id, "sweep_id": hook.sweep_id, "webhook_id": hook.id,
                   "status_code": code})
    return out


def dispatch(sm: sessionmaker[Session], settings: Settings, *, job_id: str | None = None,
             http: httpx.Client | None = None) -> list[Webhook]:
    """Arm what has ended, then deliver every due webhook (only those of ``job_id`` and its sweep when given).
    Returns the webhooks attempted, in their new state. Never raises for a receiver's fault."""
    with sm() as s:
        dbhooks.arm(s, job_id=job_id)
        hooks = dbhooks.claim_due(s, lease_seconds=settings.webhook_timeout_seconds + 60.0, job_id=job_id)
    if not hooks:
        return []
    own = http is None
    http = http or httpx.Client(follow_redirects=False)
    try:
        return [deliver(sm, settings, hook, http) for hook in hooks]
    finally:
        if own:
            http.close()


def dispatch_quietly(sm: sessionmaker[Session], settings: Settings, *, job_id: str | None = None) -> None:
    """:func:`dispatch`, logging instead of raising (a webhook must never fail a job or stop the reconciler)."""
    try:
        dispatch(sm, settings, job_id=job_id)
    except Exception:
        log.exception("webhook dispatch failed", extra={"job_id": job_id})
