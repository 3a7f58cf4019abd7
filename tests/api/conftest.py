"""API fixtures: a fresh migrated SQLite database per test, the app built on it, a recording queue.

The database is migrated once per session by Alembic (the schema exists only through migrations) and the
file copied for each test, so every test starts from an empty, migrated database in a few milliseconds.
"""

from __future__ import annotations

import shutil
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.deps import get_queue
from ncservice.settings import Settings


class RecordingQueue:
    """Fake Celery producer: records every send (name, args, task_id, queue) and never fails."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.reachable = True

    def enqueue(self, job_id: str, kind: str) -> bool:
        from db.models import QUEUES, TASK_NAMES

        self.sent.append({"name": TASK_NAMES[kind], "args": [job_id], "task_id": job_id, "queue": QUEUES[kind]})
        return True

    def ping(self, timeout: float = 2.0) -> None:
        if not self.reachable:
            raise ConnectionError("broker down (test)")


@pytest.fixture(scope="session")
def _migrated_template(tmp_path_factory) -> str:
    import migrations

    path = tmp_path_factory.mktemp("api-template") / "template.db"
    migrations.upgrade(f"sqlite:///{path}")
    return str(path)


@pytest.fixture
def api_db_url(_migrated_template, tmp_path) -> str:
    """A fresh SQLite database at the migrations' head (a copy of the session's template)."""
    path = tmp_path / "ncs.db"
    shutil.copyfile(_migrated_template, path)
    return f"sqlite:///{path}"


@pytest.fixture
def settings(api_db_url, tmp_path) -> Settings:
    return Settings(_env_file=None, data_dir=tmp_path / "data", database_url=api_db_url,
                    measure_sync_max_elements=10_000, max_upload_bytes=2_000_000, max_json_bytes=1_000_000)


@pytest.fixture
def queue() -> RecordingQueue:
    return RecordingQueue()


@pytest.fixture
def app(settings, queue):
    app = create_app(settings)
    app.dependency_overrides[get_queue] = lambda: queue
    yield app
    app.state.engine.dispose()


@pytest.fixture
def client(app):
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def sessionmaker(app):
    """Sessions on the app's database, to reach job states through ``db.jobs`` as a worker would."""
    return app.state.sessionmaker


@pytest.fixture
def keys(sessionmaker) -> dict[str, tuple[str, str]]:
    """Two user keys and an admin key, made before the app sees its first request: {name: (key id, token)}."""
    from db import keys as dbkeys

    out = {}
    with sessionmaker() as s:
        for name, admin in (("alice", False), ("bob", False), ("root", True)):
            key, token = dbkeys.create_key(s, name=name, admin=admin)
            out[name] = (key.id, token)
    return out


def bearer(token: str) -> dict[str, str]:
    """The ``Authorization`` header of an API key."""
    return {"Authorization": f"Bearer {token}"}


def assert_problem(resp, status: int, field: str | None = None) -> dict:
    """The response is RFC 9457 problem+json with ``status`` (and ``field`` when given)."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json"), resp.headers
    body = resp.json()
    assert body["status"] == status and body["type"].startswith("urn:ncs:problem:") and body["title"]
    if field is not None:
        assert body.get("field") == field, body
    return body
