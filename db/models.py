"""SQLAlchemy 2.0 models: the contract between ``api`` and ``worker`` (DESIGN.md §2).

Tables exist only through ``migrations/`` (Alembic); nothing here calls ``create_all``.
Ids are uuid4 hex strings; a job's id is also its Celery task id. Datetimes are timezone-aware UTC
(:class:`UTCDateTime` stores naive UTC on SQLite, ``timestamptz`` on PostgreSQL, and always returns
aware UTC values).
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text,
                        TypeDecorator, UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

try:  # Python >= 3.11
    from enum import StrEnum
except ImportError:  # pragma: no cover - Python 3.10
    class StrEnum(str, enum.Enum):  # type: ignore[no-redef]
        def __str__(self) -> str:
            return str(self.value)


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(timezone.utc)


def new_id() -> str:
    """A new uuid4 hex id (32 characters)."""
    return uuid.uuid4().hex


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend.

    Binds convert aware values to UTC (naive values are taken as UTC); results are always aware UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class JobKind(StrEnum):
    """What a job runs."""

    train = "train"  # one ensemble bundle of a sweep (ncengine.train.run)
    measure = "measure"  # NC metrics + bound of uploaded features (ncengine.metrics.measure)
    ufm = "ufm"  # unconstrained-features model optimisation (ncengine.ufm.optimize)


class JobStatus(StrEnum):
    """Job states (ours, never Celery's). Allowed transitions (each one function in ``db.jobs``)::

        queued    -> running (claim) | canceled (request_cancel)
        retrying  -> running (claim) | canceled (request_cancel)
        running   -> succeeded | failed | cancelling (request_cancel) | canceled (mark_canceled)
                     | retrying (release_for_retry) | running (claim after the lease expired)
        cancelling-> canceled (mark_canceled, expire_cancelling) | succeeded | failed
    """

    queued = "queued"  # row written, task sent, not yet claimed
    running = "running"  # claimed by a worker that holds the lease
    succeeded = "succeeded"  # terminal: result stored
    failed = "failed"  # terminal: error_code / error_message stored
    cancelling = "cancelling"  # cancel requested while running; the worker stops at the next epoch
    canceled = "canceled"  # terminal
    retrying = "retrying"  # released by a worker after a recoverable error; will be claimed again


TERMINAL = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.canceled})
ACTIVE = frozenset({JobStatus.running, JobStatus.cancelling})  # a worker holds the lease
WAITING = frozenset({JobStatus.queued, JobStatus.retrying})  # waiting for a worker

TASK_NAMES: dict[str, str] = {"train": "ncs.train_bundle", "measure": "ncs.measure", "ufm": "ncs.ufm"}
QUEUES: dict[str, str] = {"train": "gpu", "ufm": "cpu", "measure": "cpu"}


class ArtifactKind(StrEnum):
    upload = "upload"
    checkpoint = "checkpoint"
    figure = "figure"


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, Any: JSON}


class Sweep(Base):
    __tablename__ = "sweeps"
    __table_args__ = (
        # serves the Idempotency-Key lookup in create_sweep
        UniqueConstraint("owner", "idempotency_key", name="uq_sweeps_owner_idempotency_key"),
        # serves list_sweeps' keyset pagination
        Index("ix_sweeps_created_at_id", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str | None] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(200))
    preset: Mapped[str | None] = mapped_column(String(100))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key", name="uq_jobs_owner_idempotency_key"),
        Index("ix_jobs_created_at_id", "created_at", "id"),  # list_jobs keyset pagination
        Index("ix_jobs_status_lease_expires_at", "status", "lease_expires_at"),  # find_orphans
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    sweep_id: Mapped[str | None] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # JobKind
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.queued.value)  # JobStatus
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    progress_epoch: Mapped[int | None] = mapped_column(Integer)
    progress_total: Mapped[int | None] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker_host: Mapped[str | None] = mapped_column(String(200))
    device: Mapped[str | None] = mapped_column(String(64))
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # when the task message was last sent (create or reconciler), and how many times: the reconciler
    # re-sends a waiting job with exponential back-off so a long queue is not flooded with duplicates
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    sends: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    version: Mapped[int] = mapped_column(Integer, default=1)  # bumped by every write; the ETag
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    owner: Mapped[str | None] = mapped_column(String(64), index=True)
    request_hash: Mapped[str | None] = mapped_column(String(128))

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL


class JobEvent(Base):
    """Append-only log of job transitions."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16))
    code: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


METRIC_SCALARS = ("train_loss", "train_accuracy", "intra_cos_min", "inter_cos_max", "nc1", "ncc_accuracy")


class MetricPoint(Base):
    __tablename__ = "metric_points"
    __table_args__ = (
        UniqueConstraint("job_id", "run_index", "epoch", "layer", name="uq_metric_points_job_run_epoch_layer"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    run_index: Mapped[int] = mapped_column(Integer, default=0)
    epoch: Mapped[int] = mapped_column(Integer)
    layer: Mapped[int] = mapped_column(Integer, default=-1)  # -1 = last layer / not applicable
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    train_loss: Mapped[float | None] = mapped_column(Float)
    train_accuracy: Mapped[float | None] = mapped_column(Float)
    intra_cos_min: Mapped[float | None] = mapped_column(Float)
    inter_cos_max: Mapped[float | None] = mapped_column(Float)
    nc1: Mapped[float | None] = mapped_column(Float)
    ncc_accuracy: Mapped[float | None] = mapped_column(Float)


class BoundRecord(Base):
    __tablename__ = "bound_records"
    __table_args__ = (UniqueConstraint("job_id", "run_index", "epoch", name="uq_bound_records_job_run_epoch"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    run_index: Mapped[int] = mapped_column(Integer, default=0)
    epoch: Mapped[int] = mapped_column(Integer)
    block: Mapped[dict[str, Any]] = mapped_column(JSON)


class Artifact(Base):
    __tablename__ = "artifacts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str | None] = mapped_column(String(64), index=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # ArtifactKind
    name: Mapped[str] = mapped_column(String(300))
    path: Mapped[str] = mapped_column(Text)
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ApiKey(Base):
    """An API key (issue 7). Only the sha256 of the token is stored; the token is shown once, at creation.

    ``id`` is the owner id written on the sweeps, jobs and artifacts the key creates. An ``admin`` key sees
    every row. A revoked key (``revoked_at`` set) authenticates nobody.
    """

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # authenticate(): lookup by hash
    prefix: Mapped[str] = mapped_column(String(16))  # first characters of the token, to recognise it in lists
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


# Idempotency keys of the anonymous admin (owner NULL, auth off on loopback): UNIQUE(owner, idempotency_key)
# treats NULLs as distinct, so racing retries without an API key would each insert a row. These partial unique
# indexes (SQLite and PostgreSQL) make the key unique among owner-less rows too (migration 0002).
Index("uq_jobs_idempotency_key_no_owner", Job.idempotency_key, unique=True,
      sqlite_where=Job.owner.is_(None), postgresql_where=Job.owner.is_(None))
Index("uq_sweeps_idempotency_key_no_owner", Sweep.idempotency_key, unique=True,
      sqlite_where=Sweep.owner.is_(None), postgresql_where=Sweep.owner.is_(None))


# ------------------------------------------------------------------------------- webhooks (issue 8)

class WebhookStatus(StrEnum):
    """State of one webhook: ``waiting`` (its job/sweep has not ended) -> ``pending`` (due for an attempt)
    -> ``delivered`` (a 2xx answer) | ``failed`` (attempts exhausted, or a 4xx answer that retrying won't fix)."""

    waiting = "waiting"
    pending = "pending"
    delivered = "delivered"
    failed = "failed"


class Webhook(Base):
    """A ``callback_url`` given with ``POST /jobs`` (``job.finished``) or ``POST /sweeps`` (``sweep.finished``):
    POSTed once when the job / every job of the sweep is terminal, retried with back-off."""

    __tablename__ = "webhooks"
    __table_args__ = (
        Index("ix_webhooks_status_next_attempt_at", "status", "next_attempt_at"),  # due_webhooks
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str | None] = mapped_column(String(64), index=True)  # API key id: its secret signs the body
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    sweep_id: Mapped[str | None] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"), index=True)
    event: Mapped[str] = mapped_column(String(32))  # job.finished | sweep.finished
    url: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=WebhookStatus.waiting.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class WebhookDelivery(Base):
    """Append-only log of delivery attempts of a webhook."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    webhook_id: Mapped[str] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    status_code: Mapped[int | None] = mapped_column(Integer)  # None: no answer (refused, timeout)
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[float] = mapped_column(Float, default=0.0)
    ok: Mapped[bool] = mapped_column(Boolean, default=False)
