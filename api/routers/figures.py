"""Figures as PNG: ``GET /sweeps/{id}/figures/{name}.png`` and ``GET /jobs/{id}/figures/{name}.png``.

The figures are drawn by :mod:`ncservice.figures` (matplotlib Agg, no pyplot) from the same rows the JSON
endpoints serve, so a PNG fetched here equals the one ``ncservice reproduce`` draws client side:

- ``fig3.1`` (any sweep): thesis Figure 3.1, last-layer min intra / max inter cosine vs weight decay, one line
  per batch-norm mode, from the runs' final metrics (``GET /sweeps/{id}/results``).
- ``fig3.3`` (a sweep that measured every layer, e.g. preset ``thesis-fig3.3``): thesis Figure 3.3, per-layer
  NCC accuracy / intra / inter cosine at the last epoch and the effective depth vs weight decay.
- ``training_curves`` (a job): loss, accuracy, cosines and NC1 vs epoch of one run (``run_index``, ``layer``).

Errors (problem+json): unknown figure name -> 404 ``unknown-figure`` (field ``name``); a figure the data cannot
give (``fig3.3`` without per-layer points) -> 404 ``figure-not-available``; no data yet -> 409
``figure-not-ready`` with ``Retry-After``.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query
from fastapi.responses import Response

from api.deps import OwnerDep, SessionDep, SettingsDep
from api.problems import ApiProblem, problem_responses
from api.routers.sweeps import result_rows
from db import jobs as dbjobs
from ncservice import figures

router = APIRouter(tags=["figures"])

SWEEP_FIGURES = ("fig3.1", "fig3.3")
JOB_FIGURES = ("training_curves",)

_PNG = {200: {"content": {"image/png": {}}, "description": "The figure as a PNG image"},
        304: {"description": "Not modified since the ETag given in If-None-Match"}}


def _unknown(name: str, known: tuple[str, ...]) -> ApiProblem:
    return ApiProblem(404, "unknown-figure", f"no figure named {name!r}; known: {', '.join(known)}", field="name",
                      extra={"expected": " | ".join(known)})


def _not_ready(detail: str, settings: Any) -> ApiProblem:
    return ApiProblem(409, "figure-not-ready", detail, headers={"Retry-After": str(settings.retry_after_seconds)})


def _png_response(png: bytes, etag: str, name: str) -> Response:
    return Response(png, media_type="image/png",
                    headers={"ETag": etag, "Cache-Control": "no-cache",
                             "Content-Disposition": f'inline; filename="{name}.png"'})


def _etag(*parts: Any) -> str:
    """An ETag over the versions of the rows a figure is drawn from (rows change -> new ETag)."""
    return '"' + hashlib.sha256(repr(parts).encode()).hexdigest()[:32] + '"'


def _not_modified(if_none_match: str | None, etag: str) -> bool:
    return bool(if_none_match) and etag in [t.strip().removeprefix("W/") for t in if_none_match.split(",")]


def sweep_layer_rows(session: Any, jobs: list[Any], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Layer rows of :func:`ncservice.figures.build_fig33`: each succeeded run's metric points of its latest
    epoch at layers >= 0, merged with the run's weight decay, seed and effective depth."""
    by_run = {(r["job_id"], int(r["run_index"])): r for r in runs
              if r.get("status") == "succeeded" and r.get("config.measure.layers") == "all"}
    out: list[dict[str, Any]] = []
    for job in jobs:
        if job.status != "succeeded":
            continue
        for point in dbjobs.latest_metrics(session, job.id):
            run = by_run.get((job.id, point.run_index))
            if run is None or point.layer < 0:
                continue
            row = dict(point.metrics or {})
            row.update(layer=point.layer, run_index=point.run_index, job_id=job.id,
                       weight_decay=figures._get(run, "weight_decay", "run row"),
                       seed=figures._get(run, "seed", "run row", default=None),
                       effective_depth=run.get("effective_depth"))
            out.append(row)
    return out


