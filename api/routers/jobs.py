"""``/jobs``: submit single jobs, poll them (ETag/304), read their metric and bound histories, cancel them.

Every state comes from SQL (``db.jobs``), never from Celery. Routes stay thin: one ``db.jobs`` call that
owns its transaction, then a schema from ``api.schemas.jobs``.
"""

from __future__ import annotations

import base64
import json
import threading
from collections import OrderedDict
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Request, Response
from fastapi.responses import JSONResponse

from api.deps import IdempotencyKeyDep, OwnerDep, QueueDep, SessionDep, SettingsDep, request_hash
from api.limits import check_runs, check_ufm
from api.problems import ApiProblem, problem_responses
from api.queue import JobQueue
from api.schemas.common import Page
from api.schemas.jobs import (BoundOut, JobAccepted, JobCreate, JobKindName, JobOut, JobStatusName, JobSummary,
                              MetricPointOut, job_out, job_summary)
from db import jobs as dbjobs
from db import webhooks as dbhooks
from db.models import TERMINAL

router = APIRouter(prefix="/jobs", tags=["jobs"])

MAX_PAGE = 500


def enqueue_committed(session: Any, queue: JobQueue, job: Any) -> None:
    """Send a committed, still-waiting job's task unless it was already sent (an Idempotency-Key replay).

    A failed send leaves the job queued in SQL; the reconciler re-sends it.
    """
    if job.status != "queued" or job.enqueued_at is not None:
        return
    if queue.enqueue(job.id, job.kind):
        dbjobs.mark_enqueued(session, job.id)


def accepted(job: Any, settings: Any) -> JSONResponse:
    """202 + ``Location`` + ``Retry-After`` for a queued job."""
    body = JobAccepted(id=job.id, kind=job.kind, status=job.status, location=f"/jobs/{job.id}")
    return JSONResponse(body.model_dump(mode="json"), status_code=202,
                        headers={"Location": body.location, "Retry-After": str(settings.retry_after_seconds)})


def etag_of(job: Any) -> str:
    return f'"{job.version}"'


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 §13.1.2 weak comparison of ``If-None-Match`` against ``etag``."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    candidates = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return etag.removeprefix("W/") in candidates


@router.post("", status_code=202, response_model=JobAccepted, summary="Submit a train or ufm job",
             responses=problem_responses(400, 422))
def create_job(body: Annotated[JobCreate, Body()], session: SessionDep, settings: SettingsDep,
               queue: QueueDep, owner: OwnerDep, idempotency_key: IdempotencyKeyDep) -> JSONResponse:
    """Queue one job: ``kind: "train"`` with a ``RunConfig`` (trained as a one-member bundle), or
    ``kind: "ufm"`` with a ``UFMConfig``. Answers 202 with ``Location: /jobs/{id}``. With an
    ``Idempotency-Key`` the same body returns the same job; another body under that key is refused (422)."""
    if body.kind == "train":
        check_runs([body.config], settings, prefix="config.", count_field="config")
    else:
        check_ufm(body.config, settings)
    payload = body.model_dump(mode="json")
    config = {"runs": [payload["config"]]} if body.kind == "train" else payload["config"]
    job = dbjobs.create_job(session, kind=body.kind, config=config, owner=owner,
                            idempotency_key=idempotency_key,
                            request_hash=request_hash(payload) if idempotency_key else None)
    if body.callback_url is not None:  # before the enqueue: a fast job cannot end unseen by its webhook
        dbhooks.subscribe(session, url=str(body.callback_url), owner=owner, job_id=job.id)
    enqueue_committed(session, queue, job)
    return accepted(job, settings)


@router.get("", response_model=Page[JobSummary], summary="List jobs (newest first, cursor pages)",
            responses=problem_responses(422))
def list_jobs(session: SessionDep, owner: OwnerDep,
              status: Annotated[list[JobStatusName] | None, Query(description="Repeatable.")] = None,
              kind: JobKindName | None = None, sweep_id: str | None = None,
              cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
              limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50) -> Page[JobSummary]:
    """Jobs filtered by ``status`` (repeatable), ``kind`` and ``sweep_id``; ``{items, next_cursor}``."""
    rows, nxt = dbjobs.list_jobs(session, owner=owner, status=status, kind=kind, sweep_id=sweep_id,
                                 cursor=cursor, limit=limit)
    return Page[JobSummary](items=[job_summary(j) for j in rows], next_cursor=nxt)


class JobBodyCache:
    """The JSON bodies of ``GET /jobs/{id}`` keyed by ``(job id, version)``, least recently used first out,
    at most ``max_bytes`` in all (per API process).

    Never stale: every request first reads the job's current ``version`` (one primary-key lookup, which also
    applies the owner check), and every change of what the body shows bumps ``version`` (``db.jobs``: state
    transitions, progress, heartbeats, new metric points and bounds), so a body is served only for the version
    it was built at. A body is built from that version's row and later reads, never older data.
    """

    def __init__(self, max_bytes: int = 32 * 1024**2) -> None:
        self.max_bytes = max_bytes
        self._bodies: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int]) -> bytes | None:
        with self._lock:
            body = self._bodies.get(key)
            if body is not None:
                self._bodies.move_to_end(key)
            return body

    def put(self, key: tuple[str, int], body: bytes) -> None:
        if len(body) > self.max_bytes // 4:
            return
        with self._lock:
            old = self._bodies.pop(key, None)
            self._bytes += len(body) - (len(old) if old is not None else 0)
            self._bodies[key] = body
            while self._bytes > self.max_bytes:
                _, dropped = self._bodies.popitem(last=False)
                self._bytes -= len(dropped)


