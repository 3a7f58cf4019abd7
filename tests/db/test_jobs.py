"""db.jobs: every transition (allowed and rejected), idempotent retries, claim CAS, leases, orphans,
pagination, idempotency keys, metric/bound upserts. Runs on SQLite and PostgreSQL (fixture ``db_url``)."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from db import jobs
from db.errors import IdempotencyConflict, InvalidCursor, LeaseLost, NotFound, TransitionRejected
from db.models import TERMINAL, BoundRecord, Job, JobEvent, JobStatus, MetricPoint, utcnow

LEASE = 30.0
ALL = [s.value for s in JobStatus]


def _new(s, **kw):
    return jobs.create_job(s, kind=kw.pop("kind", "measure"), config=kw.pop("config", {"x": 1}), **kw)


def _events(s, job_id):
    return [e.status for e in jobs.job_events(s, job_id)]


class _Snap:
    def __init__(self, job):
        self.__dict__.update({c: getattr(job, c) for c in Job.__table__.c.keys()})


def _snap(job) -> _Snap:
    """A copy of the row's values (ORM objects are shared through the session's identity map)."""
    return _Snap(job)


def _reach(s, status: str, worker: str = "w1@h") -> Job:
    """A job in ``status``, reached only through the transition functions."""
    job = _new(s)
    if status == "queued":
        return job
    if status == "canceled":
        return jobs.request_cancel(s, job.id)
    job = jobs.claim(s, job.id, worker=worker, lease_seconds=LEASE)
    if status == "running":
        return job
    if status == "succeeded":
        return jobs.succeed(s, job.id, worker=worker, result={"ok": 1})
    if status == "failed":
        return jobs.fail(s, job.id, worker=worker, code="boom", message="it broke")
    if status == "cancelling":
        return jobs.request_cancel(s, job.id)
    if status == "retrying":
        return jobs.release_for_retry(s, job.id, worker=worker, code="oom", message="try again")
    raise AssertionError(status)


# The transition matrices below loop over their cases inside one test (one fresh database, one job per
# case) instead of one parametrized test per case: same coverage, a fraction of the database set-ups.

def test_reach_every_state(db_session):
    for status in ALL:
        job = _reach(db_session, status)
        assert job.status == status
        row = jobs.get_job(db_session, job.id)
        assert row.status == status
        assert _events(db_session, job.id)[-1] == status
        # version starts at 1 and every transition bumps it by one (events count the transitions)
        assert row.version == len(_events(db_session, job.id)), status


def test_create_job_row(db_session):
    t0 = utcnow()
    job = _new(db_session, owner="alice", config={"inputs": {"features": "/f.npy"}})
    assert len(job.id) == 32 and int(job.id, 16) >= 0
    row = jobs.get_job(db_session, job.id)
    assert (row.status, row.kind, row.attempts, row.version, row.cancel_requested) == ("queued", "measure", 0, 1,
                                                                                       False)
    assert row.config == {"inputs": {"features": "/f.npy"}}
    assert row.created_at.tzinfo is not None and abs((row.created_at - t0).total_seconds()) < 5
    with pytest.raises(ValueError):
        _new(db_session, kind="nope")


def test_get_job_owner_scoping(db_session):
    job = _new(db_session, owner="alice")
    assert jobs.get_job(db_session, job.id, owner="alice").id == job.id
    assert jobs.get_job(db_session, job.id).id == job.id  # admin
    with pytest.raises(NotFound):
        jobs.get_job(db_session, job.id, owner="bob")
    with pytest.raises(NotFound):
        jobs.get_job(db_session, "0" * 32)


# --- request_cancel -----------------------------------------------------------------------------------

EXPECT_CANCEL = {"queued": "canceled", "retrying": "canceled", "running": "cancelling",
                 "cancelling": "cancelling", "canceled": "canceled", "succeeded": None, "failed": None}


def _check_cancel(s, status):
    job = _reach(s, status)
    before = jobs.get_job(s, job.id).version
    want = EXPECT_CANCEL[status]
    if want is None:
        with pytest.raises(TransitionRejected) as ei:
            jobs.request_cancel(s, job.id)
        assert ei.value.status == status
        assert jobs.get_job(s, job.id).version == before
        return
    out = jobs.request_cancel(s, job.id)
    assert out.status == want
    changed = status not in ("cancelling", "canceled")
    assert out.version == before + (1 if changed else 0)
    assert out.cancel_requested is True
    if want == "canceled":
        assert out.finished_at is not None


def test_request_cancel_from_every_state(db_session):
    for status in ALL:
        try:
            _check_cancel(db_session, status)
        except AssertionError as exc:
            raise AssertionError(f"request_cancel from {status}: {exc}") from exc


def test_request_cancel_other_owner_is_not_found(db_session):
    job = _new(db_session, owner="alice")
    with pytest.raises(NotFound):
        jobs.request_cancel(db_session, job.id, owner="bob")
    assert jobs.get_job(db_session, job.id).status == "queued"


# --- claim / lease ----------------------------------------------------------------------------------------

EXPECT_CLAIM = {"queued": True, "retrying": True, "running": False, "cancelling": False,
                "canceled": False, "succeeded": False, "failed": False}


def _check_claim(s, status):
    job = _reach(s, status)
    before = _snap(jobs.get_job(s, job.id))
    got = jobs.claim(s, job.id, worker="w2@h2", lease_seconds=LEASE, device="cpu")
    if not EXPECT_CLAIM[status]:
        assert got is None
        after = jobs.get_job(s, job.id)
        assert (after.status, after.version, after.lease_owner) == (status, before.version, before.lease_owner)
        return
    assert got.status == "running" and got.lease_owner == "w2@h2" and got.worker_host == "h2"
    assert got.attempts == before.attempts + 1 and got.device == "cpu"
    assert got.lease_expires_at > utcnow() + timedelta(seconds=LEASE - 5)


def test_claim_from_every_state(db_session):
    for status in ALL:
        try:
            _check_claim(db_session, status)
        except AssertionError as exc:
            raise AssertionError(f"claim from {status}: {exc}") from exc


def test_claim_missing_job_is_none(db_session):
    assert jobs.claim(db_session, "f" * 32, worker="w", lease_seconds=LEASE) is None


def test_claim_after_lease_expired_takes_over(db_session):
    job = _reach(db_session, "running", worker="dead@h")
    later = utcnow() + timedelta(seconds=LEASE + 1)
    got = jobs.claim(db_session, job.id, worker="w2@h", lease_seconds=LEASE, now=later)
    assert got.lease_owner == "w2@h" and got.attempts == 2
    with pytest.raises(LeaseLost):
        jobs.heartbeat(db_session, job.id, worker="dead@h", lease_seconds=LEASE)
    with pytest.raises(LeaseLost):
        jobs.report_progress(db_session, job.id, worker="dead@h", epoch=1, total=2)
    with pytest.raises(TransitionRejected):
        jobs.succeed(db_session, job.id, worker="dead@h", result={})


def test_two_claimers_one_wins(db_sessionmaker):
    """Many threads claim the same job at once: exactly one gets it, attempts == 1."""
    with db_sessionmaker() as s:
        job = _new(s)
    barrier = threading.Barrier(6)
    wins: list[str] = []
    errors: list[BaseException] = []

    def claimer(i):
        try:
            with db_sessionmaker() as s:
                barrier.wait()
                if jobs.claim(s, job.id, worker=f"w{i}", lease_seconds=LEASE) is not None:
                    wins.append(f"w{i}")
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(wins) == 1
    with db_sessionmaker() as s:
        row = jobs.get_job(s, job.id)
        assert row.lease_owner == wins[0] and row.attempts == 1
        assert _events(s, job.id).count("running") == 1


def test_heartbeat_renews_and_reports_cancel(db_session):
    job = _reach(db_session, "running")
    t = utcnow() + timedelta(seconds=10)
    assert jobs.heartbeat(db_session, job.id, worker="w1@h", lease_seconds=LEASE, now=t) is False
    row = jobs.get_job(db_session, job.id)
    assert row.lease_expires_at == t + timedelta(seconds=LEASE) or abs(
        (row.lease_expires_at - (t + timedelta(seconds=LEASE))).total_seconds()) < 1e-3
    jobs.request_cancel(db_session, job.id)
    assert jobs.heartbeat(db_session, job.id, worker="w1@h", lease_seconds=LEASE) is True
    with pytest.raises(LeaseLost):
        jobs.heartbeat(db_session, job.id, worker="intruder", lease_seconds=LEASE)


def test_heartbeat_after_terminal_is_lease_lost(db_session):
    job = _reach(db_session, "succeeded")
    with pytest.raises(LeaseLost):
        jobs.heartbeat(db_session, job.id, worker="w1@h", lease_seconds=LEASE)


def test_progress(db_session):
    job = _reach(db_session, "running")
    v = jobs.get_job(db_session, job.id).version
    assert jobs.report_progress(db_session, job.id, worker="w1@h", epoch=3, total=10) is False
    row = jobs.get_job(db_session, job.id)
    assert (row.progress_epoch, row.progress_total, row.version) == (3, 10, v + 1)


# --- worker-side terminal transitions -----------------------------------------------------------------

FINISHERS = {
    "succeeded": lambda s, j, w: jobs.succeed(s, j, worker=w, result={"r": [1.0, 2.0]}),
    "failed": lambda s, j, w: jobs.fail(s, j, worker=w, code="input_error", message="features: bad"),
    "canceled": lambda s, j, w: jobs.mark_canceled(s, j, worker=w),
    "retrying": lambda s, j, w: jobs.release_for_retry(s, j, worker=w, code="oom", message="again"),
}
# source state -> finisher -> expected resulting status (None = TransitionRejected)
EXPECT_FINISH = {
    "running": {"succeeded": "succeeded", "failed": "failed", "canceled": "canceled", "retrying": "retrying"},
    "cancelling": {"succeeded": "succeeded", "failed": "failed", "canceled": "canceled", "retrying": "canceled"},
    "queued": {k: None for k in FINISHERS},
    "retrying": {"succeeded": None, "failed": None, "canceled": None, "retrying": "retrying"},  # idempotent
    "succeeded": {"succeeded": "succeeded", "failed": None, "canceled": None, "retrying": None},
    "failed": {"succeeded": None, "failed": "failed", "canceled": None, "retrying": None},
    # canceled while queued: no worker ever held it, so a worker's mark_canceled is not a retry
    "canceled": {"succeeded": None, "failed": None, "canceled": None, "retrying": None},
}


def test_finish_transitions(db_session):
    for source in EXPECT_FINISH:
        for finisher in FINISHERS:
            try:
                _check_finish(db_session, source, finisher)
            except AssertionError as exc:
                raise AssertionError(f"{finisher} from {source}: {exc}") from exc


def _check_finish(db_session, source, finisher):
    job = _reach(db_session, source)
    want = EXPECT_FINISH[source][finisher]
    before = _snap(jobs.get_job(db_session, job.id))
    if want is None:
        with pytest.raises(TransitionRejected):
            FINISHERS[finisher](db_session, job.id, "w1@h")
        after = jobs.get_job(db_session, job.id)
        assert (after.status, after.version) == (source, before.version)
        return
    out = FINISHERS[finisher](db_session, job.id, "w1@h")
    assert out.status == want
    retried = source == want  # an idempotent retry: nothing written
    assert out.version == before.version + (0 if retried else 1)
    if want in {s.value for s in TERMINAL}:
        assert out.finished_at is not None and out.lease_expires_at is None
    if want == "succeeded" and not retried:
        assert out.result == {"r": [1.0, 2.0]}
    if want == "failed" and not retried:
        assert (out.error_code, out.error_message) == ("input_error", "features: bad")
    if want == "retrying":
        assert out.lease_owner is None


def test_finish_by_non_holder_is_rejected(db_session):
    job = _reach(db_session, "running")
    with pytest.raises(TransitionRejected):
        jobs.succeed(db_session, job.id, worker="other", result={})
    with pytest.raises(NotFound):
        jobs.succeed(db_session, "0" * 32, worker="w", result={})


def test_succeed_retry_after_lost_commit_returns_same(db_session):
    job = _reach(db_session, "running")
    a = jobs.succeed(db_session, job.id, worker="w1@h", result={"v": 1})
    b = jobs.succeed(db_session, job.id, worker="w1@h", result={"v": 1})
    assert (a.version, b.version, b.status) == (b.version, a.version, "succeeded")
    assert _events(db_session, job.id).count("succeeded") == 1


def test_retrying_job_is_claimed_again(db_session):
    job = _reach(db_session, "retrying")
    got = jobs.claim(db_session, job.id, worker="w2", lease_seconds=LEASE)
    assert got.status == "running" and got.attempts == 2
    assert got.error_code is None
    assert _events(db_session, job.id) == ["queued", "running", "retrying", "running"]


def test_events_are_in_the_same_transaction(db_session):
    """A rejected transition leaves no event; a successful one leaves exactly one."""
    job = _reach(db_session, "succeeded")
    n = len(_events(db_session, job.id))
    with pytest.raises(TransitionRejected):
        jobs.fail(db_session, job.id, worker="w1@h", code="x", message="y")
    with pytest.raises(TransitionRejected):
        jobs.request_cancel(db_session, job.id)
    assert len(_events(db_session, job.id)) == n
    fe = [e for e in jobs.job_events(db_session, job.id)]
    assert [e.status for e in fe] == ["queued", "running", "succeeded"]
    assert all(e.at.tzinfo is not None for e in fe)


# --- orphans / reconciler support -------------------------------------------------------------------------

def test_find_orphans(db_session):
    now = utcnow()
    fresh = _new(db_session)
    jobs.mark_enqueued(db_session, fresh.id, now=now)
    stale = _new(db_session)
    jobs.mark_enqueued(db_session, stale.id, now=now - timedelta(seconds=100))
    never_sent = _new(db_session)  # created now, enqueued_at unset: waits requeue_after from created_at
    live = _reach(db_session, "running", worker="a")
    dead = _reach(db_session, "running", worker="b")
    done = _reach(db_session, "succeeded")
    later = now + timedelta(seconds=LEASE + 5)
    jobs.heartbeat(db_session, live.id, worker="a", lease_seconds=LEASE, now=later)
    ids = {j.id for j in jobs.find_orphans(db_session, now=now + timedelta(seconds=1), requeue_after_seconds=60)}
    assert ids == {stale.id}
    ids = {j.id for j in jobs.find_orphans(db_session, now=later, requeue_after_seconds=60)}
    assert ids == {stale.id, dead.id}
    ids = {j.id for j in jobs.find_orphans(db_session, now=now + timedelta(seconds=61), requeue_after_seconds=60)}
    assert never_sent.id in ids and fresh.id in ids and done.id not in ids


def test_find_orphans_backs_off(db_session):
    now = utcnow()
    job = _new(db_session)
    for _ in range(3):  # sent 3 times: the next re-send waits 60 * 2**2 s
        jobs.mark_enqueued(db_session, job.id, now=now)
    assert jobs.find_orphans(db_session, now=now + timedelta(seconds=239), requeue_after_seconds=60) == []
    assert [j.id for j in jobs.find_orphans(db_session, now=now + timedelta(seconds=241),
                                             requeue_after_seconds=60)] == [job.id]


def test_expire_cancelling_and_fail_orphan(db_session):
    a = _reach(db_session, "cancelling")
    b = _reach(db_session, "running")
    with pytest.raises(TransitionRejected):  # lease still live
        jobs.expire_cancelling(db_session, a.id)
    with pytest.raises(TransitionRejected):
        jobs.fail_orphan(db_session, b.id, code="lease_expired", message="x")
    later = utcnow() + timedelta(seconds=LEASE + 1)
    assert jobs.expire_cancelling(db_session, a.id, now=later).status == "canceled"
    out = jobs.fail_orphan(db_session, b.id, code="lease_expired", message="gave up", now=later)
    assert (out.status, out.error_code) == ("failed", "lease_expired")


# --- sweeps, idempotency, pagination ----------------------------------------------------------------------

def test_create_sweep_one_job_per_bundle(db_session):
    bundles = [{"runs": [{"seed": 0}, {"seed": 1}]}, {"runs": [{"seed": 2}]}, {"runs": [{"seed": 3}]}]
    sweep, js = jobs.create_sweep(db_session, name="s", preset=None, spec={"grid": {}}, bundles=bundles,
                                  owner="alice")
    assert [j.config for j in js] == bundles
    assert all(j.status == "queued" and j.kind == "train" and j.sweep_id == sweep.id for j in js)
    assert [j.id for j in jobs.sweep_jobs(db_session, sweep.id)] == [j.id for j in js]
    assert jobs.get_sweep(db_session, sweep.id, owner="alice").name == "s"
    with pytest.raises(NotFound):
        jobs.get_sweep(db_session, sweep.id, owner="bob")


def test_idempotency_key_job(db_session):
    a = _new(db_session, owner="alice", idempotency_key="k1", request_hash="h1")
    b = _new(db_session, owner="alice", idempotency_key="k1", request_hash="h1")
    assert a.id == b.id
    with pytest.raises(IdempotencyConflict):
        _new(db_session, owner="alice", idempotency_key="k1", request_hash="h2")
    c = _new(db_session, owner="bob", idempotency_key="k1", request_hash="h1")  # keys are per owner
    assert c.id != a.id
    assert db_session.execute(select(func.count()).select_from(Job)).scalar() == 2
    db_session.commit()


def test_idempotency_key_sweep(db_session):
    kw = dict(name="s", preset="thesis-fig3.1", spec={}, bundles=[{"runs": [1]}, {"runs": [2]}], owner="a",
              idempotency_key="k", request_hash="h")
    s1, j1 = jobs.create_sweep(db_session, **kw)
    s2, j2 = jobs.create_sweep(db_session, **kw)
    assert s1.id == s2.id and [j.id for j in j1] == [j.id for j in j2]
    with pytest.raises(IdempotencyConflict):
        jobs.create_sweep(db_session, **{**kw, "request_hash": "other"})


def test_list_jobs_pagination_and_filters(db_session):
    made = [_new(db_session, owner="alice" if i % 3 else "bob", kind="ufm" if i % 2 else "measure")
            for i in range(11)]
    jobs.request_cancel(db_session, made[4].id)
    seen, cursor = [], None
    while True:
        page, cursor = jobs.list_jobs(db_session, owner="alice", cursor=cursor, limit=3)
        seen += page
        assert len(page) <= 3
        if cursor is None:
            break
    expect = sorted((j for j in made if j.owner == "alice"), key=lambda j: (j.created_at, j.id), reverse=True)
    assert [j.id for j in seen] == [j.id for j in expect]
    page, cur = jobs.list_jobs(db_session, status="canceled")
    assert [j.id for j in page] == [made[4].id] and cur is None
    page, _ = jobs.list_jobs(db_session, kind="ufm", limit=100)
    assert {j.id for j in page} == {j.id for j in made if j.kind == "ufm"}
    page, _ = jobs.list_jobs(db_session, status=["queued", "canceled"], limit=100)
    assert len(page) == 11
    with pytest.raises(InvalidCursor):
        jobs.list_jobs(db_session, cursor="garbage!")


def test_list_sweeps(db_session):
    ids = [jobs.create_sweep(db_session, name=f"s{i}", preset=None, spec={}, bundles=[])[0].id for i in range(5)]
    page, cur = jobs.list_sweeps(db_session, limit=2)
    page2, cur2 = jobs.list_sweeps(db_session, cursor=cur, limit=10)
    assert [s.id for s in page + page2] == ids[::-1] and cur2 is None


# --- metric points / bounds -------------------------------------------------------------------------------

def test_metric_points_upsert_and_history(db_session):
    job = _reach(db_session, "running")
    pts = [{"run_index": r, "epoch": e, "layer": -1,
            "metrics": {"train_loss": 1.0 / (e + 1), "nc1": float(r), "intra_cos": [0.5, 0.25],
                        "inter_cos_max": float("nan")}}
           for r in range(2) for e in range(3)]
    assert jobs.add_metric_points(db_session, job.id, pts) == 6
    assert jobs.add_metric_points(db_session, job.id, pts[:4]) == 0  # re-run epochs: no duplicates
    flat = [{"epoch": 5, "layer": 2, "train_loss": 0.1, "ncc_accuracy": 1.0, "bounds": {"x": 1}}]
    assert jobs.add_metric_points(db_session, job.id, flat) == 1
    hist = jobs.metric_history(db_session, job.id, run_index=1)
    assert [(p.epoch, p.layer) for p in hist] == [(0, -1), (1, -1), (2, -1)]
    assert [p.train_loss for p in hist] == [1.0, 0.5, 1.0 / 3]
    assert hist[0].metrics["intra_cos"] == [0.5, 0.25]
    assert hist[0].metrics["inter_cos_max"] is None and hist[0].inter_cos_max is None  # NaN -> null
    p = jobs.metric_history(db_session, job.id, layer=2)[0]
    assert (p.run_index, p.ncc_accuracy, "bounds" in p.metrics) == (0, 1.0, False)
    assert len(jobs.metric_history(db_session, job.id)) == 7
    latest = jobs.latest_metrics(db_session, job.id)
    assert sorted((p.run_index, p.epoch) for p in latest) == [(0, 5), (1, 2)]
    assert db_session.execute(select(func.count()).select_from(MetricPoint)).scalar() == 7
    db_session.commit()


def test_bounds_upsert(db_session):
    job = _reach(db_session, "running")
    recs = [{"run_index": 0, "epoch": e, "block": {"epsilon": 0.1 * e, "loss": 1.0}} for e in range(4)]
    assert jobs.add_bounds(db_session, job.id, recs) == 4
    assert jobs.add_bounds(db_session, job.id, recs) == 0
    hist = jobs.bound_history(db_session, job.id)
    assert [b.epoch for b in hist] == [0, 1, 2, 3] and hist[2].block == {"epsilon": 0.2, "loss": 1.0}
    assert db_session.execute(select(func.count()).select_from(BoundRecord)).scalar() == 4
    db_session.commit()


def test_artifacts(db_session):
    job = _new(db_session, owner="a")
    art = jobs.create_artifact(db_session, kind="checkpoint", name="ckpt.pt", path="/x/ckpt.pt", bytes=10,
                               sha256="0" * 64, owner="a", job_id=job.id)
    assert [a.id for a in jobs.list_artifacts(db_session, job_id=job.id)] == [art.id]
    with pytest.raises(ValueError):
        jobs.create_artifact(db_session, kind="bogus", name="n", path="p", bytes=0, sha256="")


def test_jsonable():
    import numpy as np

    out = jobs.jsonable({"a": np.float32(1.5), "b": np.arange(3), "c": (1, float("inf")), 2: np.bool_(True)})
    assert out == {"a": 1.5, "b": [0, 1, 2], "c": [1, None], "2": True}


def test_event_rows_never_updated(db_session):
    job = _reach(db_session, "failed")
    rows = db_session.execute(select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id)).scalars()
    assert [(e.status, e.code) for e in rows] == [("queued", None), ("running", None), ("failed", "boom")]
    db_session.commit()
