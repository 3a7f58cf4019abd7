"""Shared fixtures. Service-backed fixtures skip when the server is absent, unless
NCS_REQUIRE_SERVICES=1 (set by .ci/run), where they fail instead: CI must never skip integration tests."""

from __future__ import annotations

import os
import socket

import pytest

POSTGRES_ADMIN_URL = os.environ.get("NCS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("NCS_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """Skip (or, in CI, fail) when a real server the test needs is not reachable."""
    if _reachable(host, port):
        return
    msg = f"{name} is not reachable on {host}:{port}"
    if os.environ.get("NCS_REQUIRE_SERVICES") == "1":
        pytest.fail(msg + " and NCS_REQUIRE_SERVICES=1")
    pytest.skip(msg)


# ---------------------------------------------------------------------------- databases (service core)
# A fresh database per test, migrated to head by Alembic (the schema exists only through migrations).

import uuid  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402


def _pg_host_port() -> tuple[str, int]:
    u = urlsplit(POSTGRES_ADMIN_URL.replace("postgresql+psycopg", "postgresql"))
    return u.hostname or "127.0.0.1", u.port or 5432


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    """URL of a fresh, empty SQLite file (not migrated)."""
    return f"sqlite:///{tmp_path / 'ncs.db'}"


@pytest.fixture
def postgres_url():
    """URL of a fresh, empty PostgreSQL database ``ncs_test_<hex>``, dropped after the test."""
    from sqlalchemy import create_engine, text

    require_service("PostgreSQL", *_pg_host_port())
    name = f"ncs_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_db_url(request) -> str:
    """A fresh, empty database on each backend (SQLite file; PostgreSQL database)."""
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")


@pytest.fixture(scope="session")
def _migrated_templates(tmp_path_factory):
    """Databases migrated to head once per session, copied per test (a file copy for SQLite,
    ``CREATE DATABASE ... TEMPLATE`` for PostgreSQL): each test still gets its own fresh database."""
    created: dict[str, str] = {}
    yield created
    if "postgres" in created:
        from sqlalchemy import create_engine, text

        admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{created["postgres"]}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, _migrated_templates, tmp_path, tmp_path_factory) -> str:
    """A fresh database on each backend, migrated to head (by Alembic, via a per-session template)."""
    import shutil

    import migrations

    if request.param == "sqlite":
        if "sqlite" not in _migrated_templates:
            path = tmp_path_factory.mktemp("tmpl") / "ncs.db"
            migrations.upgrade(f"sqlite:///{path}")
            _migrated_templates["sqlite"] = str(path)
        shutil.copyfile(_migrated_templates["sqlite"], tmp_path / "ncs.db")
        return f"sqlite:///{tmp_path / 'ncs.db'}"
    from sqlalchemy import create_engine, text

    require_service("PostgreSQL", *_pg_host_port())
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        if "postgres" not in _migrated_templates:
            tmpl = f"ncs_tmpl_{uuid.uuid4().hex[:12]}"
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{tmpl}"'))
            migrations.upgrade(f"{base}/{tmpl}")
            _migrated_templates["postgres"] = tmpl
        name = f"ncs_test_{uuid.uuid4().hex[:12]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{_migrated_templates["postgres"]}"'))
        request.addfinalizer(lambda: _drop_pg(name))
    finally:
        admin.dispose()
    return f"{base}/{name}"


def _drop_pg(name: str) -> None:
    from sqlalchemy import create_engine, text

    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def migrated_sqlite_url(sqlite_url) -> str:
    """A fresh SQLite file migrated to head."""
    import migrations

    migrations.upgrade(sqlite_url)
    return sqlite_url


@pytest.fixture
def db_engine(db_url):
    from db.session import make_engine

    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def db_sessionmaker(db_engine):
    from db.session import make_sessionmaker

    return make_sessionmaker(db_engine)


@pytest.fixture
def db_session(db_sessionmaker):
    with db_sessionmaker() as session:
        yield session


@pytest.fixture
def redis_url() -> str:
    """The test Redis URL (db 15); pair it with a unique key prefix (``redis_prefix``)."""
    u = urlsplit(REDIS_URL)
    require_service("Redis", u.hostname or "127.0.0.1", u.port or 6379)
    return REDIS_URL


@pytest.fixture
def redis_prefix(redis_url):
    """A fresh key prefix ``ncs_test_<hex>_`` on the test Redis; its keys are deleted after the test."""
    import redis

    prefix = f"ncs_test_{uuid.uuid4().hex[:12]}_"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=prefix + "*"))
    if keys:
        client.delete(*keys)
    client.close()
