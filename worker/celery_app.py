"""Celery app factory: broker and options from :class:`ncservice.settings.Settings`.

Options (DESIGN.md §2): ``acks_late`` + ``reject_on_worker_lost`` (a message is acknowledged only after its
task returned; a killed worker's message is redelivered), ``prefetch_multiplier=1`` (a worker holds one
message at a time), results ignored (job state lives in SQL, never in a result backend), queues ``gpu``
(training) and ``cpu`` (measure, ufm), JSON only, and Celery leaves the root logger alone.
"""

from __future__ import annotations

from pathlib import Path

from celery import Celery
from kombu import Exchange, Queue

from db.models import QUEUES, TASK_NAMES
from ncservice.settings import Settings, get_settings


def create_celery(settings: Settings | None = None, *, register_tasks: bool = True) -> Celery:
    """Build the Celery app for ``settings`` (default: :func:`get_settings`).

    Args:
        settings: service settings (broker URL, transport options, DB URL for the tasks).
        register_tasks: register the ``ncs.*`` tasks (a pure producer may skip them).

    Returns:
        A Celery app; ``app.ncs_settings`` holds ``settings``.
    """
    settings = settings or get_settings()
    options = settings.broker_transport_options()
    for key in ("data_folder_in", "data_folder_out", "control_folder", "processed_folder"):
        if key in options:  # the filesystem transport needs its folders
            Path(options[key]).mkdir(parents=True, exist_ok=True)
    app = Celery("ncservice", broker=settings.resolved_broker_url, set_as_current=False)
    app.conf.update(
        broker_transport_options=options,
        broker_connection_retry_on_startup=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        result_backend=None,
        # explicit exchange + routing key per queue: without them Celery binds every queue to the default
        # queue's exchange and key, and a task sent to "gpu" would land in "cpu"
        task_queues=tuple(Queue(q, Exchange(q, type="direct"), routing_key=q) for q in ("gpu", "cpu")),
        task_default_queue="cpu",
        task_routes={TASK_NAMES[kind]: {"queue": QUEUES[kind]} for kind in TASK_NAMES},
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        worker_enable_remote_control=settings.broker_url is not None,  # the filesystem transport has no fanout
        enable_utc=True,
    )
    app.ncs_settings = settings
    if register_tasks:
        from worker import tasks

        tasks.register(app)
    return app


def send_job(app: Celery, job_id: str, kind: str, *, countdown: float | None = None) -> None:
    """Send job ``job_id``'s task: name from ``TASK_NAMES``, ``task_id = job_id``, queue from ``QUEUES``.
    Call it only after the job row committed."""
    kind = getattr(kind, "value", kind)
    app.send_task(TASK_NAMES[kind], args=[job_id], task_id=job_id, queue=QUEUES[kind], countdown=countdown)
