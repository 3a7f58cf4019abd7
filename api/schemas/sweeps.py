"""Request/response models of ``/sweeps``: a ``SweepSpec`` (from ``ncengine.sweep``) or a thesis preset."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from api.schemas.common import Progress
from api.schemas.jobs import CallbackUrl, JobAccepted, JobStatusName, JobSummary
from ncengine.sweep import PRESETS, SweepSpec

PresetName = Literal[PRESETS]  # type: ignore[valid-type]  # ("thesis-fig3.1", "thesis-fig3.3")


class PresetSweepCreate(BaseModel):
    """One of the thesis's sweeps (``ncengine.sweep.preset``); ``small`` is a quick demo scale."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"preset": "thesis-fig3.1", "scale": "small"}]})

    preset: PresetName
    scale: Literal["small", "full"] = "small"
    name: str | None = Field(None, max_length=200)
    callback_url: CallbackUrl = None


class SpecSweepCreate(SweepSpec):
    """A base ``RunConfig``, a grid over its dotted keys, and seeds (``ncengine.sweep.SweepSpec``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={"examples": [{
        "name": "wd-vs-bn",
        "base": {"data": {"name": "teacher", "n": 200}, "model": {"depth": 3, "width": 32},
                 "schedule": {"epochs": 20}, "measure": {"every": 5}},
        "grid": {"model.batch_norm": ["affine", "none"], "optim.weight_decay": [1e-4, 1e-3]},
        "seeds": [0, 1]}]})

    name: str | None = Field(None, max_length=200)
    callback_url: CallbackUrl = None

    def spec(self) -> SweepSpec:
        return SweepSpec.model_validate(self.model_dump(exclude={"name", "callback_url"}))


def _which(value: Any) -> str:
    if isinstance(value, dict):
        return "preset" if "preset" in value else "spec"
    return "preset" if isinstance(value, PresetSweepCreate) else "spec"


SweepCreate = Annotated[Annotated[PresetSweepCreate, Tag("preset")] | Annotated[SpecSweepCreate, Tag("spec")],
                        Discriminator(_which)]


class SweepAccepted(BaseModel):
    """Answer of POST /sweeps: one queued train job per bundle; poll ``location``."""

    id: str = Field(examples=["9a7b6c5d4e3f2a1b3f2b9c0e8a1d4e5f"])
    location: str = Field(examples=["/sweeps/9a7b6c5d4e3f2a1b3f2b9c0e8a1d4e5f"])
    runs: int = Field(examples=[21], description="Runs the sweep expanded to.")
    jobs: list[JobAccepted]


SweepStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]


class SweepOut(BaseModel):
    """A sweep with its jobs and an aggregate state."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "9a7b6c5d4e3f2a1b3f2b9c0e8a1d4e5f", "name": "thesis-fig3.1 (small)", "preset": "thesis-fig3.1",
        "spec": {"base": {"model": {"depth": 6}}, "grid": {"optim.weight_decay": [1e-4, 1e-3]}, "seeds": [0]},
        "created_at": "2026-01-01T12:00:00Z", "status": "running", "counts": {"running": 1},
        "runs": 21, "progress": {"epoch": 30, "total": 60, "fraction": 0.5},
        "jobs": [{"id": "3f2b9c0e8a1d4e5f9a7b6c5d4e3f2a1b", "kind": "train", "status": "running",
                  "sweep_id": "9a7b6c5d4e3f2a1b3f2b9c0e8a1d4e5f",
                  "progress": {"epoch": 30, "total": 60, "fraction": 0.5}, "attempts": 1,
                  "created_at": "2026-01-01T12:00:00Z", "started_at": "2026-01-01T12:00:02Z",
                  "finished_at": None, "version": 40}],
        "links": {"self": "/sweeps/9a7b6c5d4e3f2a1b3f2b9c0e8a1d4e5f",
                  "results": "/sweeps/9a7b6c5d4e3f2a1b3f2b9c0e8a1d4e5f/results"}}]})

    id: str
    name: str
    preset: str | None = None
    spec: dict[str, Any]
    created_at: datetime
    status: SweepStatus = Field(description="queued: nothing started; running: some job waits or runs; else "
                                            "succeeded if all did, failed if any failed, else canceled.")
    counts: dict[str, int] = Field(examples=[{"queued": 1, "running": 1, "succeeded": 1}])
    runs: int
    progress: Progress = Field(description="Epochs done over epochs planned, over all jobs.")
    jobs: list[JobSummary]
    links: dict[str, str]


def sweep_status(statuses: list[JobStatusName]) -> SweepStatus:
    """Aggregate state of a sweep from its jobs' states (see ``SweepOut.status``)."""
    waiting = {"queued", "retrying"}
    if not statuses or all(s in waiting for s in statuses):
        return "queued"
    if any(s in waiting or s in ("running", "cancelling") for s in statuses):
        return "running"
    if all(s == "succeeded" for s in statuses):
        return "succeeded"
    return "failed" if any(s == "failed" for s in statuses) else "canceled"
