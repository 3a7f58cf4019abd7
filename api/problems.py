"""RFC 9457 problem details (``application/problem+json``) for every error the API returns.

This module is the only place where errors become HTTP responses. Every body has ``type``, ``title``,
``status``, ``detail``, ``instance`` and, when one input is at fault, ``field`` (a dotted path such as
``features``, ``config.optim.lr`` or ``query.limit``). Validation errors also list every problem in
``errors``. Mapping (see ``install_problem_handlers``):

==============================================  ======  ==============================
error                                           status  type (``urn:ncs:problem:...``)
==============================================  ======  ==============================
``ApiProblem`` (raised by routes)               any     its own code
``HTTPException`` (FastAPI/Starlette)           any     ``http-<status>``
``RequestValidationError`` / pydantic errors    422     ``validation-error``
  ... on a JSON body sent as another media type 415     ``unsupported-media-type``
``ncengine.errors.InputError``                  422     ``input-error``
``db.errors.NotFound``                          404     ``not-found``
``db.errors.TransitionRejected``                409     ``transition-rejected``
``db.errors.IdempotencyConflict``               422     ``idempotency-conflict``
``db.errors.InvalidCursor``                     422     ``invalid-cursor``
SQLAlchemy Operational/Interface/Timeout error  503     ``database-unavailable`` (+ Retry-After)
anything else                                   500     ``internal-error`` (no internals)
==============================================  ======  ==============================

Reference: RFC 9457, "Problem Details for HTTP APIs" (https://www.rfc-editor.org/rfc/rfc9457).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ncengine.errors import InputError

log = logging.getLogger("ncservice.api")

PROBLEM_JSON = "application/problem+json"
TYPE_PREFIX = "urn:ncs:problem:"


class Problem(BaseModel):
    """An RFC 9457 problem details object, as every error response body of this API."""

    type: str = Field(examples=["urn:ncs:problem:input-error"], description="URI naming the problem type.")
    title: str = Field(examples=["Invalid input"], description="Short summary of the problem type.")
    status: int = Field(examples=[422], description="The HTTP status code.")
    detail: str | None = Field(None, examples=["labels: one-hot labels given (expected integer class ids)"])
    instance: str | None = Field(None, examples=["/measure"], description="The request path.")
    field: str | None = Field(None, examples=["labels"], description="Dotted path of the input at fault.")
    errors: list[dict[str, Any]] | None = Field(None, description="Every validation problem (422 only).")


class ApiProblem(Exception):
    """An error a route raises on purpose; rendered as problem+json by ``install_problem_handlers``.

    Args:
        status: HTTP status code.
        code: short kebab-case problem code, appended to ``urn:ncs:problem:``.
        detail: human-readable explanation for this occurrence.
        field: dotted path of the input at fault, if one is.
        headers: extra response headers (e.g. ``Retry-After``).
        title: overrides the default title (the HTTP reason phrase).
    """

    def __init__(self, status: int, code: str, detail: str, *, field: str | None = None,
                 headers: dict[str, str] | None = None, title: str | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.field = field
        self.headers = headers
        self.title = title or HTTPStatus(status).phrase
        self.extra = extra or {}


def problem_response(request: Request | None, status: int, code: str, title: str, detail: str | None, *,
                     field: str | None = None, errors: list[dict[str, Any]] | None = None,
                     headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None,
                     ) -> JSONResponse:
    """Build an ``application/problem+json`` response (RFC 9457)."""
    body: dict[str, Any] = {"type": TYPE_PREFIX + code, "title": title, "status": status, "detail": detail,
                            "instance": request.url.path if request is not None else None}
    if field is not None:
        body["field"] = field
    if errors is not None:
        body["errors"] = errors
    if extra:
        body.update(extra)
    return JSONResponse(jsonable_encoder(body), status_code=status, headers=headers, media_type=PROBLEM_JSON)


#: ``Retry-After`` of a 503 answered while the database is unreachable
DB_RETRY_AFTER_SECONDS = 2

#: tags of the tagged unions in request bodies (``kind`` of POST /jobs, the two POST /sweeps forms); pydantic
#: puts the tag into an error's location, which would not name a field of the body the client sent
UNION_TAGS = frozenset({"train", "ufm", "measure", "preset", "spec"})
_GRID_ENTRY = re.compile(r"^(?:Value error, )?grid\.([\w.]+)\[\d+\]")


def dotted(loc: Sequence[Any], *, drop_body: bool = True) -> str:
    """Turn a pydantic/FastAPI error location into a dotted field path.

    ``("body", "config", "optim", "lr")`` -> ``"config.optim.lr"``; ``("query", "limit")`` -> ``"query.limit"``;
    list indices stay as numbers (``"seeds.0"``); a tagged-union tag right after ``body`` is dropped
    (``("body", "train", "config", "seed")`` -> ``"config.seed"``).
    """
    parts = [str(p) for p in loc]
    if drop_body and parts and parts[0] == "body":
        parts = parts[1:]
        if parts and parts[0] in UNION_TAGS:
            parts = parts[1:]
    return ".".join(parts) if parts else "body"


def validation_errors(errors: Sequence[dict[str, Any]], *, prefix: str = "") -> list[dict[str, Any]]:
    """JSON-safe list of ``{field, message, type}`` from pydantic's ``errors()``."""
    out = []
    for e in errors:
        path = dotted(e.get("loc", ()))
        grid = _GRID_ENTRY.match(str(e.get("msg", "")))
        if path == "body" and grid:  # ncengine.sweep names a bad grid value as "grid.<key>[<i>] = ..."
            path = f"grid.{grid.group(1)}"
        elif path == "body" and "grid x seeds gives" in str(e.get("msg", "")):  # ncengine.sweep's run count
            path = "grid"
        if e.get("type") in ("union_tag_invalid", "union_tag_not_found"):
            tag = str((e.get("ctx") or {}).get("discriminator", "")).strip("'")
            if tag:
                path = tag if path == "body" else f"{path}.{tag}"
        if prefix:
            path = prefix if path == "body" else f"{prefix}.{path}"
        out.append({"field": path, "message": str(e.get("msg", "")), "type": str(e.get("type", ""))})
    return out


