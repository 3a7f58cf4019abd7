"""Request/response models of ``/jobs``. Configs reuse ncengine's models (``RunConfig``, ``UFMConfig``)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field

from api.schemas.common import JobError, Progress
from ncengine.config import RunConfig
from ncengine.ufm import UFMConfig

JobKindName = Literal["train", "measure", "ufm"]
JobStatusName = Literal["queued", "running", "succeeded", "failed", "cancelling", "canceled", "retrying"]

#: optional webhook of a POST /jobs or /sweeps body (issue 8; delivered by ``worker.webhooks``)
CallbackUrl = Annotated[AnyHttpUrl | None, Field(
    None, description="POSTed (JSON, signed: `X-NCS-Signature-256: sha256=<HMAC-SHA256 of the body>`, the "
    "secret from GET /webhooks/secret) once the job or sweep has ended; retried with back-off.",
    examples=["https://lab.example.org/hooks/ncs"])]


class TrainJobCreate(BaseModel):
    """One training run (a one-member bundle) outside any sweep."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "kind": "train",
        "config": {"data": {"name": "teacher", "n": 200}, "model": {"depth": 3, "width": 32},
                   "schedule": {"epochs": 10}, "seed": 0}}]})

    kind: Literal["train"]
    config: RunConfig
    callback_url: CallbackUrl = None


class UFMJobCreate(BaseModel):
    """Gradient descent on the unconstrained features model (thesis eq. 2.1), recording the bound."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["ufm"]
    config: UFMConfig
    callback_url: CallbackUrl = None


JobCreate = Annotated[TrainJobCreate | UFMJobCreate, Field(discriminator="kind")]


class JobAccepted(BaseModel):
    """Answer of a POST that queued work: poll ``location`` (also in the ``Location`` header)."""

    id: str = Field(examples=["3f2b9c0e8a1d4e5f9a7b6c5d4e3f2a1b"])
    kind: JobKindName
    status: JobStatusName = Field(examples=["queued"])
    location: str = Field(examples=["/jobs/3f2b9c0e8a1d4e5f9a7b6c5d4e3f2a1b"])


class MetricPointOut(BaseModel):
    """One recorded measurement: ``metrics`` holds every key of ``ncengine.metrics.measure`` (+ train loss)."""

    run_index: int = Field(examples=[0], description="Member of the bundle (0 for measure/ufm jobs).")
    epoch: int = Field(examples=[10])
    layer: int = Field(examples=[-1], description="Hidden layer index; -1 = last layer / not applicable.")
    metrics: dict[str, Any] = Field(examples=[{"train_loss": 0.31, "nc1": 0.12, "intra_cos_min": 0.91}])


class BoundOut(BaseModel):
    """The bound block of Theorem 2.3.1 recorded at one epoch of one run."""

    run_index: int
    epoch: int
    block: dict[str, Any]


class JobSummary(BaseModel):
    """A job in lists: state and progress, no configs or results."""

    id: str
    kind: JobKindName
    status: JobStatusName
    sweep_id: str | None = None
    progress: Progress
    attempts: int
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    version: int = Field(description="Bumped by every change; the ETag of GET /jobs/{id}.")


class JobOut(JobSummary):
    """Everything about one job, served from SQL only (never from Celery)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "3f2b9c0e8a1d4e5f9a7b6c5d4e3f2a1b", "kind": "train", "status": "running", "sweep_id": None,
        "progress": {"epoch": 12, "total": 60, "fraction": 0.2}, "attempts": 1,
        "created_at": "2026-01-01T12:00:00Z", "started_at": "2026-01-01T12:00:01Z", "finished_at": None,
        "version": 15, "heartbeat_at": "2026-01-01T12:00:30Z", "worker_host": "gpu-node-1", "device": "cuda:0",
        "cancel_requested": False, "config": {"runs": [{"seed": 0}]},
        "latest_metrics": [{"run_index": 0, "epoch": 10, "layer": -1, "metrics": {"nc1": 0.4}}],
        "final": None, "bounds": [], "error": None,
        "links": {"self": "/jobs/3f2b9c0e8a1d4e5f9a7b6c5d4e3f2a1b",
                  "metrics": "/jobs/3f2b9c0e8a1d4e5f9a7b6c5d4e3f2a1b/metrics"}}]})

    heartbeat_at: datetime | None = None
    worker_host: str | None = None
    device: str | None = None
    cancel_requested: bool = False
    config: dict[str, Any] = Field(description="train: {runs: [RunConfig...]}; ufm: UFMConfig; measure: "
                                               "{inputs, options}.")
    latest_metrics: list[MetricPointOut] = Field(
        default_factory=list, description="Per run, every layer at its latest recorded epoch.")
    final: dict[str, Any] | None = Field(None, description="The result once succeeded (train: {runs: [...]}; "
                                                           "measure: the metrics dict; ufm: final record).")
    bounds: list[BoundOut] = Field(default_factory=list, description="Per run, its latest bound block.")
    error: JobError | None = None
    links: dict[str, str] = Field(default_factory=dict)


def job_summary(job: Any) -> JobSummary:
    """Build a :class:`JobSummary` from a ``db.models.Job`` row."""
    return JobSummary(id=job.id, kind=job.kind, status=job.status, sweep_id=job.sweep_id,
                      progress=Progress.of(job.progress_epoch, job.progress_total), attempts=job.attempts,
                      created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
                      version=job.version)


def job_out(job: Any, *, latest: list[Any] = (), bounds: list[Any] = ()) -> JobOut:
    """Build a :class:`JobOut` from a ``db.models.Job`` row, its latest metric points and bound records."""
    last_bound: dict[int, Any] = {}
    for rec in bounds:  # ordered by (run_index, epoch): the last one per run wins
        last_bound[rec.run_index] = rec
    error = JobError(code=job.error_code, message=job.error_message) if (job.error_code or job.error_message) \
        else None
    links = {"self": f"/jobs/{job.id}", "metrics": f"/jobs/{job.id}/metrics", "bounds": f"/jobs/{job.id}/bounds",
             "cancel": f"/jobs/{job.id}/cancel"}
    if job.sweep_id:
        links["sweep"] = f"/sweeps/{job.sweep_id}"
    return JobOut(
        **job_summary(job).model_dump(), heartbeat_at=job.heartbeat_at, worker_host=job.worker_host,
        device=job.device, cancel_requested=bool(job.cancel_requested), config=job.config or {},
        latest_metrics=[MetricPointOut(run_index=p.run_index, epoch=p.epoch, layer=p.layer, metrics=p.metrics)
                        for p in latest],
        final=job.result, bounds=[BoundOut(run_index=b.run_index, epoch=b.epoch, block=b.block)
                                  for b in last_bound.values()],
        error=error, links=links)
