"""``GET /jobs/{id}/events``: live progress of a job as server-sent events (``text/event-stream``).

The stream polls the database (three indexed queries per tick, each in its own short session, off the event
loop) and sends what is new since the last tick:

- ``event: state``: a row of ``job_events`` (``{status, code, reason, at}``), in order;
- ``event: metric``: a metric point (``{run_index, epoch, layer, metrics}``), in insertion order;
- ``event: progress``: ``{epoch, total}`` whenever the job's progress changed;
- ``event: end``: ``{status}`` once the job is terminal (after everything above); then the stream closes.

Every event carries ``id: <last job_event id>-<last metric point id>-<progress epoch>``: a client that
reconnects with ``Last-Event-ID`` (browsers' ``EventSource`` do it by themselves) gets only what came after.
A comment line (``: keep-alive``) is sent when nothing happened for ``keepalive`` seconds so proxies keep the
connection open. ``retry:`` tells ``EventSource`` how long to wait before reconnecting.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from api.deps import OwnerDep, SessionDep
from api.problems import ApiProblem, problem_responses
from db import jobs as dbjobs
from db.models import TERMINAL, Job, JobEvent, MetricPoint

router = APIRouter(prefix="/jobs", tags=["jobs"])

_CURSOR = re.compile(r"^(\d+)-(\d+)-(-?\d+)$")
MAX_BATCH = 500  # metric points per tick: a long history is streamed over several ticks


@dataclass
class Cursor:
    """Where a stream stands: last job_event id, last metric point id, last progress epoch sent (-1: none)."""

    event: int = 0
    metric: int = 0
    epoch: int = -1

    @classmethod
    def parse(cls, value: str | None) -> Cursor:
        if not value:
            return cls()
        m = _CURSOR.match(value.strip())
        if not m:
            raise ApiProblem(422, "invalid-last-event-id", "Last-Event-ID was not produced by this stream",
                             field="header.Last-Event-ID")
        return cls(int(m[1]), int(m[2]), int(m[3]))

    def __str__(self) -> str:
        return f"{self.event}-{self.metric}-{self.epoch}"


def _frame(event: str, data: Any, cursor: Cursor) -> str:
    return f"id: {cursor}\nevent: {event}\ndata: {json.dumps(data, default=str, separators=(',', ':'))}\n\n"


def poll_once(sessionmaker: Any, job_id: str, cursor: Cursor) -> tuple[list[str], bool]:
    """One tick: the frames of everything new after ``cursor`` (advanced in place) and whether the job is
    terminal (when every point up to now has been sent)."""
    frames: list[str] = []
    with sessionmaker() as session:
        job = session.get(Job, job_id, populate_existing=True)
        if job is None:  # deleted meanwhile (its sweep was): nothing more will come
            return frames, True
        status, epoch, total = job.status, job.progress_epoch, job.progress_total
        events = session.execute(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > cursor.event)
                                 .order_by(JobEvent.id)).scalars().all()
        points = session.execute(select(MetricPoint).where(MetricPoint.job_id == job_id,
                                                           MetricPoint.id > cursor.metric)
                                 .order_by(MetricPoint.id).limit(MAX_BATCH)).scalars().all()
        session.commit()
    for ev in events:
        cursor.event = ev.id
        frames.append(_frame("state", {"status": ev.status, "code": ev.code, "reason": ev.reason,
                                       "at": ev.at.isoformat()}, cursor))
    for p in points:
        cursor.metric = p.id
        frames.append(_frame("metric", {"run_index": p.run_index, "epoch": p.epoch, "layer": p.layer,
                                        "metrics": p.metrics}, cursor))
    if epoch is not None and epoch != cursor.epoch:
        cursor.epoch = epoch
        frames.append(_frame("progress", {"epoch": epoch, "total": total}, cursor))
    done = status in TERMINAL and len(points) < MAX_BATCH
    if done:
        frames.append(_frame("end", {"status": status}, cursor))
    return frames, done


@router.get("/{job_id}/events", summary="Live job events (server-sent events: state, metric, progress, end)",
            response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {"example": 'id: 3-0-1\nevent: progress\n'
                                                                          'data: {"epoch":1,"total":60}\n\n'}},
                             "description": "An event stream that ends when the job is terminal"},
                       **problem_responses(404, 422)})
async def job_events(job_id: str, request: Request, session: SessionDep, owner: OwnerDep,
                     last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
                     poll: Annotated[float, Query(ge=0.05, le=30, description="seconds between DB polls")] = 1.0,
                     keepalive: Annotated[float, Query(ge=1, le=300)] = 15.0) -> StreamingResponse:
    """Stream the job's state changes, metric points and progress until it is terminal.

    Resume with ``Last-Event-ID`` (the ``id`` of the last event received). Polls the DB every ``poll`` s."""
    cursor = Cursor.parse(last_event_id)
    await run_in_threadpool(dbjobs.get_job, session, job_id, owner)  # 404 before the stream starts
    state = request.app.state  # reads only: SQLite readers never wait for the worker's writes
    sessionmaker = getattr(state, "read_sessionmaker", None) or state.sessionmaker

    async def stream() -> AsyncIterator[str]:
        yield f"retry: {int(max(poll, 1.0) * 1000)}\n\n"
        quiet_since = time.monotonic()
        while True:
            frames, done = await run_in_threadpool(poll_once, sessionmaker, job_id, cursor)
            for frame in frames:
                yield frame
            if done:
                return
            if frames:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= keepalive:
                quiet_since = time.monotonic()
                yield ": keep-alive\n\n"
            if await request.is_disconnected():
                return
            await asyncio.sleep(poll)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
