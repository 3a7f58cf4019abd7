"""SQLite under concurrent writers: an API-like process (create, poll, list, cancel) and two worker-like
processes (claim, heartbeat, progress, metric points, succeed) hammer one database file at once for
``NCS_CONCURRENCY_SECONDS`` (default 20) seconds. No 'database is locked' (or any other error) may occur,
and the final state is consistent: every job is claimed at most once at a time and no metric point is
duplicated."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback

import pytest

SECONDS = float(os.environ.get("NCS_CONCURRENCY_SECONDS", "20"))


def _api(url: str, seconds: float, q) -> None:
    from db import jobs
    from db.errors import TransitionRejected
    from db.session import make_engine, make_sessionmaker

    sm = make_sessionmaker(make_engine(url))
    n, errors, created = 0, [], []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            with sm() as s:
                job = jobs.create_job(s, kind="measure", config={"i": n}, owner="alice",
                                      idempotency_key=f"k{n}", request_hash="h")
                created.append(job.id)
                jobs.get_job(s, job.id, owner="alice")
                jobs.list_jobs(s, owner="alice", limit=20)
                if n % 5 == 0:
                    try:
                        jobs.request_cancel(s, created[n // 2])
                    except TransitionRejected:
                        pass  # already finished: the API answers 409
                jobs.metric_history(s, created[n // 3])
            n += 1
        except Exception as exc:  # the failure this test guards against
            errors.append("".join(traceback.format_exception_only(type(exc), exc)))
    q.put(("api", n, errors))


def _worker(url: str, seconds: float, name: str, q) -> None:
    from db import jobs
    from db.errors import DBError
    from db.session import make_engine, make_sessionmaker

    sm = make_sessionmaker(make_engine(url))
    done, errors = 0, []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            with sm() as s:
                page, _ = jobs.list_jobs(s, status="queued", limit=5)
                for job in reversed(page):
                    if jobs.claim(s, job.id, worker=name, lease_seconds=30) is None:
                        continue
                    try:
                        for epoch in range(1, 4):
                            jobs.heartbeat(s, job.id, worker=name, lease_seconds=30)
                            jobs.report_progress(s, job.id, worker=name, epoch=epoch, total=3)
                            jobs.add_metric_points(s, job.id, [{"epoch": epoch, "metrics": {"nc1": 1.0 / epoch}}])
                        jobs.succeed(s, job.id, worker=name, result={"by": name})
                        done += 1
                    except DBError:
                        pass  # canceled by the API meanwhile: expected
        except Exception as exc:
            errors.append("".join(traceback.format_exception_only(type(exc), exc)))
    q.put((name, done, errors))


@pytest.mark.slow
def test_api_and_workers_write_at_once(migrated_sqlite_url):
    from sqlalchemy import func, select

    from db import jobs
    from db.models import Job, JobEvent, MetricPoint
    from db.session import make_engine, make_sessionmaker

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_api, args=(migrated_sqlite_url, SECONDS, q))]
    procs += [ctx.Process(target=_worker, args=(migrated_sqlite_url, SECONDS, f"w{i}", q)) for i in range(2)]
    for p in procs:
        p.start()
    results = {name: (n, errs) for name, n, errs in (q.get(timeout=SECONDS + 120) for _ in procs)}
    for p in procs:
        p.join(timeout=30)
    assert {name: errs for name, (n, errs) in results.items() if errs} == {}
    created = results["api"][0]
    assert created > 20 and results["w0"][0] + results["w1"][0] > 10

    engine = make_engine(migrated_sqlite_url)
    sm = make_sessionmaker(engine)
    with sm() as s:
        assert s.execute(select(func.count()).select_from(Job)).scalar() == created
        succeeded = list(s.execute(select(Job).where(Job.status == "succeeded")).scalars())
        assert len(succeeded) == results["w0"][0] + results["w1"][0]
        for job in succeeded:
            assert job.result["by"] == job.lease_owner and job.attempts == 1
            assert [p.epoch for p in jobs.metric_history(s, job.id)] == [1, 2, 3]
        # each job was claimed at most once (no two workers ran it)
        claims = s.execute(select(JobEvent.job_id, func.count()).where(JobEvent.status == "running")
                           .group_by(JobEvent.job_id)).all()
        assert all(c == 1 for _, c in claims)
        points = s.execute(select(func.count()).select_from(MetricPoint)).scalar()
        assert points == len({(p.job_id, p.epoch) for p in s.execute(select(MetricPoint)).scalars()})
    engine.dispose()
