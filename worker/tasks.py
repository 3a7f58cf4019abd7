"""Celery tasks ``ncs.train_bundle``, ``ncs.measure`` and ``ncs.ufm``: thin shells around ``ncengine``.

Each task's only argument is the job id (also its Celery task id); the config is read from the DB. Flow
(:func:`run_job`): claim by compare-and-set (a duplicate or late message finds the job taken or finished and
returns) -> heartbeat thread renews the lease -> call ``ncengine`` with a progress callback that writes
progress, metric points and bound blocks as the run goes and stops the run when the cancel flag is set,
the lease is lost, or the worker is shutting down -> ``succeed`` / ``fail`` / ``mark_canceled`` /
``release_for_retry``. Training checkpoints every ``settings.checkpoint_every`` epochs to
``<data_dir>/artifacts/<job>/ckpt.pt`` and a re-run (redelivery, reconciler, retry) resumes from it.

Errors are stored on the job row as ``error_code`` + ``error_message``: ``input_error`` (bad config or
inputs: not retried), ``bound_violation`` (a theorem's runtime self-check failed: not retried),
``internal_error`` (anything else: retried until ``settings.max_attempts``), ``lease_expired`` (reconciler).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from celery import Celery, signals
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from db import jobs as dbjobs
from db.errors import LeaseLost
from db.models import TASK_NAMES, Job, JobKind
from db.session import make_engine, make_read_sessionmaker, make_sessionmaker
from ncservice.settings import Settings

log = logging.getLogger("ncservice.worker")

#: set when the worker process begins a warm shutdown: a running job stops at its next epoch, releases
#: itself for retry and keeps its checkpoint, so the next worker resumes it
SHUTTING_DOWN = threading.Event()


#: progress is written at most this often (seconds); each write also returns the cancel flag
PROGRESS_SECONDS = 0.5
#: between progress writes, the cancel flag alone is read at most this often (seconds), at an epoch's end
CANCEL_POLL_SECONDS = 0.05


@signals.worker_shutting_down.connect
def _on_worker_shutting_down(**_kwargs: Any) -> None:  # pragma: no cover - runs in the worker process
    SHUTTING_DOWN.set()


class WorkerError(Exception):
    """Root of the errors the worker raises on purpose."""


class Canceled(WorkerError):
    """The job's cancel flag was set: stop at this epoch."""


class ShuttingDown(WorkerError):
    """The worker process is stopping: release the job for another worker."""


@lru_cache(maxsize=8)
def engine_for(url: str) -> Engine:
    """One engine per database URL per process (created on first use, never at import)."""
    return make_engine(url)


@lru_cache(maxsize=8)
def sessionmaker_for(url: str) -> sessionmaker[Session]:
    """Sessions on :func:`engine_for` ``(url)``."""
    return make_sessionmaker(engine_for(url))


@lru_cache(maxsize=8)
def read_sessionmaker_for(url: str) -> sessionmaker[Session]:
    """Read-only sessions on :func:`engine_for` ``(url)`` (``db.session.make_read_sessionmaker``)."""
    return make_read_sessionmaker(engine_for(url))


def worker_name() -> str:
    """``<pid>@<host>``: unique per worker process; the lease owner of the jobs it runs."""
    return f"{os.getpid()}@{socket.gethostname()}"


def checkpoint_path(settings: Settings, job_id: str) -> Path:
    """``<data_dir>/artifacts/<job>/ckpt.pt``."""
    return settings.artifact_dir / job_id / "ckpt.pt"


