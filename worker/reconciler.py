"""Reconciler: re-sends jobs that were never claimed and jobs whose lease expired (DESIGN.md §2).

A lost message (broker restart, the filesystem transport's consumer killed before ack, a failed send after
commit) leaves a job ``queued``; a killed or hung worker leaves it ``running`` with a lease that stops
being renewed. :func:`reconcile_once` finds both through :func:`db.jobs.find_orphans` and:

- re-sends waiting jobs and jobs whose lease expired (the next claim takes them over; training resumes
  from its checkpoint), with exponential back-off between re-sends of the same waiting job;
- fails a job whose lease expired after ``max_attempts`` claims (``error_code="lease_expired"``);
- finishes a ``cancelling`` job whose worker died (``-> canceled``).

Duplicates are harmless: a worker's claim is a compare-and-set, so a job never runs twice at once.
Where it runs: inside ``ncservice serve`` (embedded) and ``ncservice api`` (unless ``--no-reconciler``), or
alone as ``ncservice reconciler``. Several at once are safe.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime

from sqlalchemy.orm import Session, sessionmaker

from db import jobs as dbjobs
from db.errors import DBError
from db.models import JobStatus, utcnow
from ncservice.settings import Settings

log = logging.getLogger("ncservice.reconciler")

Send = Callable[[str, str], None]  # send(job_id, kind)


def reconcile_once(sm: sessionmaker[Session], send: Send, settings: Settings,
                   now: datetime | None = None) -> dict[str, list[str]]:
    """One pass. Returns the job ids acted on: ``{"resent": [...], "failed": [...], "canceled": [...]}``."""
    now = now or utcnow()
    out: dict[str, list[str]] = {"resent": [], "failed": [], "canceled": []}
    with sm() as s:
        orphans = dbjobs.find_orphans(s, now=now, requeue_after_seconds=settings.requeue_after_seconds)
        for job in orphans:
            try:
                if job.status == JobStatus.cancelling:
                    dbjobs.expire_cancelling(s, job.id, now=now)
                    out["canceled"].append(job.id)
                elif job.status == JobStatus.running and job.attempts >= settings.max_attempts:
                    dbjobs.fail_orphan(s, job.id, code="lease_expired", now=now,
                                       message=f"the worker was lost {job.attempts} times")
                    out["failed"].append(job.id)
                else:
                    send(job.id, job.kind)
                    dbjobs.mark_enqueued(s, job.id, now=now)
                    out["resent"].append(job.id)
            except DBError as exc:  # the job moved meanwhile (e.g. a worker renewed its lease): skip it
                log.info("reconciler: job %s skipped: %s", job.id, exc)
            except Exception:  # broker down: try again next pass
                log.exception("reconciler: could not re-send job %s", job.id)
    if any(out.values()):
        log.info("reconciler: %s", {k: len(v) for k, v in out.items()})
    return out


class Reconciler(threading.Thread):
    """Runs :func:`reconcile_once` every ``settings.reconcile_seconds`` until :meth:`stop`."""

    def __init__(self, settings: Settings, *, sm: sessionmaker[Session] | None = None, send: Send | None = None):
        super().__init__(name="ncs-reconciler", daemon=True)
        self.settings = settings
        self._sm = sm
        self._send = send
        self.stopped = threading.Event()

    def _setup(self) -> None:
        if self._sm is None:
            from worker.tasks import sessionmaker_for

            self._sm = sessionmaker_for(self.settings.resolved_database_url)
        if self._send is None:
            from worker.celery_app import create_celery, send_job

            app = create_celery(self.settings, register_tasks=False)
            self._send = lambda job_id, kind: send_job(app, job_id, kind)

    def run(self) -> None:
        self._setup()
        while not self.stopped.is_set():
            try:
                reconcile_once(self._sm, self._send, self.settings)
            except Exception:
                log.exception("reconciler pass failed")
            from worker.webhooks import dispatch_quietly  # webhook retries, and jobs ended without a worker

            dispatch_quietly(self._sm, self.settings)
            self.stopped.wait(self.settings.reconcile_seconds)

    def stop(self, timeout: float = 5.0) -> None:
        self.stopped.set()
        self.join(timeout)
