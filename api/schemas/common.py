"""Shapes shared by several resources: cursor pages, progress, errors."""

from __future__ import annotations

from typing import Generic, TypeVar

from pydantic import BaseModel, Field

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """One page of a list. Pass ``next_cursor`` back as ``?cursor=`` for the next page; ``null`` = last page."""

    items: list[T]
    next_cursor: str | None = Field(None, description="Opaque cursor of the next page, or null at the end.")


class Progress(BaseModel):
    """Training progress in epochs (UFM: steps); ``fraction`` in [0, 1], null before the worker reports."""

    epoch: int | None = Field(None, examples=[12])
    total: int | None = Field(None, examples=[300])
    fraction: float | None = Field(None, examples=[0.04])

    @classmethod
    def of(cls, epoch: int | None, total: int | None) -> Progress:
        frac = None
        if epoch is not None and total:
            frac = max(0.0, min(1.0, epoch / total))
        return cls(epoch=epoch, total=total, fraction=frac)


class JobError(BaseModel):
    """Why a job failed: a stable code and a human-readable message."""

    code: str | None = Field(None, examples=["input-error"])
    message: str | None = Field(None, examples=["labels: one-hot labels given"])
