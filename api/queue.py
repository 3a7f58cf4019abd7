"""The API's side of the task queue: a Celery *producer* only.

The API never imports ``worker/``: it sends tasks by name (``db.models.TASK_NAMES``) to the queue of the job's
kind (``db.models.QUEUES``), with the job id as the only argument and as the Celery task id, AFTER the job row
has committed (DESIGN.md §2). If sending fails, the job stays ``queued`` in SQL and the reconciler re-sends it,
so a broker hiccup never loses a job; the route still answers 202.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from ncservice.settings import Settings

log = logging.getLogger("ncservice.api.queue")


class JobQueue(Protocol):
    """What the routes need from a queue: enqueue a committed job, and tell whether the broker answers."""

    def enqueue(self, job_id: str, kind: str) -> bool:
        """Send the task of job ``job_id`` (of ``kind``); return False (and log) if the broker refused."""

    def ping(self, timeout: float = 2.0) -> None:
        """Raise if the broker cannot be reached within ``timeout`` seconds."""


class CeleryProducer:
    """Celery producer built from ``Settings`` (same broker URL and transport options as the workers).

    Args:
        settings: the service settings; ``resolved_broker_url`` and ``broker_transport_options()`` are used.
    """

    def __init__(self, settings: Settings) -> None:
        from celery import Celery

        self.settings = settings
        options = settings.broker_transport_options()
        for key in ("data_folder_in", "data_folder_out", "control_folder", "processed_folder"):
            if key in options:  # the filesystem transport needs its folders to exist
                Path(options[key]).mkdir(parents=True, exist_ok=True)
        self.app = Celery("ncservice-api", broker=settings.resolved_broker_url, set_as_current=False)
        self.app.conf.update(broker_transport_options=options, task_ignore_result=True,
                             broker_connection_retry_on_startup=False)

    def enqueue(self, job_id: str, kind: str) -> bool:
        from db.models import QUEUES, TASK_NAMES

        kind = getattr(kind, "value", kind)
        try:
            self.app.send_task(TASK_NAMES[kind], args=[job_id], task_id=job_id, queue=QUEUES[kind],
                               retry=True, retry_policy={"max_retries": 2, "interval_start": 0.1,
                                                         "interval_step": 0.2, "interval_max": 1.0})
            return True
        except Exception:  # the row is committed: the reconciler re-sends it later
            log.exception("could not send job %s to the broker; the reconciler will re-send it", job_id)
            return False

    def ping(self, timeout: float = 2.0) -> None:
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)

    def close(self) -> None:
        self.app.close()
