"""Faults (issue 7) against the real components: PostgreSQL behind a TCP proxy we stop and start (503
problem+json meanwhile, recovery by itself), concurrent Idempotency-Key retries on PostgreSQL, the broker's
queue key deleted (the reconciler re-sends), Redis restarted with jobs queued (no job lost, the worker
reconnects), and cancellation of a running job (stops, idempotent). The kill -9 of a worker mid-training is
``tests/integration/test_cluster.py::test_killed_worker_job_is_resumed`` (service core)."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit, urlunsplit

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

import migrations
from api.app import create_app
from api.deps import get_queue
from db import jobs as dbjobs
from db.models import Job, Sweep
from ncservice.settings import Settings
from tests.api.conftest import RecordingQueue, assert_problem
from tests.integration.test_cluster import BASE, _client, _poll, cluster  # noqa: F401 - fixture reused
from worker.tasks import sessionmaker_for

SMALL = {"data": {"name": "teacher", "n": 60}, "model": {"depth": 2, "width": 8}, "schedule": {"epochs": 3}}


# ------------------------------------------------------------------------------------------ a TCP proxy
class TcpProxy:
    """A TCP forwarder on 127.0.0.1:<port> to ``target``; ``stop()`` closes the listener and every open
    connection (the server looks gone), ``start()`` listens again on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        if self._listener is not None:
            try:  # wakes the thread blocked in accept() (close() alone would leave the socket listening)
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()


def _via(url: str, port: int) -> str:
    u = urlsplit(url)
    auth = u.netloc.rsplit("@", 1)[0] + "@" if "@" in u.netloc else ""
    return urlunsplit((u.scheme, f"{auth}127.0.0.1:{port}", u.path, u.query, u.fragment))


def _api(settings: Settings):
    app = create_app(settings)
    app.dependency_overrides[get_queue] = RecordingQueue
    return app


# ----------------------------------------------------------------------------------- PostgreSQL outage
@pytest.mark.postgres
def test_postgres_unreachable_is_503_problem_json_and_recovers(postgres_url, tmp_path):
    migrations.upgrade(postgres_url)
    u = urlsplit(postgres_url.replace("postgresql+psycopg", "postgresql"))
    proxy = TcpProxy((u.hostname or "127.0.0.1", u.port or 5432))
    proxy.start()
    settings = Settings(_env_file=None, data_dir=tmp_path / "data", database_url=_via(postgres_url, proxy.port))
    app = _api(settings)
    try:
        with TestClient(app, raise_server_exceptions=False) as c:
            job_id = c.post("/jobs", json={"kind": "train", "config": SMALL}).json()["id"]
            assert c.get(f"/jobs/{job_id}").status_code == 200
            proxy.stop()  # the database is gone: its pooled connection is dead, new ones are refused
            t0 = time.monotonic()
            for r in (c.get(f"/jobs/{job_id}"), c.get("/jobs"), c.post("/jobs", json={"kind": "train",
                                                                                      "config": SMALL})):
                body = assert_problem(r, 503, "database")
                assert body["type"] == "urn:ncs:problem:database-unavailable"
                assert int(r.headers["retry-after"]) > 0
            assert time.monotonic() - t0 < 30  # answered, not hung
            assert_problem(c.get("/ready"), 503, "database")
            proxy.start()  # back: the next request works again, nothing restarted
            r = c.get(f"/jobs/{job_id}")
            assert r.status_code == 200 and r.json()["id"] == job_id
            assert c.get("/ready").json()["checks"]["database"]["ok"] is True
    finally:
        proxy.stop()
        app.state.engine.dispose()


# -------------------------------------------------------------------------------- idempotency, racing
@pytest.mark.postgres
@pytest.mark.parametrize("auth", ["anonymous", "key"])
def test_concurrent_idempotent_retries_create_one_row(postgres_url, tmp_path, auth):
    """Eight clients retry the same POST /jobs, /sweeps and /measure at the same moment with one
    Idempotency-Key: every answer is the first one, and one job / one sweep exists."""
    from db.keys import create_key

    migrations.upgrade(postgres_url)
    settings = Settings(_env_file=None, data_dir=tmp_path / "data", database_url=postgres_url,
                        measure_sync_max_elements=10)
    app = _api(settings)
    headers = {}
    if auth == "key":
        with app.state.sessionmaker() as s:
            headers["Authorization"] = f"Bearer {create_key(s, name='it')[1]}"
    measure = {"features": [[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]], "labels": [0, 0, 1, 1]}
    posts = [("/jobs", {"kind": "train", "config": SMALL}), ("/sweeps", {"base": SMALL, "seeds": [0, 1]}),
             ("/measure?async=true", measure)]
    try:
        with TestClient(app, raise_server_exceptions=False) as c:
            for path, body in posts:
                h = {**headers, "Idempotency-Key": f"race-{path}"}
                with ThreadPoolExecutor(8) as pool:
                    answers = list(pool.map(lambda _: c.post(path, json=body, headers=h), range(8)))
                assert {r.status_code for r in answers} == {202}, [r.text for r in answers]
                assert len({r.json()["id"] for r in answers}) == 1, path
                assert len({r.headers["location"] for r in answers}) == 1
            with app.state.sessionmaker() as s:
                assert s.scalar(select(func.count()).select_from(Sweep)) == 1
                # one job for /jobs, one per bundle of the sweep (1 bundle of 2 seeds), one for /measure
                assert s.scalar(select(func.count()).select_from(Job)) == 3
    finally:
        app.state.engine.dispose()


