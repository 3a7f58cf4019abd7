"""FastAPI dependencies, each a named ``Annotated`` alias, so a route's signature lists what it needs.

Everything comes from ``request.app.state`` (filled by :func:`api.app.create_app`), never from module globals:
tests replace any of them with ``app.dependency_overrides[get_x] = ...``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.auth import Principal, principal
from api.queue import CeleryProducer, JobQueue
from ncservice.settings import Settings


def get_settings(request: Request) -> Settings:
    """The settings the app was built with."""
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """One SQLAlchemy session per request; ``db.jobs`` functions commit it themselves."""
    session = request.app.state.sessionmaker()
    try:
        yield session
    finally:
        session.close()


def get_queue(request: Request) -> JobQueue:
    """The Celery producer, built on first use (so an app that never enqueues never touches the broker)."""
    state = request.app.state
    if getattr(state, "queue", None) is None:
        state.queue = CeleryProducer(state.settings)
    return state.queue


#: ``Authorization: Bearer <key>`` (also declares the security scheme in the OpenAPI document)
bearer_scheme = HTTPBearer(auto_error=False, description="An API key made by `ncservice keys create`.")


def get_principal(request: Request, settings: Annotated[Settings, Depends(get_settings)],
                  session: Annotated[Session, Depends(get_session)],
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)] = None,
                  ) -> Principal:
    """The caller, from its API key (``api.auth``); 401 problem+json when a key is required or wrong."""
    return principal(request, settings, session, credentials)


def get_owner(who: Annotated[Principal, Depends(get_principal)]) -> str | None:
    """The caller's owner id that scopes rows: its key id, or ``None`` for an admin key (or when auth is off on
    loopback), which sees every row. Another key's rows answer 404 (``db.jobs`` filters by owner)."""
    return who.owner


def idempotency_key(
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