@dataclass
class JobContext:
    """What a runner gets: the claimed job and helpers that write through ``db.jobs``."""

    job: Job
    settings: Settings
    sm: sessionmaker[Session]
    worker: str
    cancel: threading.Event = field(default_factory=threading.Event)
    lost: threading.Event = field(default_factory=threading.Event)
    read_sm: sessionmaker[Session] | None = None  # read-only sessions (SQLite: no write lock) for the flag
    epoch: int | None = None  # the last epoch reported by the runner (progress may be written less often)
    total: int | None = None
    _last_progress: float = 0.0
    _last_flag_read: float = 0.0

    def check(self) -> None:
        """Raise if the run must stop now (lease lost, cancel requested, worker shutting down)."""
        if self.lost.is_set():
            raise LeaseLost(self.job.id)
        if self.cancel.is_set():
            raise Canceled(self.job.id)
        if SHUTTING_DOWN.is_set():
            raise ShuttingDown(self.job.id)

    def progress(self, epoch: int, total: int, *, force: bool = False) -> None:
        """Called after every epoch (UFM: step): write progress (at most every ``PROGRESS_SECONDS`` unless
        ``force``; the write returns the cancel flag), and on the calls that do not write, read the flag alone
        (a primary-key lookup in a read-only transaction) at most every ``CANCEL_POLL_SECONDS``. A cancel
        therefore stops a run at the end of the epoch in which it was asked for (or within 50 ms of steps
        when epochs/steps are shorter than that); an epoch longer than ``heartbeat_seconds`` is stopped
        inside, at the minibatch after the heartbeat that read the flag (``train.run(interrupt=check)``)."""
        now = time.monotonic()
        self.epoch, self.total = epoch, total
        if force or epoch >= total or now - self._last_progress >= PROGRESS_SECONDS:
            self._last_progress = self._last_flag_read = now
            log.info("job %s epoch %d/%d", self.job.id, epoch, total,
                     extra={"job_id": self.job.id, "epoch": epoch, "total": total})
            with self.sm() as s:
                try:
                    if dbjobs.report_progress(s, self.job.id, worker=self.worker, epoch=epoch, total=total):
                        self.cancel.set()
                except LeaseLost:
                    self.lost.set()
        elif not self.cancel.is_set() and now - self._last_flag_read >= CANCEL_POLL_SECONDS:
            self._last_flag_read = now
            with (self.read_sm or self.sm)() as s:
                if dbjobs.cancel_requested(s, self.job.id):
                    self.cancel.set()
        self.check()

    def points(self, points: list[dict], bounds: list[dict]) -> None:
        with self.sm() as s:
            dbjobs.add_metric_points(s, self.job.id, points)
            if bounds:
                dbjobs.add_bounds(s, self.job.id, bounds)


class Heartbeat(threading.Thread):
    """Renews the lease every ``heartbeat_seconds``; sets ``ctx.cancel`` / ``ctx.lost``."""

    def __init__(self, ctx: JobContext) -> None:
        super().__init__(name=f"heartbeat-{ctx.job.id[:8]}", daemon=True)
        self.ctx = ctx
        self.stopped = threading.Event()

    def run(self) -> None:
        ctx = self.ctx
        while not self.stopped.wait(ctx.settings.heartbeat_seconds):
            try:
                with ctx.sm() as s:
                    if dbjobs.heartbeat(s, ctx.job.id, worker=ctx.worker, lease_seconds=ctx.settings.lease_seconds):
                        ctx.cancel.set()
            except LeaseLost:
                ctx.lost.set()
                return
            except Exception:  # a DB hiccup: the lease has slack (lease_seconds > heartbeat_seconds)
                log.exception("heartbeat of job %s failed", ctx.job.id)

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)


# --------------------------------------------------------------------------------------------- runners

def _split_record(rec: dict, run_index: int) -> tuple[dict, dict | None]:
    """A history dict -> (metric point, bound record or None)."""
    epoch = int(rec.get("epoch", rec.get("step", 0)))
    layer = rec.get("layer")
    metrics = {k: v for k, v in rec.items() if k not in ("epoch", "layer", "bounds")}
    point = {"run_index": run_index, "epoch": epoch, "layer": -1 if layer is None else int(layer),
             "metrics": metrics}
    block = rec.get("bounds")
    bound = {"run_index": run_index, "epoch": epoch, "block": block} if block else None
    return point, bound


def _last_layer(records: list[dict]) -> int | None:
    layers = [r.get("layer") for r in records if r.get("layer") is not None]
    return max(layers) if layers else None


def _points_from_history(members: list[list[dict]]) -> tuple[list[dict], list[dict]]:
    points, bounds = [], []
    for k, recs in enumerate(members):
        for rec in recs:
            p, b = _split_record(rec, k)
            points.append(p)
            if b is not None:
                bounds.append(b)
    return points, bounds