# ------------------------------------------------------------------------------ broker faults (Redis)
def _redis(url):
    import redis

    return redis.Redis.from_url(url)


@pytest.mark.postgres
@pytest.mark.redis
def test_broker_message_deleted_the_reconciler_resends(cluster, redis_url, redis_prefix):  # noqa: F811
    from worker.reconciler import Reconciler

    settings, start_worker = cluster
    r = _redis(redis_url)
    with _client(settings) as client:
        jid = client.post("/jobs", json={"kind": "train", "config": BASE}).json()["id"]
        key = f"{redis_prefix}gpu"
        assert r.llen(key) == 1  # the message is in the broker ...
        r.delete(key)  # ... and lost outright
        start_worker()
        time.sleep(1.0)
        assert client.get(f"/jobs/{jid}").json()["status"] == "queued"  # nobody got it
        rec = Reconciler(settings)
        rec.start()
        try:
            job = _poll(client, jid, timeout=120)
        finally:
            rec.stop()
    assert job["status"] == "succeeded", job
    with sessionmaker_for(settings.resolved_database_url)() as s:
        assert sorted(p.epoch for p in dbjobs.metric_history(s, jid)) == [2, 4]  # ran once, no duplicates


def _restart_redis(url: str) -> None:
    subprocess.run(["redis-cli", "-p", "6379", "shutdown", "nosave"], capture_output=True, timeout=30)
    _start_redis(url)


def _start_redis(url: str) -> None:
    try:
        if _redis(url).ping():
            return
    except Exception:  # noqa: BLE001 - not up
        pass
    subprocess.run(["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379",
                    "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis",
                    "--logfile", "/var/log/redis/ci.log"], check=True, timeout=30)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if _redis(url).ping():
                return
        except Exception:  # noqa: BLE001
            time.sleep(0.1)
    raise RuntimeError("redis-server did not come back")


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.slow
def test_redis_restart_with_jobs_queued_loses_no_job(cluster, redis_url):  # noqa: F811
    from worker.reconciler import Reconciler

    settings, start_worker = cluster
    rec = Reconciler(settings)
    try:
        with _client(settings) as client:
            # a worker that consumed before the restart must keep consuming after it
            start_worker()
            first = client.post("/jobs", json={"kind": "train", "config": BASE}).json()["id"]
            assert _poll(client, first, timeout=120)["status"] == "succeeded"
            queued = [client.post("/jobs", json={"kind": "train", "config": {**BASE, "seed": i}}).json()["id"]
                      for i in range(2)]
            _restart_redis(redis_url)  # the queued messages are gone with it
            queued.append(client.post("/jobs", json={"kind": "train", "config": {**BASE, "seed": 9}}).json()["id"])
            rec.start()
            finals = [_poll(client, jid, timeout=150) for jid in queued]
    finally:
        rec.stop()
        _start_redis(redis_url)
    assert [f["status"] for f in finals] == ["succeeded"] * 3, finals


# ------------------------------------------------------------------------------------------ cancellation
@pytest.mark.postgres
@pytest.mark.redis
def test_cancel_stops_a_running_job_and_is_idempotent(cluster):  # noqa: F811
    settings, start_worker = cluster
    epochs = 2000
    config = {**BASE, "schedule": {"epochs": epochs}, "measure": {"every": 1000}}
    start_worker()
    with _client(settings) as client:
        jid = client.post("/jobs", json={"kind": "train", "config": config}).json()["id"]
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            j = client.get(f"/jobs/{jid}").json()
            if j["status"] == "running" and ((j["progress"] or {}).get("epoch") or 0) >= 2:
                break
            time.sleep(0.05)
        first = client.post(f"/jobs/{jid}/cancel")
        # 202 while the worker has yet to stop (cancelling), 200 once canceled
        assert first.status_code in (200, 202) and first.json()["status"] in ("cancelling", "canceled"), first.text
        asked_at = time.monotonic()
        again = client.post(f"/jobs/{jid}/cancel")
        assert again.status_code in (200, 202) and again.json()["status"] in ("cancelling", "canceled")
        job = _poll(client, jid, timeout=60, until=("canceled", "succeeded", "failed"))
        stopped_after = time.monotonic() - asked_at
        assert client.post(f"/jobs/{jid}/cancel").json()["status"] == "canceled"  # still idempotent at the end
    assert job["status"] == "canceled", job
    assert job["progress"]["epoch"] < epochs
    with sessionmaker_for(settings.resolved_database_url)() as s:
        statuses = [e.status for e in dbjobs.job_events(s, jid)]
    assert statuses.count("cancelling") <= 1 and statuses.count("canceled") == 1, statuses
    # the worker reads the flag with its progress write (every <= 0.5 s) or heartbeat and stops at the next
    # epoch boundary: bounded by that interval plus one epoch, far below the rest of the run
    assert stopped_after < 10, stopped_after
