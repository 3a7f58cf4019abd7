"""Job state machine and queries: one function per transition (DESIGN.md §2, "Job states").

Every transition is a conditional UPDATE whose WHERE clause names the allowed source states (and, for a
worker's writes, the lease holder). It bumps ``version`` (the ETag) and inserts the :class:`JobEvent` in
the same transaction; zero rows raises :class:`TransitionRejected` (or :class:`LeaseLost`). Each function
takes a :class:`Session`, owns its transaction and commits. A retried call whose first commit already
landed (same worker, job already in the target state) returns the job instead of raising.

Enqueue happens after the row committed; callers do::

    job = create_job(session, kind="measure", config=...)
    celery.send_task(TASK_NAMES[job.kind], args=[job.id], task_id=job.id, queue=QUEUES[job.kind])
    mark_enqueued(session, job.id)      # optional: lets the reconciler back off
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.errors import IdempotencyConflict, InvalidCursor, LeaseLost, NotFound, TransitionRejected
from db.models import (ACTIVE, METRIC_SCALARS, TERMINAL, WAITING, Artifact, BoundRecord, Job, JobEvent,
                       JobKind, JobStatus, MetricPoint, Sweep, new_id, utcnow)

S = JobStatus


# ----------------------------------------------------------------------------------------------- helpers

def jsonable(value: Any) -> Any:
    """Convert ``value`` to plain JSON: numpy/torch scalars and arrays via ``tolist()``/``item()``,
    tuples to lists, and non-finite floats (NaN, inf) to ``None`` (strict JSON, which PostgreSQL needs)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "tolist"):  # numpy array / scalar, torch tensor
        return jsonable(value.tolist())
    if hasattr(value, "item"):
        return jsonable(value.item())
    if hasattr(value, "model_dump"):  # pydantic model
        return jsonable(value.model_dump(mode="json"))
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _event(session: Session, job_id: str, status: str, code: str | None = None, reason: str | None = None,
           at: datetime | None = None) -> None:
    session.add(JobEvent(job_id=job_id, status=str(status), code=code, reason=reason, at=at or utcnow()))


def _current(session: Session, job_id: str) -> Job | None:
    return session.execute(
        select(Job).where(Job.id == job_id).execution_options(populate_existing=True)).scalar_one_or_none()


def _transition(session: Session, job_id: str, *, to: JobStatus, allowed: Iterable[JobStatus], values: dict,
                worker: str | None = None, extra_where: Sequence = (), code: str | None = None,
                reason: str | None = None) -> Job | None:
    """Run one guarded UPDATE + event in the caller's open transaction; return the fresh row or None."""
    where = [Job.id == job_id, Job.status.in_([str(s) for s in allowed]), *extra_where]
    if worker is not None:
        where.append(Job.lease_owner == worker)
    res = session.execute(update(Job).where(*where)
                          .values(status=str(to), version=Job.version + 1, **values)
                          .execution_options(synchronize_session=False))
    if res.rowcount != 1:
        return None
    _event(session, job_id, to, code, reason)
    session.flush()
    return _current(session, job_id)


def _commit_or_reject(session: Session, job: Job | None, job_id: str, wanted: JobStatus, *,
                      worker: str | None = None) -> Job:
    if job is not None:
        session.commit()
        return job
    cur = _current(session, job_id)
    session.rollback()
    if cur is None:
        raise NotFound("job", job_id)
    if cur.status == wanted and (worker is None or cur.lease_owner == worker):
        return cur  # an idempotent retry of a call whose commit already landed
    raise TransitionRejected(job_id, cur.status, str(wanted))


# --------------------------------------------------------------------------------------------- creation

def _find_by_key(session: Session, model, owner: str | None, key: str):
    own = model.owner.is_(None) if owner is None else model.owner == owner
    return session.execute(select(model).where(own, model.idempotency_key == key)).scalar_one_or_none()