def run_train(ctx: JobContext) -> dict:
    """``ncs.train_bundle``: ``config = {"runs": [RunConfig json, ...]}`` (one ensemble bundle)."""
    from ncengine import train
    from ncengine.config import RunConfig

    configs = [RunConfig.model_validate(c) for c in ctx.job.config["runs"]]
    ckpt = checkpoint_path(ctx.settings, ctx.job.id)
    ckpt.parent.mkdir(parents=True, exist_ok=True)

    def progress(epoch: int, total: int, metrics: list[list[dict]] | None) -> None:
        if metrics is not None:
            ctx.points(*_points_from_history(metrics))
        ctx.progress(epoch, total, force=metrics is not None)

    results = train.run(configs, device=ctx.job.device or "auto", progress=progress, checkpoint_path=ckpt,
                        checkpoint_every=ctx.settings.checkpoint_every, interrupt=ctx.check)
    # the points of epochs measured before a crash were written then; a resumed run skips them (upsert)
    ctx.points(*_points_from_history([r.history for r in results]))
    runs = [{"index": i, "seed": r.config.seed, "config": r.config.model_dump(mode="json"), "final": r.final}
            for i, r in enumerate(results)]
    ckpt.unlink(missing_ok=True)
    return {"runs": runs}


def _load_input(path: str | None, field_name: str, upload_dir: Path):
    """One input of a measure job: ``path`` is relative to ``upload_dir`` (as the API stores it, so no server
    path shows in ``GET /jobs/{id}``) or absolute (older jobs, direct callers)."""
    if path is None:
        return None
    from ncengine.errors import InputError
    from ncengine.io import load_array

    if not Path(path).is_absolute():
        base = upload_dir.resolve()
        full = (base / path).resolve()
        if base not in full.parents:
            raise InputError(field_name, f"input {path!r} is outside the upload folder",
                             expected="<upload id>/<file> as stored by POST /measure")
        if not full.is_file():  # say so without the server path
            raise InputError(field_name, f"the uploaded file {path!r} is no longer on the server",
                             expected="the upload of POST /measure, kept until its job has run")
        path = str(full)
    return load_array(path, field=field_name)


def run_measure(ctx: JobContext) -> dict:
    """``ncs.measure``: ``config = {"inputs": {name: path|None}, "options": {...}}``; a relative path is under
    ``settings.upload_dir``."""
    from ncengine.metrics import measure

    inputs = ctx.job.config.get("inputs", {})
    options = dict(ctx.job.config.get("options", {}))
    arrays = {name: _load_input(inputs.get(name), name, ctx.settings.upload_dir)
              for name in ("features", "labels", "weights", "bias", "test_features", "test_labels")}
    ctx.progress(0, 1, force=True)
    out = measure(arrays["features"], arrays["labels"], arrays["weights"], arrays["bias"],
                  test_features=arrays["test_features"], test_labels=arrays["test_labels"], **options).to_dict()
    out = dbjobs.jsonable(out)
    p, b = _split_record({**out, "epoch": 0}, 0)
    ctx.points([p], [b] if b else [])
    ctx.progress(1, 1, force=True)
    return out


def run_ufm(ctx: JobContext) -> dict:
    """``ncs.ufm``: ``config`` = :class:`ncengine.ufm.UFMConfig` json; one metric point per recorded step."""
    from ncengine import ufm

    cfg = ufm.UFMConfig.model_validate(ctx.job.config)

    def progress(step: int, steps: int, rec: dict | None) -> None:
        if rec is not None:
            p, b = _split_record(rec, 0)
            ctx.points([p], [b] if b else [])
        ctx.progress(step, steps, force=rec is not None)

    res = ufm.optimize(**cfg.model_dump(), progress=progress)
    return dbjobs.jsonable(res.final)


RUNNERS: dict[str, Callable[[JobContext], dict]] = {
    JobKind.train.value: run_train, JobKind.measure.value: run_measure, JobKind.ufm.value: run_ufm}


def _device_for(kind: str) -> str:
    if kind != JobKind.train.value:
        return "cpu"
    import torch  # at run time only: never at import

    return "cuda" if torch.cuda.is_available() else "cpu"


def _classify(exc: BaseException) -> tuple[str, bool]:
    """(error_code, retryable) of an exception raised by a runner."""
    from pydantic import ValidationError

    from ncengine.errors import BoundViolation, InputError

    if isinstance(exc, (InputError, ValidationError, KeyError, TypeError, FileNotFoundError)):
        return "input_error", False
    if isinstance(exc, BoundViolation):
        return "bound_violation", False
    return "internal_error", True