def validation_problem(request: Request | None, errors: list[dict[str, Any]], *,
                       status: int = 422) -> JSONResponse:
    """422 problem+json for a list of ``{field, message}``; ``field`` names the first one."""
    first = errors[0] if errors else {"field": "body", "message": "invalid request"}
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:10]) or first["message"]
    return problem_response(request, status, "validation-error", "Request validation failed", detail,
                            field=first["field"], errors=errors)


async def _api_problem(request: Request, exc: ApiProblem) -> JSONResponse:
    return problem_response(request, exc.status, exc.code, exc.title, exc.detail, field=exc.field,
                            headers=exc.headers, extra=exc.extra)


async def _http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    try:
        title = HTTPStatus(exc.status_code).phrase
    except ValueError:
        title = "Error"
    detail = exc.detail if isinstance(exc.detail, str) else title
    return problem_response(request, exc.status_code, f"http-{exc.status_code}", title, detail,
                            headers=getattr(exc, "headers", None))


def _is_json(request: Request) -> bool:
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _validation_response(request: Request, errors: list[dict[str, Any]]) -> JSONResponse:
    # A JSON route's body sent as another media type (a form, text, none) was never parsed: 415, saying so.
    if errors and all(e["field"] == "body" for e in errors) and request.headers.get("content-type") \
            and not _is_json(request):
        return problem_response(request, 415, "unsupported-media-type", "Unsupported Media Type",
                                f"the request body must be JSON sent with 'Content-Type: application/json', "
                                f"not {request.headers['content-type']!r}", field="body")
    # A body that is not JSON at all is a syntax problem (400), not a validation one (422).
    if any(e["type"] == "json_invalid" for e in errors):
        return problem_response(request, 400, "malformed-json", "Malformed request body",
                                "the request body is not valid JSON", field="body", errors=errors)
    return validation_problem(request, errors)


