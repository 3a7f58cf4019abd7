"""/health (liveness) and /ready (database reachable + migrated, broker reachable)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from api.app import create_app
from api.deps import get_queue
from ncservice.settings import Settings
from tests.api.conftest import RecordingQueue, assert_problem


def test_health(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_ready_when_migrated_and_broker_up(client):
    import migrations

    r = client.get("/ready")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ready" and all(c["ok"] for c in body["checks"].values())
    assert migrations.head() in body["checks"]["migrations"]["detail"]


def test_not_ready_when_broker_down(client, queue):
    queue.reachable = False
    body = assert_problem(client.get("/ready"), 503, "broker")
    assert body["checks"]["broker"]["ok"] is False and body["checks"]["database"]["ok"] is True


def _client_on(url, tmp_path):
    app = create_app(Settings(_env_file=None, data_dir=tmp_path / "d", database_url=url))
    app.dependency_overrides[get_queue] = RecordingQueue
    return app, TestClient(app, raise_server_exceptions=False)


def test_not_ready_when_not_migrated(tmp_path):
    app, client = _client_on(f"sqlite:///{tmp_path / 'empty.db'}", tmp_path)
    with client:
        body = assert_problem(client.get("/ready"), 503, "migrations")
        assert "ncservice migrate" in body["checks"]["migrations"]["detail"]
    app.state.engine.dispose()


def test_not_ready_when_database_unreachable(tmp_path):
    app, client = _client_on(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'x.db'}", tmp_path)
    with client:
        body = assert_problem(client.get("/ready"), 503, "database")
        assert body["checks"]["database"]["ok"] is False
    app.state.engine.dispose()


def test_real_producer_reaches_the_filesystem_broker(tmp_path):
    """The Celery producer built from default settings (filesystem transport under data_dir) answers ping and
    writes one message file per enqueued job into the broker folder."""
    from api.queue import CeleryProducer

    settings = Settings(_env_file=None, data_dir=tmp_path / "data")
    producer = CeleryProducer(settings)
    try:
        producer.ping(timeout=2)
        assert producer.enqueue("0123456789abcdef0123456789abcdef", "measure")
        out = settings.broker_dir / "out"
        files = list(out.iterdir())
        assert len(files) == 1 and b"ncs.measure" in files[0].read_bytes() and files[0].name.endswith(".cpu.msg")
    finally:
        producer.close()
    # the worker's Celery app (configured independently) receives it from its cpu queue
    from worker.celery_app import create_celery

    consumer = create_celery(settings, register_tasks=False)
    try:
        with consumer.connection_for_read() as conn:
            msg = conn.default_channel.basic_get("cpu")
            assert msg is not None
            assert msg.headers["task"] == "ncs.measure" and msg.headers["id"] == "0123456789abcdef0123456789abcdef"
            assert msg.decode()[0] == ["0123456789abcdef0123456789abcdef"]  # (args, kwargs, embed)
    finally:
        consumer.close()


def test_prometheus_metrics_count_requests_by_route_template(client):
    client.get("/jobs/abc")
    client.get("/jobs/def")
    text = client.get("/metrics").text
    line = next(ln for ln in text.splitlines()
                if ln.startswith("ncs_http_requests_total") and 'route="/jobs/{job_id}"' in ln)
    assert 'status="404"' in line and line.endswith(" 2.0")
    assert "/jobs/abc" not in text
