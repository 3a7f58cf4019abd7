"""worker.reconciler: lost messages and dead workers are re-sent; exhausted jobs fail; a dead worker's
cancelling job ends canceled; a killed worker's job is resumed by the next claim."""

from __future__ import annotations

from datetime import timedelta

from db import jobs as dbjobs
from db.models import utcnow
from tests.worker.conftest import tiny_run
from worker.reconciler import Reconciler, reconcile_once
from worker.tasks import run_job


def test_reconcile_once(worker_settings, sm):
    sent: list[tuple[str, str]] = []
    now = utcnow()
    with sm() as s:
        lost = dbjobs.create_job(s, kind="measure", config={})  # never claimed: message lost
        fresh = dbjobs.create_job(s, kind="ufm", config={})
        dbjobs.mark_enqueued(s, fresh.id, now=now + timedelta(seconds=100))
        dead = dbjobs.create_job(s, kind="train", config={})
        dbjobs.claim(s, dead.id, worker="dead@h", lease_seconds=10, now=now)
        exhausted = dbjobs.create_job(s, kind="train", config={})
        for i in range(worker_settings.max_attempts):  # claimed 3 times, each worker died
            dbjobs.claim(s, exhausted.id, worker=f"d{i}", lease_seconds=10, now=now + timedelta(seconds=20 * i))
        stopping = dbjobs.create_job(s, kind="train", config={})
        dbjobs.claim(s, stopping.id, worker="z", lease_seconds=10, now=now)
        dbjobs.request_cancel(s, stopping.id)
        alive = dbjobs.create_job(s, kind="train", config={})
        dbjobs.claim(s, alive.id, worker="ok", lease_seconds=1000, now=now)
    later = now + timedelta(seconds=120)
    out = reconcile_once(sm, lambda j, k: sent.append((j, k)), worker_settings, now=later)
    assert sorted(out["resent"]) == sorted([lost.id, dead.id])
    assert out["failed"] == [exhausted.id] and out["canceled"] == [stopping.id]
    assert sorted(sent) == sorted([(lost.id, "measure"), (dead.id, "train")])
    with sm() as s:
        assert dbjobs.get_job(s, exhausted.id).error_code == "lease_expired"
        assert dbjobs.get_job(s, stopping.id).status == "canceled"
        assert dbjobs.get_job(s, alive.id).status == "running"
        assert dbjobs.get_job(s, lost.id).sends == 1
    # back-off: the next pass soon after does not re-send the same waiting job again
    sent.clear()
    out = reconcile_once(sm, lambda j, k: sent.append((j, k)), worker_settings, now=later + timedelta(seconds=1))
    assert lost.id not in out["resent"]


def test_broker_failure_keeps_job_for_next_pass(worker_settings, sm):
    with sm() as s:
        job = dbjobs.create_job(s, kind="measure", config={})

    def broken(job_id, kind):
        raise ConnectionError("broker down")

    later = utcnow() + timedelta(seconds=120)
    assert reconcile_once(sm, broken, worker_settings, now=later)["resent"] == []
    out = reconcile_once(sm, lambda j, k: None, worker_settings, now=later)
    assert out["resent"] == [job.id]


def test_dead_worker_job_is_taken_over_and_finished(worker_settings, sm):
    """A worker claimed the job and died (its lease expired); the reconciler re-sends it and the next
    worker's claim takes it over and finishes it."""
    with sm() as s:
        job = dbjobs.create_job(s, kind="train", config={"runs": [tiny_run(0, epochs=2, every=1)]})
        # claimed 5 s ago with a 0.01 s lease: expired in real time too, so the next claim (which uses the
        # real clock) can take it however fast the machine gets there
        dbjobs.claim(s, job.id, worker="dead@h", lease_seconds=0.01, now=utcnow() - timedelta(seconds=5))
    sent = []
    out = reconcile_once(sm, lambda j, k: sent.append(j), worker_settings, now=utcnow() + timedelta(seconds=1))
    assert out["resent"] == [job.id] and sent == [job.id]
    assert run_job(job.id, settings=worker_settings, kind="train", worker="w2@h") == "succeeded"
    with sm() as s:
        row = dbjobs.get_job(s, job.id)
        assert (row.attempts, row.lease_owner) == (2, "w2@h")


def test_reconciler_thread_stops(worker_settings, sm):
    sent = []
    with sm() as s:
        job = dbjobs.create_job(s, kind="measure", config={})
    settings = worker_settings.model_copy(update={"requeue_after_seconds": 0.0, "reconcile_seconds": 0.05})
    rec = Reconciler(settings, sm=sm, send=lambda j, k: sent.append(j))
    rec.start()
    import time

    deadline = time.monotonic() + 10
    while not sent and time.monotonic() < deadline:
        time.sleep(0.02)
    rec.stop()
    assert not rec.is_alive() and sent[0] == job.id


def test_job_released_by_a_stopping_worker_is_resent_at_once(worker_settings, sm):
    """A worker that stops mid-run (Ctrl-C) releases its job for retry without re-sending it; the next
    reconciler pass (the first one runs when the service starts) re-sends it at once, not after
    ``requeue_after_seconds``. A retrying job whose worker re-sent it waits its back-off as before."""
    now = utcnow()
    with sm() as s:
        stopped = dbjobs.create_job(s, kind="train", config={})
        dbjobs.mark_enqueued(s, stopped.id, now=now)
        dbjobs.claim(s, stopped.id, worker="w", lease_seconds=60, now=now)
        dbjobs.release_for_retry(s, stopped.id, worker="w", code="worker_shutdown", message="stopped")
        resent = dbjobs.create_job(s, kind="train", config={})
        dbjobs.mark_enqueued(s, resent.id, now=now)
        dbjobs.claim(s, resent.id, worker="w", lease_seconds=60, now=now)
        dbjobs.release_for_retry(s, resent.id, worker="w", code="oom", message="retry")
        dbjobs.mark_enqueued(s, resent.id, now=now)  # the worker re-sent it with a countdown
    out = reconcile_once(sm, lambda j, k: None, worker_settings, now=now + timedelta(seconds=1))
    assert out["resent"] == [stopped.id]
