"""Prometheus metrics of the jobs, read from the database at scrape time (a custom collector).

- ``ncs_jobs{kind, status}`` (gauge): jobs per kind and state (every state of ``db.models.JobStatus``, 0 included);
- ``ncs_queue_length{kind}`` (gauge): jobs waiting for a worker (``queued`` or ``retrying``);
- ``ncs_job_duration_seconds{kind, status}`` (histogram): ``finished_at - started_at`` of the terminal jobs that
  ran (a job canceled while queued never started and is not counted).

The DB is the only place that sees every worker's jobs, so the numbers are right with any number of API
processes and workers (each API process reports the same totals: aggregate with ``max``, not ``sum``).
Two grouped queries per scrape (the durations read one row per finished job).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy import func, select

from db.models import TERMINAL, WAITING, Job, JobKind, JobStatus

log = logging.getLogger("ncservice.api")

#: job duration buckets in seconds: 1 s .. 1 day
DURATION_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)


class JobCollector(Collector):
    """Collects ``ncs_jobs``, ``ncs_queue_length`` and ``ncs_job_duration_seconds`` from ``sessionmaker()``."""

    def __init__(self, sessionmaker: Any) -> None:
        self._sm = sessionmaker

    def describe(self) -> list:
        return []  # no describe-time queries (the registry would call collect() at registration otherwise)

    def collect(self) -> Iterator[Any]:
        try:
            with self._sm() as s:
                counts = s.execute(select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status)).all()
                spans = s.execute(select(Job.kind, Job.status, Job.started_at, Job.finished_at)
                                  .where(Job.status.in_([t.value for t in TERMINAL]),
                                         Job.started_at.is_not(None), Job.finished_at.is_not(None))).all()
                s.commit()
        except Exception:  # a scrape must not fail the endpoint; the HTTP metrics still come out
            log.exception("job metrics: database query failed")
            return
        kinds = [k.value for k in JobKind]
        by = {(k, st): n for k, st, n in counts}
        jobs = GaugeMetricFamily("ncs_jobs", "Jobs per kind and state (from the database)",
                                 labels=["kind", "status"])
        queue = GaugeMetricFamily("ncs_queue_length", "Jobs waiting for a worker (queued or retrying)",
                                  labels=["kind"])
        for kind in kinds:
            for status in JobStatus:
                jobs.add_metric([kind, status.value], by.get((kind, status.value), 0))
            queue.add_metric([kind], sum(by.get((kind, w.value), 0) for w in WAITING))
        yield jobs
        yield queue
        durations: dict[tuple[str, str], list[float]] = {}
        for kind, status, started, finished in spans:
            durations.setdefault((kind, status), []).append(max(0.0, (finished - started).total_seconds()))
        hist = HistogramMetricFamily("ncs_job_duration_seconds", "Run time of finished jobs (finished - started)",
                                     labels=["kind", "status"])
        for (kind, status), values in sorted(durations.items()):
            buckets = [(floatToGoString(b), sum(1 for v in values if v <= b)) for b in DURATION_BUCKETS]
            buckets.append(("+Inf", len(values)))
            hist.add_metric([kind, status], buckets, sum(values))
        yield hist
