"""GET /metrics: jobs by state, queue length and job durations from the database (Prometheus text format)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from db import jobs as dbjobs
from db.models import Job

CONFIG = {"data": {"name": "teacher", "n": 100}, "model": {"depth": 2, "width": 8}, "schedule": {"epochs": 2}}


def _samples(client) -> dict[tuple[str, tuple], float]:
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _job(client) -> str:
    return client.post("/jobs", json={"kind": "train", "config": CONFIG}).json()["id"]


def test_jobs_by_state_queue_length_and_durations(client, sessionmaker):
    ids = [_job(client) for _ in range(6)]
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    spans = {ids[0]: 3.0, ids[1]: 40.0, ids[2]: 7200.0}  # succeeded after 3 s, 40 s, 2 h
    with sessionmaker() as s:
        for jid in ids[:4]:
            dbjobs.claim(s, jid, worker="w", lease_seconds=60)
        for jid in spans:
            dbjobs.succeed(s, jid, worker="w", result={"runs": []})
        dbjobs.request_cancel(s, ids[4])  # queued -> canceled: never started, no duration
        for jid, seconds in spans.items():
            s.execute(update(Job).where(Job.id == jid).values(started_at=t0,
                                                              finished_at=t0 + timedelta(seconds=seconds)))
        s.commit()
    m = _samples(client)

    def jobs(status, kind="train"):
        return m[("ncs_jobs", (("kind", kind), ("status", status)))]

    assert (jobs("succeeded"), jobs("running"), jobs("canceled"), jobs("queued"), jobs("failed")) == (3, 1, 1, 1, 0)
    assert jobs("queued", "measure") == 0
    assert m[("ncs_queue_length", (("kind", "train"),))] == 1
    lab = (("kind", "train"), ("status", "succeeded"))
    assert m[("ncs_job_duration_seconds_count", lab)] == 3
    assert m[("ncs_job_duration_seconds_sum", lab)] == 7243.0
    bucket = {le: m[("ncs_job_duration_seconds_bucket", (*lab[:1], ("le", le), *lab[1:]))]
              for le in ("1.0", "5.0", "60.0", "3600.0", "14400.0", "+Inf")}
    assert bucket == {"1.0": 0, "5.0": 1, "60.0": 2, "3600.0": 2, "14400.0": 3, "+Inf": 3}
    assert ("ncs_job_duration_seconds_count", (("kind", "train"), ("status", "canceled"))) not in m
    # the HTTP metrics are still there, labelled by route template
    assert m[("ncs_http_requests_total", (("method", "POST"), ("route", "/jobs"), ("status", "202")))] == 6