def create_job(session: Session, *, kind: str, config: dict, owner: str | None = None,
               sweep_id: str | None = None, idempotency_key: str | None = None,
               request_hash: str | None = None) -> Job:
    """Insert a queued job and commit. Enqueue it only after this returns.

    With ``idempotency_key``: if ``(owner, idempotency_key)`` exists with the same ``request_hash`` the
    existing job is returned (no new row); a different hash raises :class:`IdempotencyConflict`.

    Raises:
        ValueError: unknown ``kind``.
    """
    kind = JobKind(kind).value
    if idempotency_key is not None:
        found = _find_by_key(session, Job, owner, idempotency_key)
        if found is not None:
            session.rollback()
            if found.request_hash != request_hash:
                raise IdempotencyConflict(idempotency_key)
            return found
    now = utcnow()
    job = Job(id=new_id(), kind=kind, status=S.queued.value, config=jsonable(config), owner=owner,
              sweep_id=sweep_id, idempotency_key=idempotency_key, request_hash=request_hash, created_at=now,
              attempts=0, version=1, cancel_requested=False, sends=0)
    session.add(job)
    _event(session, job.id, S.queued, at=now)
    try:
        session.commit()
    except IntegrityError:  # a concurrent request with the same key won the race
        session.rollback()
        if idempotency_key is None:
            raise
        found = _find_by_key(session, Job, owner, idempotency_key)
        session.rollback()
        if found is None:
            raise
        if found.request_hash != request_hash:
            raise IdempotencyConflict(idempotency_key) from None
        return found
    return job


def create_sweep(session: Session, *, name: str, preset: str | None, spec: dict, bundles: list[dict],
                 owner: str | None = None, idempotency_key: str | None = None,
                 request_hash: str | None = None) -> tuple[Sweep, list[Job]]:
    """Insert a sweep and one queued ``train`` job per bundle (``config = bundle``, e.g.
    ``{"runs": [RunConfig json, ...]}``), all in one transaction. Idempotency as in :func:`create_job`."""
    if idempotency_key is not None:
        found = _find_by_key(session, Sweep, owner, idempotency_key)
        if found is not None:
            jobs = sweep_jobs(session, found.id)
            session.rollback()
            if found.request_hash != request_hash:
                raise IdempotencyConflict(idempotency_key)
            return found, jobs
    now = utcnow()
    sweep = Sweep(id=new_id(), owner=owner, name=name, preset=preset, spec=jsonable(spec),
                  idempotency_key=idempotency_key, request_hash=request_hash, created_at=now)
    # a racing retry with the same Idempotency-Key fails on the unique key at the first flush or at commit
    try:
        session.add(sweep)
        session.flush()
        jobs = []
        for i, bundle in enumerate(bundles):
            # created_at strictly increasing keeps the bundle order under (created_at, id) pagination
            job = Job(id=new_id(), kind=JobKind.train.value, status=S.queued.value, config=jsonable(bundle),
                      owner=owner, sweep_id=sweep.id, created_at=now + timedelta(microseconds=i), attempts=0,
                      version=1, cancel_requested=False, sends=0)
            session.add(job)
            jobs.append(job)
        session.flush()
        for job in jobs:
            _event(session, job.id, S.queued, at=job.created_at)
        session.commit()
    except IntegrityError:
        session.rollback()
        if idempotency_key is None:
            raise
        found = _find_by_key(session, Sweep, owner, idempotency_key)
        if found is None:
            raise
        jobs = sweep_jobs(session, found.id)
        session.rollback()
        if found.request_hash != request_hash:
            raise IdempotencyConflict(idempotency_key) from None
        return found, jobs
    return sweep, jobs


def mark_enqueued(session: Session, job_id: str, *, now: datetime | None = None) -> None:
    """Record that the task message was (re)sent: ``enqueued_at = now``, ``sends += 1``. Not a transition
    and not visible to clients, so ``version`` is left alone."""
    session.execute(update(Job).where(Job.id == job_id)
                    .values(enqueued_at=now or utcnow(), sends=Job.sends + 1)
                    .execution_options(synchronize_session=False))
    session.commit()


# ---------------------------------------------------------------------------------------------- queries

def _owned(model, owner: str | None):
    return [] if owner is None else [model.owner == owner]


def _get_owned(session: Session, model, entity: str, row_id: str, owner: str | None):
    row = session.execute(select(model).where(model.id == row_id, *_owned(model, owner))
                          .execution_options(populate_existing=True)).scalar_one_or_none()
    session.commit()
    if row is None:
        raise NotFound(entity, row_id)
    return row


def get_job(session: Session, job_id: str, owner: str | None = None) -> Job:
    """The job; :class:`NotFound` if missing or owned by another owner (``owner=None``: admin, sees all)."""
    return _get_owned(session, Job, "job", job_id, owner)


