"""A small server-rendered dashboard (jinja2 templates in ``api/templates``, no JavaScript, no build step).

- ``/``: the latest sweeps and jobs with their state and progress;
- ``/ui/jobs/{id}``: a job, its training curves (``/jobs/{id}/figures/training_curves.png``) and its latest
  metrics (every run and layer of the latest epoch);
- ``/ui/sweeps/{id}``: a sweep, its jobs and its Figure 3.1 / 3.3 (``/sweeps/{id}/figures/...``).

Pages refresh themselves (``<meta http-equiv="refresh">``) while something waits or runs. They read the
same rows as the JSON API, scoped to the caller like it (``PrincipalDep``). Not in the OpenAPI document.

A browser cannot send ``Authorization: Bearer``, so where keys are required the pages log in:

- ``GET /ui/login`` asks for an API key (or says that none is needed: auth off, or no key exists on loopback);
- ``POST /ui/login`` (form field ``api_key``, optional ``next``) checks it like the Bearer path
  (``api.auth.key_principal``) and answers 303 to ``next`` (a local path only, else ``/``) with the key in the
  HttpOnly, ``SameSite=Strict`` cookie ``api.auth.SESSION_COOKIE`` (12 h), or the form again with 401;
- ``POST /ui/logout`` clears the cookie.

The cookie is a credential for GET and HEAD requests only (``api.auth``): the pages and the figures they
embed.
A page whose caller has no valid key (none, or an unknown or revoked one in the cookie) answers 303 to
``/ui/login?next=<the page>``; the JSON API keeps answering 401 problem+json. An unknown (or another key's)
job or sweep answers a small HTML page with status 404 (``not_found.html``), not problem+json.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

import jinja2
from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.routing import APIRoute

from api.auth import SESSION_COOKIE, auth_required, key_principal
from api.deps import PrincipalDep, SessionDep, SettingsDep
from api.problems import ApiProblem
from api.routers.sweeps import get_sweep as sweep_json
from api.schemas.common import Progress
from db import jobs as dbjobs
from db.errors import NotFound
from db.models import TERMINAL


class DashboardRoute(APIRoute):
    """A dashboard route: a 401 (no key where one is required, or a wrong one) becomes a 303 to the login
    page, which comes back to this page afterwards; a 404 (unknown job or sweep) becomes an HTML page."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except NotFound as exc:
                return render("not_found.html", status_code=404, entity=str(exc.entity), ident=str(exc.id),
                              logged_in=SESSION_COOKIE in request.cookies)
            except ApiProblem as exc:
                if exc.status == 404:
                    return render("not_found.html", status_code=404, entity="page",
                                  ident=request.url.path, logged_in=SESSION_COOKIE in request.cookies)
                if exc.status != 401:
                    raise
                here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse(f"/ui/login?next={quote(here, safe='')}", status_code=303,
                                        headers={"Cache-Control": "no-store"})

        return route


router = APIRouter(include_in_schema=False, route_class=DashboardRoute)

REFRESH_SECONDS = 5
#: lifetime of the login cookie (seconds): a working day, then the key is asked again
SESSION_MAX_AGE = 12 * 3600
#: metric columns of the job page, in this order (others are in GET /jobs/{id}/metrics)
METRIC_KEYS = ("train_loss", "train_accuracy", "intra_cos_min", "inter_cos_max", "nc1", "cdnv_mean",
               "nc2_etf_distance", "nc3_self_duality", "ncc_accuracy", "effective_depth", "test_ncc_accuracy")


@lru_cache(maxsize=1)
def templates() -> jinja2.Environment:
    """The template environment (autoescaping on: every value is HTML-escaped)."""
    return jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).resolve().parents[1] / "templates"),
                              autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined)


def render(name: str, *, status_code: int = 200, **context: Any) -> HTMLResponse:
    """A page; ``logged_in`` (the caller's key came from the login cookie) shows "log out" in the header."""
    context.setdefault("refresh", None)
    context.setdefault("logged_in", False)
    return HTMLResponse(templates().get_template(name).render(**context), status_code=status_code,
                        headers={"Cache-Control": "no-cache"})