def _body_cache(request: Request) -> JobBodyCache:
    state = request.app.state
    cache = getattr(state, "job_bodies", None)
    if cache is None:
        cache = state.job_bodies = JobBodyCache()
    return cache


@router.get("/{job_id}", response_model=JobOut, summary="Poll a job (ETag / If-None-Match -> 304)",
            responses={304: {"description": "Not modified since the ETag given in If-None-Match"},
                       **problem_responses(404)})
def get_job(job_id: str, request: Request, session: SessionDep, settings: SettingsDep, owner: OwnerDep,
            if_none_match: Annotated[str | None, Header()] = None) -> Response:
    """Status, progress, latest and final metrics, latest bounds, error. ``ETag`` is the row's version:
    send it back in ``If-None-Match`` to get 304 until the job changes. ``Retry-After`` while it waits/runs."""
    # the polling path: one primary-key lookup of (version, status), nothing else
    version, status = dbjobs.job_etag(session, job_id, owner=owner)
    etag = f'"{version}"'
    if _etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=_poll_headers(etag, status, settings))
    cache = _body_cache(request)
    body = cache.get((job_id, version))
    if body is None:  # build it (the row may have moved on meanwhile: answer and cache the newer version)
        job = dbjobs.get_job(session, job_id, owner=owner)
        out = job_out(job, latest=dbjobs.latest_metrics(session, job.id), bounds=dbjobs.latest_bounds(session, job.id))
        body = out.model_dump_json().encode()
        cache.put((job.id, job.version), body)
        etag, status = etag_of(job), job.status
    return Response(body, media_type="application/json", headers=_poll_headers(etag, status, settings))


def _poll_headers(etag: str, status: str, settings: Any) -> dict[str, str]:
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if status not in TERMINAL:
        headers["Retry-After"] = str(settings.retry_after_seconds)
    return headers


def _encode_key(key: tuple[int, ...]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode().rstrip("=")


def _decode_key(cursor: str, length: int) -> tuple[int, ...]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        key = json.loads(raw)
        if not (isinstance(key, list) and len(key) == length and all(isinstance(k, int) for k in key)):
            raise ValueError(key)
        return tuple(key)
    except (ValueError, TypeError) as exc:
        raise ApiProblem(422, "invalid-cursor", "this cursor was not produced by this API", field="cursor") from exc


def _keyset_page(rows: list[Any], key_of, key_len: int, cursor: str | None,
                 limit: int) -> tuple[list[Any], str | None]:
    """Page ``rows`` (sorted by ``key_of``, unique keys of ``key_len`` ints) after the key in ``cursor``."""
    if cursor is not None:
        after = _decode_key(cursor, key_len)
        rows = [r for r in rows if key_of(r) > after]
    page, nxt = rows[:limit], None
    if len(rows) > limit:
        nxt = _encode_key(key_of(page[-1]))
    return page, nxt


@router.get("/{job_id}/metrics", response_model=Page[MetricPointOut], summary="Metric history of a job",
            responses=problem_responses(404, 422))
def job_metrics(job_id: str, session: SessionDep, owner: OwnerDep,
                run_index: Annotated[int | None, Query(ge=0)] = None,
                layer: Annotated[int | None, Query(ge=-1, description="-1 = last layer")] = None,
                cursor: str | None = None,
                limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100) -> Page[MetricPointOut]:
    """Points ordered by ``(run_index, epoch, layer)``, filtered by ``run_index`` and ``layer``; cursor pages."""
    dbjobs.get_job(session, job_id, owner=owner)
    rows = dbjobs.metric_history(session, job_id, run_index=run_index, layer=layer)
    page, nxt = _keyset_page(rows, lambda p: (p.run_index, p.epoch, p.layer), 3, cursor, limit)
    return Page[MetricPointOut](items=[MetricPointOut(run_index=p.run_index, epoch=p.epoch, layer=p.layer,
                                                      metrics=p.metrics) for p in page], next_cursor=nxt)


@router.get("/{job_id}/bounds", response_model=Page[BoundOut], summary="Bound history of a job",
            responses=problem_responses(404, 422))
def job_bounds(job_id: str, session: SessionDep, owner: OwnerDep,
               run_index: Annotated[int | None, Query(ge=0)] = None, cursor: str | None = None,
               limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100) -> Page[BoundOut]:
    """Theorem 2.3.1 bound blocks ordered by ``(run_index, epoch)``; cursor pages."""
    dbjobs.get_job(session, job_id, owner=owner)
    rows = dbjobs.bound_history(session, job_id, run_index=run_index)
    page, nxt = _keyset_page(rows, lambda b: (b.run_index, b.epoch), 2, cursor, limit)
    return Page[BoundOut](items=[BoundOut(run_index=b.run_index, epoch=b.epoch, block=b.block) for b in page],
                          next_cursor=nxt)


@router.post("/{job_id}/cancel", response_model=JobSummary, summary="Cancel a job (idempotent)",
             responses={202: {"description": "Cancel requested; the worker stops at its next epoch"},
                        **problem_responses(404, 409)})
def cancel_job(job_id: str, session: SessionDep, settings: SettingsDep, owner: OwnerDep) -> JSONResponse:
    """A waiting job is canceled at once (200); a running one goes to ``cancelling`` (202, the worker stops at
    its next epoch). Canceling again is harmless. A job that already succeeded or failed answers 409."""
    job = dbjobs.request_cancel(session, job_id, owner=owner)
    body = job_summary(job).model_dump(mode="json")
    if job.status == "cancelling":
        return JSONResponse(body, status_code=202, headers={"Location": f"/jobs/{job.id}", "ETag": etag_of(job),
                                                            "Retry-After": str(settings.retry_after_seconds)})
    return JSONResponse(body, headers={"ETag": etag_of(job)})