def job_etag(session: Session, job_id: str, owner: str | None = None) -> tuple[int, str]:
    """``(version, status)`` of a job: one primary-key lookup of two columns, no row object (the 304 path of
    ``GET /jobs/{id}``). :class:`NotFound` as in :func:`get_job`."""
    row = session.execute(select(Job.version, Job.status).where(Job.id == job_id, *_owned(Job, owner))).first()
    session.commit()
    if row is None:
        raise NotFound("job", job_id)
    return int(row[0]), str(row[1])


def cancel_requested(session: Session, job_id: str) -> bool:
    """The job's cancel flag (one primary-key lookup of one column; False for a missing job). The worker reads
    it every epoch that does not write progress (:func:`report_progress` returns it on the others)."""
    flag = session.execute(select(Job.cancel_requested).where(Job.id == job_id)).scalar_one_or_none()
    session.commit()
    return bool(flag)


def _latest_per_run(session: Session, model: Any, job_id: str, *order: Any) -> list[Any]:
    """Rows of ``model`` (``MetricPoint`` / ``BoundRecord``) of the job at each run's latest recorded epoch."""
    last = (select(model.run_index, func.max(model.epoch).label("epoch"))
            .where(model.job_id == job_id).group_by(model.run_index).subquery())
    rows = list(session.execute(
        select(model).join(last, and_(model.run_index == last.c.run_index, model.epoch == last.c.epoch))
        .where(model.job_id == job_id).order_by(*order)).scalars())
    session.commit()
    return rows


def latest_bounds(session: Session, job_id: str) -> list[BoundRecord]:
    """For each run of the job, its bound block at the latest recorded epoch (ordered by run)."""
    return _latest_per_run(session, BoundRecord, job_id, BoundRecord.run_index)


def get_sweep(session: Session, sweep_id: str, owner: str | None = None) -> Sweep:
    """The sweep; :class:`NotFound` as in :func:`get_job`."""
    return _get_owned(session, Sweep, "sweep", sweep_id, owner)


def sweep_jobs(session: Session, sweep_id: str) -> list[Job]:
    """The sweep's jobs in bundle order."""
    jobs = list(session.execute(select(Job).where(Job.sweep_id == sweep_id)
                                .order_by(Job.created_at, Job.id)
                                .execution_options(populate_existing=True)).scalars())
    session.commit()
    return jobs


def encode_cursor(created_at: datetime, id: str) -> str:  # noqa: A002
    raw = f"{created_at.isoformat()}|{id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Inverse of :func:`encode_cursor`; :class:`InvalidCursor` for anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        ts, id_ = raw.split("|", 1)
        at = datetime.fromisoformat(ts)
        if at.tzinfo is None or not id_:
            raise ValueError(raw)
        return at, id_
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidCursor(cursor) from exc


def _page(session: Session, model, where: list, cursor: str | None, limit: int):
    if limit < 1:
        raise ValueError("limit must be >= 1")
    if cursor is not None:
        at, id_ = decode_cursor(cursor)
        where.append(or_(model.created_at < at, and_(model.created_at == at, model.id < id_)))
    rows = list(session.execute(select(model).where(*where)
                                .order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)
                                .execution_options(populate_existing=True)).scalars())
    session.commit()
    nxt = None
    if len(rows) > limit:
        rows = rows[:limit]
        nxt = encode_cursor(rows[-1].created_at, rows[-1].id)
    return rows, nxt


def list_jobs(session: Session, *, owner: str | None = None, status: str | Sequence[str] | None = None,
              kind: str | None = None, sweep_id: str | None = None, cursor: str | None = None,
              limit: int = 50) -> tuple[list[Job], str | None]:
    """Jobs newest first, keyset-paginated on ``(created_at, id)``.

    Returns:
        ``(items, next_cursor)``; ``next_cursor`` is None on the last page. Pass it back as ``cursor``.

    Raises:
        InvalidCursor: ``cursor`` was not produced by this function.
    """
    where = _owned(Job, owner)
    if status is not None:
        where.append(Job.status.in_([status] if isinstance(status, str) else list(status)))
    if kind is not None:
        where.append(Job.kind == str(kind))
    if sweep_id is not None:
        where.append(Job.sweep_id == sweep_id)
    return _page(session, Job, where, cursor, limit)


def list_sweeps(session: Session, *, owner: str | None = None, cursor: str | None = None,
                limit: int = 50) -> tuple[list[Sweep], str | None]:
    """Sweeps newest first, paginated like :func:`list_jobs`."""
    return _page(session, Sweep, _owned(Sweep, owner), cursor, limit)


