"""Webhook rows (issue 8): subscribe, arm when the job/sweep ended, claim due deliveries, record attempts.

Every function takes a Session and commits (it owns its transaction), like ``db.jobs``. Claims are
conditional UPDATEs, so a worker and the reconciler racing for one webhook never both deliver the same
attempt. The state machine is :class:`db.models.WebhookStatus`.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import and_, exists, select, update
from sqlalchemy.orm import Session

from db.models import TERMINAL, Job, Webhook, WebhookDelivery, WebhookStatus, utcnow

W = WebhookStatus
_TERMINAL = [s.value for s in TERMINAL]


def subscribe(session: Session, *, url: str, owner: str | None, job_id: str | None = None,
              sweep_id: str | None = None) -> Webhook:
    """The webhook of ``url`` on a job (``job.finished``) or a sweep (``sweep.finished``); an existing one for
    the same target and URL is returned (an Idempotency-Key replay does not subscribe twice)."""
    if (job_id is None) == (sweep_id is None):
        raise ValueError("subscribe: give exactly one of job_id, sweep_id")
    target = Webhook.job_id == job_id if job_id is not None else Webhook.sweep_id == sweep_id
    found = session.execute(select(Webhook).where(target, Webhook.url == url)).scalar_one_or_none()
    if found is None:
        found = Webhook(url=url, owner=owner, job_id=job_id, sweep_id=sweep_id,
                        event="job.finished" if job_id is not None else "sweep.finished",
                        status=W.waiting.value, attempts=0)
        session.add(found)
    session.commit()
    return found


def arm(session: Session, *, now: datetime | None = None, job_id: str | None = None) -> int:
    """``waiting -> pending`` (due now) for every webhook whose job is terminal, or whose sweep has no job
    left that is not terminal. With ``job_id``, only the webhooks that job's end can arm (its own, its
    sweep's). Returns the number armed."""
    now = now or utcnow()
    job_done = exists().where(Job.id == Webhook.job_id, Job.status.in_(_TERMINAL))
    sweep_open = exists().where(Job.sweep_id == Webhook.sweep_id, Job.status.not_in(_TERMINAL))
    sweep_any = exists().where(Job.sweep_id == Webhook.sweep_id)
    ready = (and_(Webhook.job_id.is_not(None), job_done)
             | and_(Webhook.sweep_id.is_not(None), sweep_any, ~sweep_open))
    where = [Webhook.status == W.waiting.value, ready]
    if job_id is not None:
        sweep_of = select(Job.sweep_id).where(Job.id == job_id).scalar_subquery()
        where.append((Webhook.job_id == job_id) | (Webhook.sweep_id == sweep_of))
    n = session.execute(update(Webhook).where(*where).values(status=W.pending.value, next_attempt_at=now)
                        .execution_options(synchronize_session=False)).rowcount
    session.commit()
    return n


def claim_due(session: Session, *, now: datetime | None = None, lease_seconds: float = 60.0, limit: int = 50,
              job_id: str | None = None) -> list[Webhook]:
    """Pending webhooks due by ``now``, each taken for one attempt: ``attempts += 1`` and ``next_attempt_at``
    pushed ``lease_seconds`` ahead (so a deliverer that dies mid-attempt leaves it due again later). A row
    another process took first is skipped (compare-and-set on ``next_attempt_at``)."""
    now = now or utcnow()
    where = [Webhook.status == W.pending.value, Webhook.next_attempt_at <= now]
    if job_id is not None:
        sweep_of = select(Job.sweep_id).where(Job.id == job_id).scalar_subquery()
        where.append((Webhook.job_id == job_id) | (Webhook.sweep_id == sweep_of))
    due = session.execute(select(Webhook.id, Webhook.next_attempt_at).where(*where)
                          .order_by(Webhook.next_attempt_at).limit(limit)).all()
    taken: list[Webhook] = []
    for hook_id, at in due:
        n = session.execute(update(Webhook).where(Webhook.id == hook_id, Webhook.status == W.pending.value,
                                                  Webhook.next_attempt_at == at)
                            .values(attempts=Webhook.attempts + 1,
                                    next_attempt_at=now + timedelta(seconds=lease_seconds))
                            .execution_options(synchronize_session=False)).rowcount
        session.commit()
        if n == 1:
            taken.append(session.get(Webhook, hook_id, populate_existing=True))
    session.commit()
    return taken


def record_attempt(session: Session, hook: Webhook, *, status_code: int | None, error: str | None,
                   duration_ms: float, ok: bool, retry_at: datetime | None) -> Webhook:
    """Log the attempt (``webhook_deliveries``) and move the webhook: ``delivered`` when ``ok``, else
    ``pending`` again at ``retry_at``, or ``failed`` when ``retry_at`` is None. One transaction."""
    now = utcnow()
    session.add(WebhookDelivery(webhook_id=hook.id, attempt=hook.attempts, at=now, status_code=status_code,
                                error=error, duration_ms=duration_ms, ok=ok))
    if ok:
        values = {"status": W.delivered.value, "delivered_at": now, "next_attempt_at": None}
    elif retry_at is not None:
        values = {"status": W.pending.value, "next_attempt_at": retry_at}
    else:
        values = {"status": W.failed.value, "next_attempt_at": None}
    session.execute(update(Webhook).where(Webhook.id == hook.id).values(**values)
                    .execution_options(synchronize_session=False))
    session.commit()
    return session.get(Webhook, hook.id, populate_existing=True)


def webhooks_of(session: Session, *, job_id: str | None = None, sweep_id: str | None = None) -> list[Webhook]:
    """The webhooks of a job or a sweep, oldest first."""
    where = [Webhook.job_id == job_id] if job_id is not None else [Webhook.sweep_id == sweep_id]
    rows = list(session.execute(select(Webhook).where(*where).order_by(Webhook.created_at, Webhook.id)
                                .execution_options(populate_existing=True)).scalars())
    session.commit()
    return rows


def deliveries(session: Session, webhook_id: str) -> list[WebhookDelivery]:
    """Delivery attempts of a webhook, in order."""
    rows = list(session.execute(select(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook_id)
                                .order_by(WebhookDelivery.id)).scalars())
    session.commit()
    return rows
