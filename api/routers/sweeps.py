"""``/sweeps``: expand a grid (or a thesis preset) into runs, bundle them, queue one train job per bundle."""

from __future__ import annotations

import csv
import io
import math
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Query
from fastapi.responses import JSONResponse, Response

from api.deps import IdempotencyKeyDep, OwnerDep, QueueDep, SessionDep, SettingsDep, request_hash
from api.limits import check_run_count, check_runs
from api.problems import problem_responses
from api.routers.jobs import MAX_PAGE, enqueue_committed
from api.schemas.common import Page, Progress
from api.schemas.jobs import JobAccepted, job_summary
from api.schemas.sweeps import PresetSweepCreate, SweepAccepted, SweepCreate, SweepOut, sweep_status
from db import jobs as dbjobs
from db import webhooks as dbhooks
from ncengine import sweep as ncsweep

router = APIRouter(prefix="/sweeps", tags=["sweeps"])


@router.post("", status_code=202, response_model=SweepAccepted, summary="Submit a sweep (grid or preset)",
             responses=problem_responses(400, 422))
def create_sweep(body: Annotated[SweepCreate, Body()], session: SessionDep, settings: SettingsDep,
                 queue: QueueDep, owner: OwnerDep, idempotency_key: IdempotencyKeyDep) -> JSONResponse:
    """Expand the grid x seeds into runs (``ncengine.sweep.expand``), pack runs that share architecture and
    data into ensemble bundles (``ncengine.sweep.bundles``) and queue one ``train`` job per bundle.
    Answers 202 with ``Location: /sweeps/{id}``. Honours ``Idempotency-Key``."""
    if isinstance(body, PresetSweepCreate):
        spec = ncsweep.preset(body.preset, scale=body.scale)
        name, preset = body.name or f"{body.preset} ({body.scale})", body.preset
    else:
        spec = body.spec()
        name, preset = body.name or "sweep", None
    check_run_count(spec.size(), settings, field="grid")  # before expanding: a huge grid is never built
    configs = ncsweep.expand(spec)
    check_runs(configs, settings, grid=spec.grid, prefix="base.", count_field="grid")
    bundles = ncsweep.bundles(configs, max_bundle_size=settings.max_bundle_size)
    payload = body.model_dump(mode="json")
    sweep, jobs = dbjobs.create_sweep(
        session, name=name, preset=preset, spec=spec.model_dump(mode="json"),
        bundles=[{"runs": [c.model_dump(mode="json") for c in b]} for b in bundles], owner=owner,
        idempotency_key=idempotency_key, request_hash=request_hash(payload) if idempotency_key else None)
    if body.callback_url is not None:  # before the enqueue: fast jobs cannot end unseen by the webhook
        dbhooks.subscribe(session, url=str(body.callback_url), owner=owner, sweep_id=sweep.id)
    for job in jobs:
        enqueue_committed(session, queue, job)
    location = f"/sweeps/{sweep.id}"
    body_out = SweepAccepted(id=sweep.id, location=location, runs=sum(len(j.config.get("runs", [])) for j in jobs),
                             jobs=[JobAccepted(id=j.id, kind=j.kind, status=j.status, location=f"/jobs/{j.id}")
                                   for j in jobs])
    return JSONResponse(body_out.model_dump(mode="json"), status_code=202,
                        headers={"Location": location, "Retry-After": str(settings.retry_after_seconds)})


@router.get("", response_model=Page[dict], summary="List sweeps (newest first, cursor pages)",
            responses=problem_responses(422))
def list_sweeps(session: SessionDep, owner: OwnerDep, cursor: str | None = None,
                limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50) -> Page[dict]:
    """``{items: [{id, name, preset, created_at, location}], next_cursor}``."""
    rows, nxt = dbjobs.list_sweeps(session, owner=owner, cursor=cursor, limit=limit)
    return Page[dict](items=[{"id": s.id, "name": s.name, "preset": s.preset, "created_at": s.created_at,
                              "location": f"/sweeps/{s.id}"} for s in rows], next_cursor=nxt)


@router.get("/{sweep_id}", response_model=SweepOut, summary="A sweep: its jobs, states and progress",
            responses=problem_responses(404))
def get_sweep(sweep_id: str, session: SessionDep, owner: OwnerDep) -> SweepOut:
    """The sweep, its jobs (state, progress each), counts per state and the overall progress."""
    sweep = dbjobs.get_sweep(session, sweep_id, owner=owner)
    return sweep_out(sweep, dbjobs.sweep_jobs(session, sweep.id))


@router.post("/{sweep_id}/cancel", response_model=SweepOut,
             summary="Cancel every unfinished job of a sweep (idempotent)",
             responses={202: {"description": "Cancel requested; running jobs stop at their next epoch"},
                        **problem_responses(404)})