def job_events(session: Session, job_id: str) -> list[JobEvent]:
    """The job's transitions, oldest first."""
    rows = list(session.execute(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).scalars())
    session.commit()
    return rows


def metric_history(session: Session, job_id: str, *, run_index: int | None = None,
                   layer: int | None = None) -> list[MetricPoint]:
    """Metric points ordered by ``(run_index, epoch, layer)``."""
    where = [MetricPoint.job_id == job_id]
    if run_index is not None:
        where.append(MetricPoint.run_index == run_index)
    if layer is not None:
        where.append(MetricPoint.layer == layer)
    rows = list(session.execute(select(MetricPoint).where(*where).order_by(
        MetricPoint.run_index, MetricPoint.epoch, MetricPoint.layer)).scalars())
    session.commit()
    return rows


def latest_metrics(session: Session, job_id: str) -> list[MetricPoint]:
    """For each run of the job, its points at the latest recorded epoch (all layers)."""
    return _latest_per_run(session, MetricPoint, job_id, MetricPoint.run_index, MetricPoint.layer)


def bound_history(session: Session, job_id: str, *, run_index: int | None = None) -> list[BoundRecord]:
    """Bound blocks ordered by ``(run_index, epoch)``."""
    where = [BoundRecord.job_id == job_id]
    if run_index is not None:
        where.append(BoundRecord.run_index == run_index)
    rows = list(session.execute(select(BoundRecord).where(*where)
                                .order_by(BoundRecord.run_index, BoundRecord.epoch)).scalars())
    session.commit()
    return rows


# ---------------------------------------------------------------------------------- client transitions

def _cancel_transition(session: Session, job_id: str, own: list) -> Job | None:
    """The cancel of one job in the caller's open transaction (no commit): ``queued|retrying -> canceled``,
    else ``running -> cancelling`` (``cancel_requested``, the worker stops at its next epoch). Returns the
    fresh row, or None when neither applied (missing, not matching ``own``, already cancelling, or ended)."""
    job = _transition(session, job_id, to=S.canceled, allowed=WAITING, extra_where=own,
                      reason="cancel requested", values=dict(cancel_requested=True, finished_at=utcnow(),
                                                             lease_owner=None, lease_expires_at=None))
    if job is None:
        job = _transition(session, job_id, to=S.cancelling, allowed=[S.running], extra_where=own,
                          reason="cancel requested", values=dict(cancel_requested=True))
    return job


def request_cancel(session: Session, job_id: str, owner: str | None = None) -> Job:
    """Cancel a job: ``queued|retrying -> canceled``; ``running -> cancelling`` (``cancel_requested``, the
    worker stops at its next epoch); ``cancelling|canceled``: returned unchanged (idempotent).

    Raises:
        NotFound: missing or another owner's job.
        TransitionRejected: the job already succeeded or failed (the API answers 409).
    """
    own = _owned(Job, owner)
    job = _cancel_transition(session, job_id, own)
    if job is not None:
        session.commit()
        return job
    cur = session.execute(select(Job).where(Job.id == job_id, *own)
                          .execution_options(populate_existing=True)).scalar_one_or_none()
    session.rollback()
    if cur is None:
        raise NotFound("job", job_id)
    if cur.status in (S.cancelling, S.canceled):
        return cur
    raise TransitionRejected(job_id, cur.status, S.canceled.value)


def request_cancel_sweep(session: Session, sweep_id: str,
                         owner: str | None = None) -> tuple[Sweep, list[Job]]:
    """Cancel every job of a sweep that has not ended, each as :func:`request_cancel` does, in one
    transaction: ``queued|retrying -> canceled``, ``running -> cancelling``. Jobs already ``cancelling`` or
    ended (``succeeded|failed|canceled``, also one that ends meanwhile) are left as they are, so canceling
    again changes nothing (idempotent).

    Returns:
        ``(sweep, jobs)``: the sweep and all its jobs in bundle order, as they are after the cancel.

    Raises:
        NotFound: missing or another owner's sweep (``owner=None``: admin, sees all).
    """
    sweep = get_sweep(session, sweep_id, owner=owner)
    own = _owned(Job, owner)
    cancelable = [s.value for s in (*WAITING, S.running)]
    job_ids = list(session.execute(select(Job.id).where(Job.sweep_id == sweep.id, Job.status.in_(cancelable),
                                                        *own).order_by(Job.created_at, Job.id)).scalars())
    for job_id in job_ids:
        _cancel_transition(session, job_id, own)  # None: it ended (or went cancelling) since the SELECT
    session.commit()
    return sweep, sweep_jobs(session, sweep.id)


