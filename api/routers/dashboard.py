"""A small server-rendered dashboard (jinja2 templates in ``api/templates``, no JavaScript, no build step).

- ``/``: the latest sweeps and jobs with their state and progress;
- ``/ui/jobs/{id}``: a job, its training curves (``/jobs/{id}/figures/training_curves.png``) and its latest
  metrics (every run and layer of the latest epoch);
- ``/ui/sweeps/{id}``: a sweep, its jobs and its Figure 3.1 / 3.3 (``/sweeps/{id}/figures/...``).

Pages refresh themselves (``<meta http-equiv="refresh">``) while something waits or runs. They read the
same rows as the JSON API, scoped to the caller like it (``OwnerDep``). Not in the OpenAPI document.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse

from api.deps import OwnerDep, SessionDep
from api.routers.sweeps import get_sweep as sweep_json
from api.schemas.common import Progress
from db import jobs as dbjobs
from db.models import TERMINAL

router = APIRouter(include_in_schema=False)

REFRESH_SECONDS = 5
#: metric columns of the job page, in this order (others are in GET /jobs/{id}/metrics)
METRIC_KEYS = ("train_loss", "train_accuracy", "intra_cos_min", "inter_cos_max", "nc1", "cdnv_mean",
               "nc2_etf_distance", "nc3_self_duality", "ncc_accuracy", "effective_depth", "test_ncc_accuracy")


@lru_cache(maxsize=1)
def templates() -> jinja2.Environment:
    """The template environment (autoescaping on: every value is HTML-escaped)."""
    return jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).resolve().parents[1] / "templates"),
                              autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined)


def render(name: str, **context: Any) -> HTMLResponse:
    context.setdefault("refresh", None)
    return HTMLResponse(templates().get_template(name).render(**context),
                        headers={"Cache-Control": "no-cache"})


@router.get("/", response_class=HTMLResponse)
def index(session: SessionDep, owner: OwnerDep,
          limit: int = Query(50, ge=1, le=500)) -> HTMLResponse:
    """The latest sweeps (with state and progress over their jobs) and the latest jobs."""
    jobs, _ = dbjobs.list_jobs(session, owner=owner, limit=limit)
    sweeps_rows, _ = dbjobs.list_sweeps(session, owner=owner, limit=limit)
    sweeps = []
    for row in sweeps_rows:
        out = sweep_json(row.id, session, owner)
        sweeps.append({"id": row.id, "name": row.name, "preset": row.preset, "status": out.status,
                       "progress": out.progress, "jobs": len(out.jobs), "created_at": row.created_at})
    job_rows = [{"id": j.id, "kind": j.kind, "sweep_id": j.sweep_id, "status": j.status, "attempts": j.attempts,
                 "progress": Progress.of(j.progress_epoch, j.progress_total), "created_at": j.created_at}
                for j in jobs]
    busy = any(j["status"] not in TERMINAL for j in job_rows)
    return render("index.html", sweeps=sweeps, jobs=job_rows, refresh=REFRESH_SECONDS if busy else None)


@router.get("/ui/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: str, session: SessionDep, owner: OwnerDep) -> HTMLResponse:
    """A job: state, progress, error, training curves and its latest metric points."""
    job = dbjobs.get_job(session, job_id, owner=owner)
    latest = dbjobs.latest_metrics(session, job.id)
    keys = [k for k in METRIC_KEYS if any(k in (p.metrics or {}) for p in latest)]
    has_curves = job.kind == "train" and any("train_loss" in (p.metrics or {}) for p in latest)
    return render("job.html", job=job, progress=Progress.of(job.progress_epoch, job.progress_total),
                  metric_rows=latest, metric_keys=keys, has_curves=has_curves,
                  refresh=None if job.status in TERMINAL else REFRESH_SECONDS)


@router.get("/ui/sweeps/{sweep_id}", response_class=HTMLResponse)
def sweep_page(sweep_id: str, session: SessionDep, owner: OwnerDep) -> HTMLResponse:
    """A sweep: its jobs and, once a run has finished, Figure 3.1 and (per-layer sweeps) Figure 3.3."""
    out = sweep_json(sweep_id, session, owner)
    sweep = dbjobs.get_sweep(session, sweep_id, owner=owner)
    rows = dbjobs.sweep_jobs(session, sweep.id)
    figures: list[tuple[str, str]] = []
    if any(j.status == "succeeded" for j in rows):
        figures.append(("fig3.1", "Figure 3.1: last-layer cosines vs weight decay"))
        layers = ((sweep.spec.get("base") or {}).get("measure") or {}).get("layers")
        if layers == "all" or "measure.layers" in (sweep.spec.get("grid") or {}):
            figures.append(("fig3.3", "Figure 3.3: per-layer NC and effective depth"))
    jobs = [{"id": j.id, "status": j.status, "attempts": j.attempts, "runs": len(j.config.get("runs") or []),
             "progress": Progress.of(j.progress_epoch, j.progress_total)} for j in rows]
    return render("sweep.html", sweep=sweep, status=out.status, progress=out.progress, runs=out.runs, jobs=jobs,
                  figures=figures, version=sum(j.version for j in rows),
                  refresh=None if out.status in ("succeeded", "failed", "canceled") else REFRESH_SECONDS)
