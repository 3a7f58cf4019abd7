"""FastAPI dependencies, each a named ``Annotated`` alias, so a route's signature lists what it needs.

Everything comes from ``request.app.state`` (filled by :func:`api.app.create_app`), never from module globals:
tests replace any of them with ``app.dependency_overrides[get_x] = ...``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.auth import Principal, needs_database, principal
from api.queue import CeleryProducer, JobQueue
from ncservice.settings import Settings


# Cheap dependencies are ``async def``: FastAPI runs a plain ``def`` dependency in the threadpool, and each
# such hop costs more than the dependency itself on the polling path (GET /jobs/{id}).

async def get_settings(request: Request) -> Settings:
    """The settings the app was built with."""
    return request.app.state.settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    """One SQLAlchemy session per request; ``db.jobs`` functions commit it themselves. GET and HEAD requests
    get a read session (``app.state.read_sessionmaker``: on SQLite a deferred BEGIN that never waits for the
    worker's writes); every other method a writer's (``BEGIN IMMEDIATE`` on SQLite).

    ``async``: making a session does no I/O, and neither does closing one whose transaction ended (the usual
    case: ``db.jobs`` commits), so both stay on the event loop; a session left in a transaction (an error
    mid-request) is rolled back and closed in the threadpool, never blocking the loop on the database."""
    state = request.app.state
    factory = state.sessionmaker
    if request.method in ("GET", "HEAD"):
        factory = getattr(state, "read_sessionmaker", None) or factory
    session = factory()
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(session.close)
        else:
            session.close()


def get_queue(request: Request) -> JobQueue:
    """The Celery producer, built on first use (so an app that never enqueues never touches the broker)."""
    state = request.app.state
    if getattr(state, "queue", None) is None:
        state.queue = CeleryProducer(state.settings)
    return state.queue


#: ``Authorization: Bearer <key>`` (also declares the security scheme in the OpenAPI document)
bearer_scheme = HTTPBearer(auto_error=False, description="An API key made by `ncservice keys create`.")


async def get_principal(request: Request, settings: Annotated[Settings, Depends(get_settings)],
                        session: Annotated[Session, Depends(get_session)],
                        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)] = None,
                        ) -> Principal:
    """The caller, from its API key (``api.auth``); 401 problem+json when a key is required or wrong. The key
    lookup (one indexed query by the token's sha256) runs in the threadpool; a request that needs no query
    (auth off, or anonymous on loopback with the cached "no keys" answer) is resolved on the event loop."""
    if needs_database(request, settings, credentials):
        return await run_in_threadpool(principal, request, settings, session, credentials)
    return principal(request, settings, session, credentials)


async def get_owner(who: Annotated[Principal, Depends(get_principal)]) -> str | None:
    """The caller's owner id that scopes rows: its key id, or ``None`` for an admin key (or when auth is off on
    loopback), which sees every row. Another key's rows answer 404 (``db.jobs`` filters by owner)."""
    return who.owner


async def idempotency_key(
    key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=200,
                                      description="Retry-safe POST: the same key and body return the same "
                                                  "resource; the same key with another body is refused.")] = None,
) -> str | None:
    return key


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]
OwnerDep = Annotated[str | None, Depends(get_owner)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
IdempotencyKeyDep = Annotated[str | None, Depends(idempotency_key)]


def request_hash(payload: Any) -> str:
    """sha256 of the canonical JSON of a request body (sorted keys, no whitespace) for Idempotency-Key checks."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()