# ---------------------------------------------------------------------------------- worker transitions

def claim(session: Session, job_id: str, *, worker: str, lease_seconds: float, device: str | None = None,
          worker_host: str | None = None, now: datetime | None = None) -> Job | None:
    """Take the job (compare-and-set): ``queued|retrying -> running``, or ``running`` whose lease expired
    (its worker died) ``-> running`` under the new worker. ``attempts += 1``, ``lease_owner = worker``.

    Returns:
        The claimed job, or None when another worker holds a live lease, the job is cancelling, terminal,
        or missing: the caller then drops the (duplicate) message.
    """
    now = now or utcnow()
    job = _transition(
        session, job_id, to=S.running, allowed=[*WAITING, S.running],
        extra_where=[or_(Job.status.in_([s.value for s in WAITING]), Job.lease_expires_at < now)],
        reason=f"claimed by {worker}",
        values=dict(attempts=Job.attempts + 1, lease_owner=worker,
                    lease_expires_at=now + timedelta(seconds=lease_seconds), heartbeat_at=now,
                    started_at=func.coalesce(Job.started_at, now), device=device,
                    worker_host=worker_host or worker.rsplit("@", 1)[-1], error_code=None, error_message=None))
    if job is None:
        session.rollback()
        return None
    session.commit()
    return job


def heartbeat(session: Session, job_id: str, *, worker: str, lease_seconds: float,
              now: datetime | None = None) -> bool:
    """Renew the lease. Returns ``cancel_requested`` (stop at the next epoch when True).

    Raises:
        LeaseLost: ``worker`` no longer holds the job (another worker claimed it, or it is terminal).
    """
    now = now or utcnow()
    res = session.execute(
        update(Job).where(Job.id == job_id, Job.lease_owner == worker, Job.status.in_([s.value for s in ACTIVE]))
        .values(heartbeat_at=now, lease_expires_at=now + timedelta(seconds=lease_seconds), version=Job.version + 1)
        .returning(Job.cancel_requested).execution_options(synchronize_session=False))
    row = res.first()
    if row is None:
        session.rollback()
        raise LeaseLost(job_id)
    session.commit()
    return bool(row[0])


def report_progress(session: Session, job_id: str, *, worker: str, epoch: int, total: int) -> bool:
    """Store ``progress_epoch/progress_total``; returns ``cancel_requested`` (so the worker checks the cancel
    flag every epoch at no extra query). Raises :class:`LeaseLost` as :func:`heartbeat`."""
    row = session.execute(
        update(Job).where(Job.id == job_id, Job.lease_owner == worker, Job.status.in_([s.value for s in ACTIVE]))
        .values(progress_epoch=int(epoch), progress_total=int(total), version=Job.version + 1)
        .returning(Job.cancel_requested).execution_options(synchronize_session=False)).first()
    if row is None:
        session.rollback()
        raise LeaseLost(job_id)
    session.commit()
    return bool(row[0])


def _upsert_ignore(session: Session, model, rows: list[dict], keys: list[str], *, job_id: str) -> int:
    """Insert ``rows``, skipping existing ``keys``; when any row was new, bump the job's ``version`` in the same
    transaction (the ETag of ``GET /jobs/{id}`` covers its latest metrics and bounds, so a poller holding the
    old ETag gets the new points instead of a 304)."""
    if not rows:
        return 0
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        stmt = pg_insert(model).values(rows).on_conflict_do_nothing(index_elements=keys)
    elif dialect == "sqlite":
        stmt = sqlite_insert(model).values(rows).on_conflict_do_nothing(index_elements=keys)
    else:  # pragma: no cover - only SQLite and PostgreSQL are supported
        raise NotImplementedError(dialect)
    inserted = len(session.execute(stmt.returning(model.id)).all())
    if inserted:
        session.execute(update(Job).where(Job.id == job_id).values(version=Job.version + 1)
                        .execution_options(synchronize_session=False))
    session.commit()
    return inserted


