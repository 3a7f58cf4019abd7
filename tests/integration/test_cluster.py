"""The cluster flow against real PostgreSQL + Redis with a real Celery worker subprocess
(``ncservice worker``) and the API (``api.app.create_app`` through TestClient): POST a small sweep, poll
``/jobs/<id>`` until done, metric history and bounds in the DB, results equal to calling ncengine directly
with the same configs and seeds; an async /measure job; a killed worker's job finished by the next one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import migrations
from db import jobs as dbjobs
from ncservice.settings import Settings
from worker.tasks import sessionmaker_for

pytestmark = [pytest.mark.postgres, pytest.mark.redis]
REPO = Path(__file__).resolve().parents[2]
BASE = {"data": {"name": "teacher", "n": 64, "num_classes": 4, "input_dim": 8, "teacher_width": 16},
        "model": {"depth": 3, "width": 16}, "optim": {"batch_size": 32}, "schedule": {"epochs": 4},
        "measure": {"every": 2}}


@pytest.fixture
def cluster(postgres_url, redis_url, redis_prefix, tmp_path):
    migrations.upgrade(postgres_url)
    env_vars = {"NCS_DATABASE_URL": postgres_url, "NCS_BROKER_URL": redis_url, "NCS_BROKER_KEY_PREFIX": redis_prefix,
                "NCS_DATA_DIR": str(tmp_path / "data"), "NCS_HEARTBEAT_SECONDS": "0.5", "NCS_LEASE_SECONDS": "5",
                "NCS_CHECKPOINT_EVERY": "2", "NCS_REQUEUE_AFTER_SECONDS": "2", "NCS_RECONCILE_SECONDS": "0.5"}
    settings = Settings(**{k.removeprefix("NCS_").lower(): v for k, v in env_vars.items()})
    env = {**os.environ, **env_vars, "PYTHONPATH": str(REPO)}
    workers: list[subprocess.Popen] = []

    def start_worker() -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-m", "ncservice.cli", "worker", "--queues", "gpu,cpu",
                              "--loglevel", "WARNING"], env=env, cwd=tmp_path, start_new_session=True)
        workers.append(p)
        return p

    yield settings, start_worker
    for p in workers:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in workers:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _client(settings):
    from fastapi.testclient import TestClient

    from api.app import create_app

    return TestClient(create_app(settings))


def _poll(client, job_id, timeout=180.0, until=("succeeded", "failed", "canceled")):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get(f"/jobs/{job_id}")
        assert r.status_code == 200, r.text
        if r.json()["status"] in until:
            return r.json()
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {r.json()['status']} after {timeout} s")


def _close(a, b, tol=1e-5):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and abs(a - b) <= tol * max(1.0, abs(b))
    return a == b


def test_sweep_end_to_end(cluster):
    from ncengine import sweep, train
    from ncengine.config import RunConfig

    settings, start_worker = cluster
    start_worker()
    spec = {"name": "it", "base": BASE, "grid": {"model.batch_norm": ["affine", "none"]}, "seeds": [0, 1]}
    with _client(settings) as client:
        r = client.post("/sweeps", json=spec)
        assert r.status_code == 202, r.text
        body = r.json()
        assert r.headers["location"].endswith(body["id"])
        job_ids = [j["id"] for j in body["jobs"]]
        finals = {jid: _poll(client, jid) for jid in job_ids}
        assert {f["status"] for f in finals.values()} == {"succeeded"}, finals
        # the reference: ncengine called directly on the same configs, bundled the same way
        configs = sweep.expand({k: v for k, v in spec.items() if k != "name"})
        ref = {r.config.model_dump_json(): r for r in train.run(configs, device="cpu")}
        sm = sessionmaker_for(settings.resolved_database_url)
        n_runs = 0
        for jid in job_ids:
            final = finals[jid]["final"]
            for run in final["runs"]:
                want = ref[RunConfig.model_validate(run["config"]).model_dump_json()]
                assert _close(run["final"], dbjobs.jsonable(want.final)), jid
                n_runs += 1
            with sm() as s:
                hist = dbjobs.metric_history(s, jid)
                assert sorted({p.epoch for p in hist}) == [2, 4]
                assert len(hist) == 2 * len(final["runs"])
                assert len(dbjobs.bound_history(s, jid)) == 2 * len(final["runs"])
            m = client.get(f"/jobs/{jid}/metrics")
            assert m.status_code == 200 and len(m.json()["items"]) >= 1
        assert n_runs == 4


def test_async_measure_job(cluster):
    from ncengine.metrics import measure

    settings, start_worker = cluster
    start_worker()
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(3), 10)
    H = rng.normal(size=(30, 4)) + 2 * np.eye(3, 4)[y]
    W = rng.normal(size=(3, 4))
    with _client(settings) as client:
        r = client.post("/measure?async=true", json={"features": H.tolist(), "labels": y.tolist(),
                                                     "weights": W.tolist()})
        assert r.status_code == 202, r.text
        job = _poll(client, r.json()["id"])
    assert job["status"] == "succeeded", job
    want = dbjobs.jsonable(measure(H, y, W).to_dict())
    assert job["final"]["nc1"] == pytest.approx(want["nc1"], rel=1e-9)
    assert job["final"]["min_loss_m"] == pytest.approx(want["min_loss_m"], rel=1e-9)


@pytest.mark.slow
def test_killed_worker_job_is_resumed(cluster):
    """SIGKILL the worker mid-training: the lease expires, the reconciler re-sends the job, a new worker
    takes it over from its checkpoint, and the result equals an uninterrupted run."""
    from ncengine import train
    from worker.reconciler import Reconciler

    settings, start_worker = cluster
    # ~2 s of training on a quiet machine: long enough to be seen running (progress is written every 0.5 s)
    runs = [{**BASE, "schedule": {"epochs": 600}, "measure": {"every": 200}, "seed": 5}]
    sm = sessionmaker_for(settings.resolved_database_url)
    with _client(settings) as client:
        r = client.post("/jobs", json={"kind": "train", "config": runs[0]})
        assert r.status_code == 202, r.text
        jid = r.json()["id"]
        first = start_worker()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            j = client.get(f"/jobs/{jid}").json()
            if j["status"] == "running" and ((j["progress"] or {}).get("epoch") or 0) >= 8:
                break
            assert j["status"] in ("queued", "running"), f"the job ended before the worker could be killed: {j}"
            time.sleep(0.1)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        rec = Reconciler(settings)
        rec.start()
        try:
            start_worker()
            job = _poll(client, jid, timeout=240)
        finally:
            rec.stop()
    assert job["status"] == "succeeded" and job["attempts"] == 2, job
    ref = train.run(runs, device="cpu")[0]
    assert _close(job["final"]["runs"][0]["final"], dbjobs.jsonable(ref.final))
    with sm() as s:
        assert sorted(p.epoch for p in dbjobs.metric_history(s, jid)) == [200, 400, 600]