def run_job(job_id: str, *, settings: Settings, kind: str, worker: str | None = None,
            resend: Callable[[str, str, float], None] | None = None) -> str | None:
    """Run one job to an end state. Returns the job's final status here, or None when the message was a
    duplicate (job taken, terminal or missing) or the lease was lost mid-run (another worker owns it now).

    Args:
        job_id: the job (and Celery task) id.
        settings: service settings (DB URL, lease/heartbeat seconds, checkpoints, max attempts).
        kind: the task's job kind; a message whose job has another kind is dropped.
        worker: lease owner name (default ``<pid>@<host>``).
        resend: ``resend(job_id, kind, countdown)`` re-sends a job released for retry.
    """
    worker = worker or worker_name()
    sm = sessionmaker_for(settings.resolved_database_url)
    with sm() as s:
        job = dbjobs.claim(s, job_id, worker=worker, lease_seconds=settings.lease_seconds, device=_device_for(kind))
    if job is None:
        log.info("job %s: not claimable (duplicate message, taken or finished)", job_id)
        return None
    ctx = JobContext(job=job, settings=settings, sm=sm, worker=worker,
                     read_sm=read_sessionmaker_for(settings.resolved_database_url))
    hb = Heartbeat(ctx)
    hb.start()
    try:
        if job.kind != kind:
            raise WorkerError(f"job kind {job.kind!r} sent to the {kind!r} task")
        ctx.check()
        result = RUNNERS[job.kind](ctx)
    except LeaseLost:
        log.warning("job %s: lease lost; another worker owns it now", job_id)
        return None
    except Canceled:
        with sm() as s:
            if ctx.epoch is not None:  # the epoch it stopped at (a throttled progress write may not have said)
                try:
                    dbjobs.report_progress(s, job_id, worker=worker, epoch=ctx.epoch, total=ctx.total or ctx.epoch)
                except LeaseLost:
                    return None
            return dbjobs.mark_canceled(s, job_id, worker=worker).status
    except ShuttingDown:
        with sm() as s:  # enqueued_at cleared: the reconciler re-sends it on its next pass
            return dbjobs.release_for_retry(s, job_id, worker=worker, code="worker_shutdown",
                                            message="the worker stopped; the job resumes from its checkpoint").status
    except Exception as exc:
        code, retryable = _classify(exc)
        message = f"{type(exc).__name__}: {exc}"[:4000]
        log.exception("job %s failed (%s)", job_id, code)
        with sm() as s:
            if ctx.cancel.is_set():
                return dbjobs.mark_canceled(s, job_id, worker=worker).status
            if retryable and job.attempts < settings.max_attempts:
                status = dbjobs.release_for_retry(s, job_id, worker=worker, code=code, message=message).status
                if resend is not None and status == "retrying":
                    resend(job_id, job.kind, float(min(2 ** job.attempts, 60)))
                    dbjobs.mark_enqueued(s, job_id)
                return status
            return dbjobs.fail(s, job_id, worker=worker, code=code, message=message).status
    else:
        with sm() as s:
            return dbjobs.succeed(s, job_id, worker=worker, result=result).status
    finally:
        hb.stop()


def register(app: Celery) -> None:
    """Register the three tasks on ``app`` (names from ``db.models.TASK_NAMES``)."""
    from worker.celery_app import send_job

    settings: Settings = app.ncs_settings

    def resend(job_id: str, kind: str, countdown: float) -> None:
        send_job(app, job_id, kind, countdown=countdown)

    def make(kind: str):
        def task(job_id: str) -> None:
            from ncservice.logs import log_context

            with log_context(job_id=job_id, kind=kind):  # every line logged meanwhile names the job
                _run_task(job_id)

        def _run_task(job_id: str) -> None:
            status = run_job(job_id, settings=settings, kind=kind, resend=resend)
            # webhooks: the first attempt at once; retries go out from the reconciler (worker/webhooks.py)
            if status in ("succeeded", "failed", "canceled"):
                from worker.webhooks import dispatch_quietly

                dispatch_quietly(sessionmaker_for(settings.resolved_database_url), settings, job_id=job_id)

        task.__name__ = f"{kind}_task"
        task.__doc__ = f"Run the {kind!r} job ``job_id`` (see :func:`worker.tasks.run_job`)."
        return app.task(name=TASK_NAMES[kind], ignore_result=True, acks_late=True, reject_on_worker_lost=True)(task)

    for kind in TASK_NAMES:
        make(kind)
