"""Errors raised by ``db``. One root (:class:`DBError`), a shallow tree beneath it.

The API maps them to problem+json (404 NotFound, 409 TransitionRejected / IdempotencyConflict,
422 InvalidCursor); the worker treats :class:`LeaseLost` as "stop, someone else owns this job now".
"""

from __future__ import annotations


class DBError(Exception):
    """Root of every error ``db`` raises on purpose."""


class NotFound(DBError):
    """The row does not exist, or belongs to another owner."""

    def __init__(self, entity: str, id: str) -> None:  # noqa: A002 - contract name
        self.entity = entity
        self.id = id
        super().__init__(f"{entity} {id!r} not found")


class TransitionRejected(DBError):
    """A job transition's conditional UPDATE matched no row: the job is not in an allowed state."""

    def __init__(self, job_id: str, status: str | None, wanted: str) -> None:
        self.job_id = job_id
        self.status = status
        self.wanted = wanted
        super().__init__(f"job {job_id!r} is {status!r}; cannot move it to {wanted!r}")


class LeaseLost(DBError):
    """The worker no longer holds the job's lease (it expired and another worker claimed the job,
    or the job reached a terminal state)."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"lease on job {job_id!r} lost")


class IdempotencyConflict(DBError):
    """An ``Idempotency-Key`` was reused with a different request body."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"Idempotency-Key {key!r} was already used with a different request body")


class InvalidCursor(DBError):
    """A pagination cursor that this module did not produce (field ``cursor``)."""

    field = "cursor"

    def __init__(self, cursor: str) -> None:
        self.cursor = cursor
        super().__init__(f"invalid cursor {cursor!r}")
