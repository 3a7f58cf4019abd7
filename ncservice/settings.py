"""Settings of the service, read from ``NCS_*`` environment variables (pydantic-settings).

One class for the API, the worker and the CLI, so both sides of the DB contract read the same values.
With nothing set, everything lives under ``./ncs-data``: a SQLite file and Celery's filesystem transport
(the embedded default). Cluster mode sets ``NCS_DATABASE_URL=postgresql+psycopg://...`` and
``NCS_BROKER_URL=redis://...``.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NCS_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path("ncs-data"), description="Folder for the SQLite file, broker folders and uploads.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///<data_dir>/ncs.db")
    broker_url: str | None = Field(None, description="Celery broker URL; default filesystem:// under data_dir")

    host: str = "127.0.0.1"
    auth: Literal["auto", "on", "off"] = Field(
        "auto", description="API keys (issue 7): 'on' every request needs 'Authorization: Bearer <key>'; 'off' "
        "nobody needs one (allowed only when `host` is loopback); 'auto' is 'on' once a key exists or when `host` "
        "is not loopback, where the API refuses to start without an active key.")
    port: int = 8000
    worker_nice: int = Field(
        0, ge=0, le=19, description="`ncservice worker` lowers its CPU priority by this (os.nice); `ncservice "
        "serve` starts its worker at 10 unless set, so training on the same cores never starves the API.")
    api_workers: int = Field(
        0, ge=0, description="uvicorn worker processes of `ncservice api` / `serve`; 0 = auto: 1 on SQLite (one "
        "writer anyway), min(4, CPUs) on PostgreSQL. With more than one, /metrics aggregates every process "
        "(prometheus-client multiprocess mode).")

    measure_sync_max_elements: int = Field(
        20_000_000, description="/measure answers 200 in-request when N*d is at most this, else 202 + job.")
    max_upload_bytes: int = Field(4 * 1024**3, description="Largest accepted upload (all files of a request).")
    max_json_bytes: int = Field(64 * 1024**2, description="Largest accepted JSON request body (POST /measure).")
    retry_after_seconds: int = Field(2, description="Retry-After on 202 answers and on queued/running jobs.")
    max_bundle_size: int = Field(32, description="Most runs of one sweep trained together as one job.")
    # compute limits of one request (issue 7): refused with 422 at POST, never left to die in a worker; they
    # can only tighten ncengine's hard caps (ncengine.config.MAX_*, ncengine.sweep.MAX_SWEEP_RUNS)
    max_sweep_runs: int = Field(1_000, ge=1, description="Most runs one sweep (grid x seeds) may expand to.")
    max_epochs: int = Field(5_000, ge=1, description="Most epochs of one training run.")
    max_width: int = Field(4_096, ge=1, description="Widest hidden layer of a training run.")
    max_total_epochs: int = Field(
        100_000, ge=1, description="Most run-epochs (sum of epochs over the runs) of one POST /sweeps or /jobs.")
    max_ufm_steps: int = Field(1_000_000, ge=1, description="Most gradient steps of one ufm job.")

    lease_seconds: float = Field(60.0, description="A claimed job's lease; a worker renews it by heartbeat.")
    heartbeat_seconds: float = Field(10.0, description="How often a running job renews its lease.")
    reconcile_seconds: float = Field(15.0, description="How often the reconciler re-sends lost/expired jobs.")
    requeue_after_seconds: float = Field(
        60.0, description="A queued job not claimed for this long is re-sent by the reconciler.")
    checkpoint_every: int = Field(5, description="Training jobs checkpoint every this many epochs.")
    max_attempts: int = Field(3, description="A job whose worker died or errored this many times is failed.")
    shutdown_grace_seconds: float = Field(
        20.0, description="`ncservice serve`: how long children get to stop on Ctrl-C before they are killed.")
    broker_options: dict[str, Any] = Field(
        default_factory=dict, description="Extra Celery broker_transport_options (JSON), e.g. "
        '{"visibility_timeout": 7200} for Redis (a message unacknowledged that long is redelivered; a job running '
        "longer is still never run twice: the second claim fails on the live lease).")
    broker_key_prefix: str | None = Field(
        None, description="Redis broker only: prefix of every key (kombu global_keyprefix), to share a Redis.")
    webhook_secret: str | None = Field(
        None, description="Server secret that signs webhooks (HMAC-SHA256); each API key gets a secret derived "
        "from it (GET /webhooks/secret). Default: a random one kept in <data_dir>/webhook.secret. Set it in "
        "cluster mode so the API and every worker share it.")
    webhook_max_attempts: int = Field(6, ge=1, description="Delivery attempts of one webhook before it fails.")
    webhook_backoff_seconds: float = Field(
        2.0, ge=0, description="Wait before webhook retry k is backoff * 2**(k-1) seconds (capped at 1 hour).")
    webhook_timeout_seconds: float = Field(5.0, gt=0, description="HTTP timeout of one webhook delivery.")
    log_format: Literal["auto", "json", "text"] = Field(
        "auto", description="Log lines: JSON (one object per line) or text; auto = JSON unless stderr is a TTY.")

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'ncs.db').resolve()}"

    @property
    def is_sqlite(self) -> bool:
        return self.resolved_database_url.startswith("sqlite")

    @property
    def resolved_api_workers(self) -> int:
        """``api_workers``, or its automatic value (0): 1 on SQLite, ``min(4, os.cpu_count())`` otherwise."""
        if self.api_workers:
            return self.api_workers
        return 1 if self.is_sqlite else max(1, min(4, os.cpu_count() or 1))

    @property
    def broker_dir(self) -> Path:
        return (self.data_dir / "broker").resolve()

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    def broker_transport_options(self) -> dict:
        """Celery ``broker_transport_options``: folders for the filesystem transport, none otherwise."""
        if self.broker_url:
            prefix = {"global_keyprefix": self.broker_key_prefix} if self.broker_key_prefix else {}
            return {**self.broker_options, **prefix}
        d = self.broker_dir
        return {**self.broker_options, "data_folder_in": str(d / "out"), "data_folder_out": str(d / "out"),
                "control_folder": str(d / "control"), "processed_folder": str(d / "processed"),
                "store_processed": False}

    @property
    def upload_dir(self) -> Path:
        return (self.data_dir / "uploads").resolve()

    @property
    def artifact_dir(self) -> Path:
        return (self.data_dir / "artifacts").resolve()


@lru_cache
def get_settings() -> Settings:
    return Settings()