@router.get("/sweeps/{sweep_id}/figures/{name}.png", response_class=Response,
            summary="A sweep's figure as PNG (fig3.1, fig3.3)",
            responses={**_PNG, **problem_responses(404, 409)})
def sweep_figure(sweep_id: str, name: str, session: SessionDep, settings: SettingsDep, owner: OwnerDep,
                 if_none_match: Annotated[str | None, Header()] = None) -> Response:
    """``fig3.1``: thesis Figure 3.1 (any sweep). ``fig3.3``: thesis Figure 3.3 (a sweep whose runs measured
    every layer, ``measure.layers = "all"``, e.g. preset ``thesis-fig3.3``). Runs that did not reach 100%
    training accuracy are marked on the figure, runs without a result are counted in its title.
    ``ETag`` changes whenever one of the sweep's jobs does."""
    if name not in SWEEP_FIGURES:
        raise _unknown(name, SWEEP_FIGURES)
    sweep = dbjobs.get_sweep(session, sweep_id, owner=owner)
    jobs = dbjobs.sweep_jobs(session, sweep.id)
    etag = _etag(name, sweep.id, [(j.id, j.version) for j in jobs])
    if _not_modified(if_none_match, etag):
        return Response(status_code=304, headers={"ETag": etag})
    runs = result_rows(jobs)
    if not any(r.get("status") == "succeeded" for r in runs):
        raise _not_ready(f"sweep {sweep.id} has no finished run yet", settings)
    title = f"{sweep.name}, sweep {sweep.id[:8]}"
    if name == "fig3.1":
        png = figures.fig31(runs, title=f"Figure 3.1: {title}")
    else:
        layers = sweep_layer_rows(session, jobs, runs)
        if not layers:
            raise ApiProblem(404, "figure-not-available", "fig3.3 needs per-layer metrics: this sweep's runs "
                             "measured the last layer only (measure.layers = 'all' draws it)", field="name")
        png = figures.fig33(layers, runs, title=f"Figure 3.3: {title}")
    return _png_response(png, etag, name)


@router.get("/jobs/{job_id}/figures/{name}.png", response_class=Response,
            summary="A job's figure as PNG (training_curves)",
            responses={**_PNG, **problem_responses(404, 409, 422)})
def job_figure(job_id: str, name: str, session: SessionDep, settings: SettingsDep, owner: OwnerDep,
               run_index: Annotated[int, Query(ge=0, description="run of the bundle")] = 0,
               layer: Annotated[int | None, Query(ge=-1, description="default: the deepest layer measured")] = None,
               if_none_match: Annotated[str | None, Header()] = None) -> Response:
    """``training_curves``: training loss, accuracy, min intra / max inter cosine and NC1 vs epoch of run
    ``run_index`` at ``layer`` (default the deepest layer measured: the features feeding the classifier).
    Drawn from the metric history, so it is available while the job runs."""
    if name not in JOB_FIGURES:
        raise _unknown(name, JOB_FIGURES)
    job = dbjobs.get_job(session, job_id, owner=owner)
    etag = _etag(name, job.id, job.version, run_index, layer)
    if _not_modified(if_none_match, etag):
        return Response(status_code=304, headers={"ETag": etag})
    points = dbjobs.metric_history(session, job.id, run_index=run_index)
    history = [{"run_index": p.run_index, "epoch": p.epoch, "layer": p.layer, "metrics": p.metrics} for p in points]
    if layer is not None:
        history = [h for h in history if h["layer"] == layer]
    usable = [h for h in history if "train_loss" in (h["metrics"] or {})]
    if not usable:
        if job.status in ("succeeded", "failed", "canceled") or points:
            raise ApiProblem(404, "figure-not-available", f"job {job.id} has no training metrics for "
                             f"run_index={run_index}, layer={layer}", field="run_index" if not points else "layer")
        raise _not_ready(f"job {job.id} has no metric point yet", settings)
    png = figures.training_curves(usable, run_index=run_index, layer=layer,
                                  title=f"Training curves: job {job.id[:8]}, run {run_index}")
    return _png_response(png, etag, name)