def cancel_sweep(sweep_id: str, session: SessionDep, settings: SettingsDep, owner: OwnerDep) -> JSONResponse:
    """Cancel each job of the sweep that has not ended, as ``POST /jobs/{id}/cancel`` does: waiting jobs are
    canceled at once, running ones go to ``cancelling`` (the worker stops them at their next epoch). Answers
    202 while any job is still ``cancelling``, else 200, with the sweep as ``GET /sweeps/{id}`` shows it.
    Jobs that already ended are left as they are, so canceling again is harmless. An unknown sweep or another
    key's answers 404."""
    sweep, jobs = dbjobs.request_cancel_sweep(session, sweep_id, owner=owner)
    body = sweep_out(sweep, jobs).model_dump(mode="json")
    if any(j.status == "cancelling" for j in jobs):
        return JSONResponse(body, status_code=202, headers={"Location": f"/sweeps/{sweep.id}",
                                                            "Retry-After": str(settings.retry_after_seconds)})
    return JSONResponse(body)


def sweep_out(sweep: Any, jobs: list[Any]) -> SweepOut:
    """The ``GET /sweeps/{id}`` body of ``sweep`` and its ``jobs`` (bundle order)."""
    counts: dict[str, int] = {}
    for j in jobs:
        counts[j.status] = counts.get(j.status, 0) + 1
    done = total = 0
    for j in jobs:
        planned = j.progress_total or _planned_epochs(j.config)
        total += planned
        done += planned if j.status == "succeeded" else min(j.progress_epoch or 0, planned)
    return SweepOut(id=sweep.id, name=sweep.name, preset=sweep.preset, spec=sweep.spec, created_at=sweep.created_at,
                    status=sweep_status([j.status for j in jobs]), counts=counts,
                    runs=sum(len(j.config.get("runs", [])) for j in jobs), progress=Progress.of(done, total),
                    jobs=[job_summary(j) for j in jobs],
                    links={"self": f"/sweeps/{sweep.id}", "results": f"/sweeps/{sweep.id}/results",
                           "jobs": f"/jobs?sweep_id={sweep.id}"})


def _planned_epochs(config: dict[str, Any]) -> int:
    runs = config.get("runs") or [{}]
    return int(((runs[0].get("schedule") or {}).get("epochs")) or 0)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Scalar leaves of a nested dict under dotted keys (lists of scalars joined by ';' for CSV cells)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            if all(isinstance(x, (int, float, str, bool)) or x is None for x in v) and len(v) <= 16:
                out[key] = ";".join("" if x is None else str(x) for x in v)
        elif isinstance(v, float) and not math.isfinite(v):
            out[key] = None
        else:
            out[key] = v
    return out


def _final_of(entry: Any) -> dict[str, Any]:
    """The final metrics of one run of a train job's result (``{"final": {...}}`` or the flat dict)."""
    if not isinstance(entry, dict):
        return {}
    final = entry.get("final") if isinstance(entry.get("final"), dict) else entry
    return {k: v for k, v in final.items() if k not in ("config", "history")}


def result_rows(jobs: list[Any]) -> list[dict[str, Any]]:
    """One row per run of the sweep: job id, run index, job status, the run's config (dotted keys, prefix
    ``config.``) and its final metrics (scalar keys; per-class arrays and the bound block flattened)."""
    rows = []
    for job in jobs:
        results = (job.result or {}).get("runs") or []
        for i, cfg in enumerate(job.config.get("runs") or []):
            row: dict[str, Any] = {"job_id": job.id, "run_index": i, "status": job.status}
            row.update(_flatten(cfg, "config."))
            if i < len(results):
                row.update(_flatten(_final_of(results[i])))
            rows.append(row)
    return rows


@router.get("/{sweep_id}/results", summary="One row per run: config summary + final metrics",
            responses={200: {"content": {"application/json": {}, "text/csv": {}},
                             "description": "JSON {sweep_id, columns, rows} or CSV with a header row"},
                       **problem_responses(404, 422)})
def sweep_results(sweep_id: str, session: SessionDep, owner: OwnerDep,
                  format: Annotated[Literal["json", "csv"], Query()] = "json") -> Response:  # noqa: A002
    """Every run of the sweep (also unfinished ones, with their status and no metrics yet)."""
    sweep = dbjobs.get_sweep(session, sweep_id, owner=owner)
    rows = result_rows(dbjobs.sweep_jobs(session, sweep.id))
    fixed = ["job_id", "run_index", "status"]
    rest = sorted({k for r in rows for k in r} - set(fixed))
    columns = fixed + [k for k in rest if k.startswith("config.")] + [k for k in rest if not k.startswith("config.")]
    if format == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return Response(buf.getvalue(), media_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="sweep-{sweep.id}.csv"'})
    return JSONResponse({"sweep_id": sweep.id, "columns": columns, "rows": rows})