def add_metric_points(session: Session, job_id: str, points: list[dict]) -> int:
    """Insert metric points; a point whose ``(run_index, epoch, layer)`` exists is skipped (a re-run epoch
    after a crash does not duplicate). Each point: ``{"run_index": int=0, "epoch": int, "layer": int=-1,
    "metrics": {...}}`` or a flat history dict (``epoch``, ``layer``, metric keys...). The scalar columns
    (``train_loss, train_accuracy, intra_cos_min, inter_cos_max, nc1, ncc_accuracy``) are copied from the
    metrics. Returns the number of rows inserted."""
    rows = []
    for p in points:
        metrics = p.get("metrics")
        if metrics is None:
            metrics = {k: v for k, v in p.items() if k not in ("run_index", "epoch", "layer", "bounds")}
        metrics = jsonable(metrics)
        layer = p.get("layer")
        row = dict(job_id=job_id, run_index=int(p.get("run_index", 0)), epoch=int(p["epoch"]),
                   layer=-1 if layer is None else int(layer), metrics=metrics)
        for key in METRIC_SCALARS:
            v = metrics.get(key)
            row[key] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
        rows.append(row)
    return _upsert_ignore(session, MetricPoint, rows, ["job_id", "run_index", "epoch", "layer"], job_id=job_id)


def add_bounds(session: Session, job_id: str, records: list[dict]) -> int:
    """Insert bound blocks ``{"run_index": int=0, "epoch": int, "block": {...}}``; existing
    ``(run_index, epoch)`` are skipped. Returns the number of rows inserted."""
    rows = [dict(job_id=job_id, run_index=int(r.get("run_index", 0)), epoch=int(r["epoch"]),
                 block=jsonable(r["block"])) for r in records]
    return _upsert_ignore(session, BoundRecord, rows, ["job_id", "run_index", "epoch"], job_id=job_id)


def succeed(session: Session, job_id: str, *, worker: str, result: dict) -> Job:
    """``running|cancelling -> succeeded`` with ``result`` (a run that finished before it saw the cancel
    flag keeps its result). Raises :class:`TransitionRejected` when ``worker`` does not hold the lease."""
    now = utcnow()
    job = _transition(session, job_id, to=S.succeeded, allowed=ACTIVE, worker=worker,
                      values=dict(result=jsonable(result), finished_at=now, lease_expires_at=None))
    return _commit_or_reject(session, job, job_id, S.succeeded, worker=worker)


def fail(session: Session, job_id: str, *, worker: str, code: str, message: str) -> Job:
    """``running|cancelling -> failed`` with ``error_code``/``error_message``."""
    now = utcnow()
    job = _transition(session, job_id, to=S.failed, allowed=ACTIVE, worker=worker, code=code, reason=message,
                      values=dict(error_code=code, error_message=message, finished_at=now, lease_expires_at=None))
    return _commit_or_reject(session, job, job_id, S.failed, worker=worker)


def mark_canceled(session: Session, job_id: str, *, worker: str) -> Job:
    """``cancelling|running -> canceled``: the worker saw the cancel flag and stopped."""
    now = utcnow()
    job = _transition(session, job_id, to=S.canceled, allowed=ACTIVE, worker=worker, reason="stopped by worker",
                      values=dict(finished_at=now, lease_expires_at=None))
    return _commit_or_reject(session, job, job_id, S.canceled, worker=worker)


def release_for_retry(session: Session, job_id: str, *, worker: str, code: str, message: str) -> Job:
    """``running -> retrying`` after a recoverable error; the lease is dropped so any worker may claim it
    again. A ``cancelling`` job is not retried (it becomes ``canceled``)."""
    job = _transition(session, job_id, to=S.retrying, allowed=[S.running], worker=worker, code=code,
                      reason=message, values=dict(error_code=code, error_message=message, lease_owner=None,
                                                  lease_expires_at=None, enqueued_at=None))
    if job is None:
        job = _transition(session, job_id, to=S.canceled, allowed=[S.cancelling], worker=worker,
                          reason="canceled instead of retried", values=dict(finished_at=utcnow(),
                                                                          lease_expires_at=None))
    if job is not None:
        session.commit()
        return job
    cur = _current(session, job_id)
    session.rollback()
    if cur is None:
        raise NotFound("job", job_id)
    if cur.status == S.retrying:
        return cur
    raise TransitionRejected(job_id, cur.status, S.retrying.value)


# ---------------------------------------------------------------------------------------- reconciler