def safe_next(value: str | None) -> str:
    """``value`` when it is a path on this site (one leading ``/``, no scheme, host, backslash or control
    character), else ``/``: the login page never sends the browser off-site (``//evil.example``)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):  # browsers drop tabs and newlines: "/\t/evil"
        return "/"
    parts = urlsplit(value)
    return "/" if parts.scheme or parts.netloc else value


@router.get("/ui/login", response_class=HTMLResponse)
def login_form(request: Request, settings: SettingsDep, session: SessionDep,
               next_: Annotated[str, Query(alias="next")] = "/") -> HTMLResponse:
    """The login form, or (auth off, or no key exists on loopback) a note that no login is needed; a stale
    cookie is then cleared, so a key revoked meanwhile cannot lock the pages."""
    required = auth_required(request, settings, session)
    resp = render("login.html", required=required, next=safe_next(next_), error=None,
                  logged_in=required and SESSION_COOKIE in request.cookies)
    if not required and SESSION_COOKIE in request.cookies:
        _clear_cookie(request, resp)
    return resp


@router.post("/ui/login", response_class=HTMLResponse)
def login(request: Request, settings: SettingsDep, session: SessionDep,
          api_key: Annotated[str, Form()] = "", next_: Annotated[str, Form(alias="next")] = "/") -> Response:
    """Check ``api_key`` like a Bearer key: 303 to ``next`` with the login cookie, or the form again (401)."""
    target = safe_next(next_)
    if not auth_required(request, settings, session):
        return render("login.html", required=False, next=target, error=None)
    token = api_key.strip()
    if not token or key_principal(session, token) is None:
        return render("login.html", status_code=401, required=True, next=target,
                      error="unknown or revoked API key" if token else "enter an API key")
    resp = RedirectResponse(target, status_code=303, headers={"Cache-Control": "no-store"})
    resp.set_cookie(SESSION_COOKIE, token, max_age=SESSION_MAX_AGE, path="/", httponly=True,
                    samesite="strict", secure=request.url.scheme == "https")
    return resp


@router.post("/ui/logout")
def logout(request: Request) -> Response:
    """Clear the login cookie; 303 to the login page."""
    resp = RedirectResponse("/ui/login", status_code=303, headers={"Cache-Control": "no-store"})
    _clear_cookie(request, resp)
    return resp


def _clear_cookie(request: Request, resp: Response) -> None:
    resp.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict",
                       secure=request.url.scheme == "https")


@router.get("/", response_class=HTMLResponse)
def index(session: SessionDep, who: PrincipalDep,
          limit: int = Query(50, ge=1, le=500)) -> HTMLResponse:
    """The latest sweeps (with state and progress over their jobs) and the latest jobs."""
    owner = who.owner
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
    return render("index.html", sweeps=sweeps, jobs=job_rows, refresh=REFRESH_SECONDS if busy else None,
                  logged_in=who.cookie)


@router.get("/ui/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: str, session: SessionDep, who: PrincipalDep) -> HTMLResponse:
    """A job: state, progress, error, training curves and its latest metric points."""
    job = dbjobs.get_job(session, job_id, owner=who.owner)
    latest = dbjobs.latest_metrics(session, job.id)
    keys = [k for k in METRIC_KEYS if any(k in (p.metrics or {}) for p in latest)]
    has_curves = job.kind == "train" and any("train_loss" in (p.metrics or {}) for p in latest)
    return render("job.html", job=job, progress=Progress.of(job.progress_epoch, job.progress_total),
                  metric_rows=latest, metric_keys=keys, has_curves=has_curves,
                  refresh=None if job.status in TERMINAL else REFRESH_SECONDS, logged_in=who.cookie)


@router.get("/ui/sweeps/{sweep_id}", response_class=HTMLResponse)
def sweep_page(sweep_id: str, session: SessionDep, who: PrincipalDep) -> HTMLResponse:
    """A sweep: its jobs and, once a run has finished, Figure 3.1 and (per-layer sweeps) Figure 3.3."""
    owner = who.owner
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
                  refresh=None if out.status in ("succeeded", "failed", "canceled") else REFRESH_SECONDS,
                  logged_in=who.cookie)