async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _validation_response(request, validation_errors(exc.errors()))


async def _pydantic_validation(request: Request, exc: ValidationError) -> JSONResponse:
    return _validation_response(request, validation_errors(exc.errors(include_url=False)))


async def _input_error(request: Request, exc: InputError) -> JSONResponse:
    extra = {"expected": exc.expected} if exc.expected else None
    return problem_response(request, 422, "input-error", "Invalid input", str(exc), field=exc.field,
                            extra=extra)


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem_response(request, 500, "internal-error", "Internal Server Error",
                            "an internal error occurred; it has been logged")


def _db_handlers() -> dict[type[Exception], Any]:
    """Handlers for ``db.errors``: NotFound 404, TransitionRejected 409, IdempotencyConflict 422."""
    from db import errors as dberr

    async def not_found(request: Request, exc: dberr.NotFound) -> JSONResponse:
        entity = getattr(exc, "entity", "resource")
        ident = getattr(exc, "id", None)
        return problem_response(request, 404, "not-found", "Not Found", f"{entity} {ident!s} not found",
                                field="id", extra={"entity": str(entity)})

    async def rejected(request: Request, exc: dberr.TransitionRejected) -> JSONResponse:
        status = getattr(exc, "status", None)
        status = getattr(status, "value", status)
        wanted = getattr(exc, "wanted", None)
        wanted = getattr(wanted, "value", wanted)
        return problem_response(
            request, 409, "transition-rejected", "Conflict",
            f"job {getattr(exc, 'job_id', '?')} is {status}; it cannot go to {wanted}",
            field="status", extra={"job_status": status})

    async def idem(request: Request, exc: dberr.IdempotencyConflict) -> JSONResponse:
        return problem_response(
            request, 422, "idempotency-conflict", "Idempotency-Key reused",
            "this Idempotency-Key was already used with a different request body",
            field="Idempotency-Key")

    async def bad_cursor(request: Request, exc: Exception) -> JSONResponse:
        return problem_response(request, 422, "invalid-cursor", "Invalid cursor",
                                "this cursor was not produced by this API (or has expired)", field="cursor")

    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path, type(exc).__name__)
        return problem_response(request, 503, "database-unavailable", "Service Unavailable",
                                "the database is unreachable or busy; retry shortly", field="database",
                                headers={"Retry-After": str(DB_RETRY_AFTER_SECONDS)})

    from sqlalchemy import exc as saexc

    handlers: dict[type[Exception], Any] = {dberr.NotFound: not_found, dberr.TransitionRejected: rejected,
                                            dberr.IdempotencyConflict: idem,
                                            # driver-level failures (server down/restarting, network, locked
                                            # SQLite, pool exhausted): transient, 503 + Retry-After, never 500
                                            saexc.OperationalError: unavailable, saexc.InterfaceError: unavailable,
                                            saexc.TimeoutError: unavailable}
    if hasattr(dberr, "InvalidCursor"):
        handlers[dberr.InvalidCursor] = bad_cursor
    return handlers


def install_problem_handlers(app: FastAPI) -> None:
    """Register the problem+json exception handlers on ``app`` (see the module docstring for the mapping)."""
    app.add_exception_handler(ApiProblem, _api_problem)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(ValidationError, _pydantic_validation)
    app.add_exception_handler(InputError, _input_error)
    for exc_type, handler in _db_handlers().items():
        app.add_exception_handler(exc_type, handler)
    app.add_exception_handler(Exception, _unhandled)


#: ``responses=`` entries for route decorators, so the OpenAPI lists the problem bodies.
def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": Problem, "description": HTTPStatus(s).phrase,
                "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
            for s in statuses}
