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
from sqlalchemy.orm import Session

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


def get_owner() -> str | None:
    """The calling principal's owner id used to scope rows; ``None`` is the admin principal (sees every row).

    This API has no authentication of its own yet (issue 7 adds API keys); every caller is the admin
    principal. An auth layer overrides this one dependency.
    """
    return None


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
IdempotencyKeyDep = Annotated[str | None, Depends(idempotency_key)]


def request_hash(payload: Any) -> str:
    """sha256 of the canonical JSON of a request body (sorted keys, no whitespace) for Idempotency-Key checks."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()
