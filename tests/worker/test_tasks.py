"""worker.tasks.run_job, called as a plain function (no broker): claim, progress/metric points/bounds as
the run goes, succeed/fail/cancel/retry, checkpoint resume. Reference results come from calling ncengine
directly with the same configs and seeds."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from db import jobs as dbjobs
from tests.worker.conftest import tiny_run
from worker import tasks
from worker.tasks import run_job


def _train_reference(configs):
    from ncengine import train

    return train.run(configs, device="cpu")


def _close(a, b, tol=1e-5):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and abs(a - b) <= tol * max(1.0, abs(b))
    return a == b


def test_train_bundle_end_to_end(worker_settings, sm):
    runs = [tiny_run(0), tiny_run(1)]
    with sm() as s:
        job = dbjobs.create_job(s, kind="train", config={"runs": runs})
    assert run_job(job.id, settings=worker_settings, kind="train", worker="w@h") == "succeeded"
    ref = _train_reference(runs)
    with sm() as s:
        row = dbjobs.get_job(s, job.id)
        assert (row.status, row.attempts, row.progress_epoch, row.progress_total) == ("succeeded", 1, 6, 6)
        assert row.device == "cpu" and row.finished_at >= row.started_at
        assert [r["seed"] for r in row.result["runs"]] == [0, 1]
        for got, want in zip(row.result["runs"], ref):
            assert _close(got["final"], dbjobs.jsonable(want.final))
        hist = dbjobs.metric_history(s, job.id)
        # measured every 2 epochs of 6, last layer (depth 3 -> hidden layer 2), two members
        assert sorted((p.run_index, p.epoch) for p in hist) == [(k, e) for k in (0, 1) for e in (2, 4, 6)]
        for p in hist:
            want = next(h for h in ref[p.run_index].history if h["epoch"] == p.epoch)
            assert p.layer == want["layer"]
            assert p.train_loss == pytest.approx(want["train_loss"], rel=1e-6)
            assert p.nc1 == pytest.approx(want["nc1"], rel=1e-6)
            assert "bounds" not in p.metrics
        bounds = dbjobs.bound_history(s, job.id)
        assert len(bounds) == 6
        b = next(b for b in bounds if (b.run_index, b.epoch) == (1, 6))
        assert b.block["min_loss_m"] == pytest.approx(ref[1].final["bounds"]["min_loss_m"], rel=1e-9)
        assert [e.status for e in dbjobs.job_events(s, job.id)] == ["queued", "running", "succeeded"]
    assert not tasks.checkpoint_path(worker_settings, job.id).exists()


def test_duplicate_message_is_dropped(worker_settings, sm):
    with sm() as s:
        job = dbjobs.create_job(s, kind="train", config={"runs": [tiny_run(0, epochs=2)]})
        dbjobs.claim(s, job.id, worker="other@h", lease_seconds=60)
    assert run_job(job.id, settings=worker_settings, kind="train", worker="w@h") is None  # live lease elsewhere
    with sm() as s:
        assert dbjobs.get_job(s, job.id).lease_owner == "other@h"
        dbjobs.succeed(s, job.id, worker="other@h", result={"x": 1})
    assert run_job(job.id, settings=worker_settings, kind="train", worker="w@h") is None  # terminal
    assert run_job("0" * 32, settings=worker_settings, kind="train") is None  # unknown id
    with sm() as s:
        row = dbjobs.get_job(s, job.id)
        assert (row.status, row.attempts, row.result) == ("succeeded", 1, {"x": 1})


def test_invalid_config_fails_without_retry(worker_settings, sm):
    with sm() as s:
        job = dbjobs.create_job(s, kind="train", config={"runs": [{"model": {"depth": 1}}]})
    assert run_job(job.id, settings=worker_settings, kind="train", worker="w@h") == "failed"
    with sm() as s:
        row = dbjobs.get_job(s, job.id)
        assert row.error_code == "input_error" and "depth" in row.error_message and row.attempts == 1


def test_internal_error_retries_then_fails(worker_settings, sm, monkeypatch):
    def boom(ctx):
        raise RuntimeError("disk on fire")

    monkeypatch.setitem(tasks.RUNNERS, "measure", boom)
    sent = []
    with sm() as s:
        job = dbjobs.create_job(s, kind="measure", config={"inputs": {}, "options": {}})
    for attempt in (1, 2):
        status = run_job(job.id, settings=worker_settings, kind="measure", worker="w@h",
                         resend=lambda j, k, c: sent.append((j, k, c)))
        assert status == "retrying"
    assert sent == [(job.id, "measure", 2.0), (job.id, "measure", 4.0)]
    assert run_job(job.id, settings=worker_settings, kind="measure", worker="w@h") == "failed"  # max_attempts 3
    with sm() as s:
        row = dbjobs.get_job(s, job.id)
        assert (row.attempts, row.error_code) == (3, "internal_error") and "disk on fire" in row.error_message
        assert [e.status for e in dbjobs.job_events(s, job.id)] == [
            "queued", "running", "retrying", "running", "retrying", "running", "failed"]


def test_cancel_while_running(worker_settings, sm):
    with sm() as s:  # long enough that only a cancel ends it within the test's time
        job = dbjobs.create_job(s, kind="ufm", config={"num_classes": 3, "dim": 4, "samples_per_class": 2,
                                                       "weight_decay": 1e-3, "steps": 1_000_000, "seed": 0,
                                                       "record_every": 1000})
    out: list = []
    th = threading.Thread(target=lambda: out.append(
        run_job(job.id, settings=worker_settings, kind="ufm", worker="w@h")))
    th.start()
    deadline = time.monotonic() + 60
    with sm() as s:
        while dbjobs.get_job(s, job.id).progress_epoch in (None, 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert dbjobs.request_cancel(s, job.id).status == "cancelling"
    th.join(timeout=30)
    assert out == ["canceled"]
    with sm() as s:
        row = dbjobs.get_job(s, job.id)
        assert row.status == "canceled" and row.progress_epoch < 1_000_000
        assert [e.status for e in dbjobs.job_events(s, job.id)] == ["queued", "running", "cancelling", "canceled"]
        assert len(dbjobs.metric_history(s, job.id)) >= 1


def test_shutdown_releases_and_resume_from_checkpoint(worker_settings, sm, monkeypatch):
    """The worker stops at epoch 3 (warm shutdown); the job is released with its epoch-2 checkpoint; the next
    run resumes and ends with exactly the uninterrupted results, without duplicate metric points."""
    runs = [tiny_run(3), tiny_run(4)]
    with sm() as s:
        job = dbjobs.create_job(s, kind="train", config={"runs": runs})
    original = tasks.JobContext.progress

    def progress(self, epoch, total, *, force=False):
        if epoch == 3:
            tasks.SHUTTING_DOWN.set()
        return original(self, epoch, total, force=force)

    monkeypatch.setattr(tasks.JobContext, "progress", progress)
    try:
        assert run_job(job.id, settings=worker_settings, kind="train", worker="w1@h") == "retrying"
    finally:
        tasks.SHUTTING_DOWN.clear()
    assert tasks.checkpoint_path(worker_settings, job.id).exists()
    with sm() as s:
        row = dbjobs.get_job(s, job.id)
        assert (row.status, row.error_code) == ("retrying", "worker_shutdown") and row.progress_epoch in (2, 3)
        assert sorted((p.run_index, p.epoch) for p in dbjobs.metric_history(s, job.id)) == [(0, 2), (1, 2)]
    monkeypatch.setattr(tasks.JobContext, "progress", original)
    assert run_job(job.id, settings=worker_settings, kind="train", worker="w2@h") == "succeeded"
    ref = _train_reference(runs)
    with sm() as s:
        row = dbjobs.get_job(s, job.id)
        assert row.attempts == 2 and row.lease_owner == "w2@h"
        for got, want in zip(row.result["runs"], ref):
            assert _close(got["final"], dbjobs.jsonable(want.final))
        hist = dbjobs.metric_history(s, job.id)
        assert sorted((p.run_index, p.epoch) for p in hist) == [(k, e) for k in (0, 1) for e in (2, 4, 6)]


def test_measure_job(worker_settings, sm, tmp_path):
    from ncengine.metrics import measure

    rng = np.random.default_rng(0)
    C, n, d = 3, 20, 5
    y = np.repeat(np.arange(C), n)
    H = rng.normal(size=(C * n, d)) + 3 * np.eye(C, d)[y]
    W = rng.normal(size=(C, d))
    paths = {}
    for name, arr in {"features": H, "labels": y, "weights": W}.items():
        paths[name] = str(tmp_path / f"{name}.npy")
        np.save(paths[name], arr)
    with sm() as s:
        job = dbjobs.create_job(s, kind="measure", config={
            "inputs": {**paths, "bias": None, "test_features": None, "test_labels": None},
            "options": {"num_classes": C, "center": "none"}})
    assert run_job(job.id, settings=worker_settings, kind="measure", worker="w@h") == "succeeded"
    want = dbjobs.jsonable(measure(H, y, W, num_classes=C).to_dict())
    with sm() as s:
        row = dbjobs.get_job(s, job.id)
        assert _close(row.result, want, tol=1e-9)
        (p,) = dbjobs.metric_history(s, job.id)
        assert (p.epoch, p.layer, p.nc1) == (0, -1, pytest.approx(want["nc1"]))
        (b,) = dbjobs.bound_history(s, job.id)
        assert _close(b.block, want["bounds"], tol=1e-9)


def test_measure_missing_file_is_input_error(worker_settings, sm, tmp_path):
    with sm() as s:
        job = dbjobs.create_job(s, kind="measure", config={
            "inputs": {"features": str(tmp_path / "nope.npy"), "labels": str(tmp_path / "nope2.npy")},
            "options": {}})
    assert run_job(job.id, settings=worker_settings, kind="measure", worker="w@h") == "failed"
    with sm() as s:
        assert dbjobs.get_job(s, job.id).error_code == "input_error"


def test_ufm_job(worker_settings, sm):
    from ncengine import ufm

    cfg = {"num_classes": 3, "dim": 4, "samples_per_class": 2, "weight_decay": 1e-2, "steps": 30, "seed": 1,
           "record_every": 10}
    with sm() as s:
        job = dbjobs.create_job(s, kind="ufm", config=cfg)
    assert run_job(job.id, settings=worker_settings, kind="ufm", worker="w@h") == "succeeded"
    ref = ufm.optimize(**cfg)
    with sm() as s:
        row = dbjobs.get_job(s, job.id)
        assert _close(row.result, dbjobs.jsonable(ref.final), tol=1e-9)
        assert [p.epoch for p in dbjobs.metric_history(s, job.id)] == [h["step"] for h in ref.history]
        assert row.progress_epoch == 30


def test_wrong_kind_message_fails(worker_settings, sm):
    with sm() as s:
        job = dbjobs.create_job(s, kind="measure", config={"inputs": {}, "options": {}})
    assert run_job(job.id, settings=worker_settings, kind="train", worker="w@h") in ("retrying", "failed")


def test_import_does_not_touch_torch():
    code = ("import sys, worker.celery_app, worker.tasks, worker.reconciler, db.jobs; "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_celery_app_options(worker_settings):
    from worker.celery_app import create_celery

    app = create_celery(worker_settings)
    c = app.conf
    assert (c.task_acks_late, c.task_reject_on_worker_lost, c.worker_prefetch_multiplier) == (True, True, 1)
    assert c.task_ignore_result is True and c.worker_hijack_root_logger is False
    assert {q.name for q in c.task_queues} == {"gpu", "cpu"}
    assert c.task_routes["ncs.train_bundle"] == {"queue": "gpu"} and c.task_routes["ncs.measure"] == {"queue": "cpu"}
    assert {"ncs.train_bundle", "ncs.measure", "ncs.ufm"} <= set(app.tasks)
    assert app.conf.broker_url == "filesystem://"
    assert (worker_settings.broker_dir / "out").is_dir()


def test_queues_route_by_kind(worker_settings):
    """A task sent to ``gpu`` is published with the gpu queue's own exchange/key (never the default's)."""
    from worker.celery_app import create_celery

    app = create_celery(worker_settings)
    queues = {q.name: q for q in app.conf.task_queues}
    for name in ("gpu", "cpu"):
        assert (queues[name].exchange.name, queues[name].routing_key) == (name, name)
    route = app.amqp.router.route({}, "ncs.train_bundle", args=["x"])
    assert route["queue"].name == "gpu" and route["queue"].routing_key == "gpu"


def test_cancel_flag_is_read_every_epoch_between_progress_writes(worker_settings, sm):
    """Progress writes are throttled (0.5 s) but the cancel flag is still read at an epoch's end: an epoch that
    ends 60 ms after the cancel (no progress write due) stops the run, and the epoch reached is recorded."""
    with sm() as s:
        job = dbjobs.create_job(s, kind="train", config={"runs": [tiny_run(0)]})
    with sm() as s:
        claimed = dbjobs.claim(s, job.id, worker="w@h", lease_seconds=30)
    ctx = tasks.JobContext(job=claimed, settings=worker_settings, sm=sm, worker="w@h",
                           read_sm=tasks.read_sessionmaker_for(worker_settings.resolved_database_url))
    ctx.progress(1, 100, force=True)  # written; no cancel yet
    ctx.progress(2, 100)  # within 0.5 s of the write and of the last flag read: nothing read, no raise
    with sm() as s:
        assert dbjobs.request_cancel(s, job.id).status == "cancelling"
    time.sleep(tasks.CANCEL_POLL_SECONDS + 0.01)
    assert time.monotonic() - ctx._last_progress < tasks.PROGRESS_SECONDS  # no progress write is due
    with pytest.raises(tasks.Canceled):
        ctx.progress(3, 100)
    with sm() as s:  # the flag read was a read: the stored progress is still the last write's
        assert dbjobs.get_job(s, job.id).progress_epoch == 1


def test_canceled_job_records_the_epoch_it_stopped_at(worker_settings, sm, monkeypatch):
    """run_job's cancel path stores the last epoch the runner reported, even when that epoch's progress write
    was throttled."""
    with sm() as s:
        job = dbjobs.create_job(s, kind="train", config={"runs": [tiny_run(0)]})

    def runner(ctx):
        ctx.progress(1, 10, force=True)
        with sm() as s:
            dbjobs.request_cancel(s, job.id)
        time.sleep(tasks.CANCEL_POLL_SECONDS + 0.01)
        ctx.progress(2, 10)  # throttled write; the flag read raises Canceled
        raise AssertionError("not stopped at epoch 2")

    monkeypatch.setitem(tasks.RUNNERS, "train", runner)
    assert run_job(job.id, settings=worker_settings, kind="train", worker="w@h") == "canceled"
    with sm() as s:
        row = dbjobs.get_job(s, job.id)
        assert (row.status, row.progress_epoch, row.progress_total) == ("canceled", 2, 10)