def find_orphans(session: Session, *, now: datetime | None = None,
                 requeue_after_seconds: float) -> list[Job]:
    """Jobs the reconciler must act on:

    - ``queued|retrying`` whose message was last sent (``enqueued_at``, else ``created_at``) longer ago than
      ``requeue_after_seconds * 2**min(sends - 1, 6)`` (exponential back-off, so a long but healthy queue
      is not flooded with duplicates; duplicates are harmless, :func:`claim` drops them);
    - ``retrying`` with no message out (``enqueued_at`` cleared by :func:`release_for_retry` and not re-sent by
      the worker, e.g. one that stopped mid-run): at once, so a restarted service resumes it without delay;
    - ``running|cancelling`` whose lease expired (the worker died or hung).
    """
    now = now or utcnow()
    waiting = list(session.execute(select(Job).where(Job.status.in_([s.value for s in WAITING]))
                                   .order_by(Job.created_at, Job.id)
                                   .execution_options(populate_existing=True)).scalars())
    expired = list(session.execute(select(Job).where(Job.status.in_([s.value for s in ACTIVE]),
                                                     Job.lease_expires_at < now)
                                   .order_by(Job.created_at, Job.id)
                                   .execution_options(populate_existing=True)).scalars())
    session.commit()
    out = []
    for job in waiting:
        if job.status == S.retrying and job.enqueued_at is None:
            out.append(job)
            continue
        last = job.enqueued_at or job.created_at
        wait = requeue_after_seconds * 2 ** min(max(job.sends - 1, 0), 6)
        if (now - last).total_seconds() >= wait:
            out.append(job)
    return out + expired


def expire_cancelling(session: Session, job_id: str, *, now: datetime | None = None) -> Job:
    """``cancelling`` whose lease expired ``-> canceled`` (the worker died while stopping)."""
    now = now or utcnow()
    job = _transition(session, job_id, to=S.canceled, allowed=[S.cancelling], extra_where=[Job.lease_expires_at < now],
                      code="lease_expired", reason="worker lost while cancelling",
                      values=dict(finished_at=now, lease_expires_at=None))
    return _commit_or_reject(session, job, job_id, S.canceled)


def fail_orphan(session: Session, job_id: str, *, code: str, message: str, now: datetime | None = None) -> Job:
    """``running|cancelling`` with an expired lease ``-> failed`` (the reconciler gives up after
    ``max_attempts``). Rejected if a worker renewed the lease meanwhile."""
    now = now or utcnow()
    job = _transition(session, job_id, to=S.failed, allowed=ACTIVE, extra_where=[Job.lease_expires_at < now],
                      code=code, reason=message, values=dict(error_code=code, error_message=message,
                                                             finished_at=now, lease_expires_at=None))
    return _commit_or_reject(session, job, job_id, S.failed)


# ----------------------------------------------------------------------------------------- artifacts

def create_artifact(session: Session, *, kind: str, name: str, path: str, bytes: int, sha256: str,  # noqa: A002
                    owner: str | None = None, job_id: str | None = None) -> Artifact:
    """Record a file (``upload | checkpoint | figure``) and commit."""
    from db.models import ArtifactKind

    art = Artifact(id=new_id(), owner=owner, job_id=job_id, kind=ArtifactKind(kind).value, name=name,
                   path=str(path), bytes=int(bytes), sha256=sha256, created_at=utcnow())
    session.add(art)
    session.commit()
    return art


def list_artifacts(session: Session, *, job_id: str | None = None, owner: str | None = None,
                   kind: str | None = None) -> list[Artifact]:
    """Artifacts, oldest first, filtered by job / owner / kind."""
    where = _owned(Artifact, owner)
    if job_id is not None:
        where.append(Artifact.job_id == job_id)
    if kind is not None:
        where.append(Artifact.kind == str(kind))
    rows = list(session.execute(select(Artifact).where(*where).order_by(Artifact.created_at, Artifact.id)).scalars())
    session.commit()
    return rows


__all__ = [
    "TERMINAL", "add_bounds", "add_metric_points", "bound_history", "claim", "create_artifact", "create_job",
    "create_sweep", "decode_cursor", "encode_cursor", "expire_cancelling", "fail", "fail_orphan", "find_orphans",
    "get_job", "get_sweep", "heartbeat", "job_events", "jsonable", "latest_metrics", "list_artifacts", "list_jobs",
    "list_sweeps", "mark_canceled", "mark_enqueued", "metric_history", "release_for_retry", "report_progress",
    "request_cancel", "request_cancel_sweep", "succeed", "sweep_jobs",
]
