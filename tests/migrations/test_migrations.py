"""Migrations: upgrade from empty, downgrade to base, upgrade again, on SQLite and PostgreSQL; the migrated
schema equals the models (Alembic's autogenerate diff is empty). ``create_all`` is used nowhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

import migrations
from db.models import Base
from db.session import make_engine

TABLES = {"sweeps", "jobs", "job_events", "metric_points", "bound_records", "artifacts", "api_keys",
          "webhooks", "webhook_deliveries"}
REPO = Path(__file__).resolve().parents[2]


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def _diff(url: str) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return compare_metadata(ctx, Base.metadata)
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(empty_db_url):
    assert {"sweeps", "jobs", "job_events", "metric_points", "bound_records", "artifacts"} <= TABLES
    assert _tables(empty_db_url) == set()
    migrations.upgrade(empty_db_url)
    assert _tables(empty_db_url) == TABLES
    assert migrations.current(empty_db_url) == migrations.head()
    assert _diff(empty_db_url) == []
    migrations.downgrade(empty_db_url, "base")
    assert _tables(empty_db_url) == set()
    assert migrations.current(empty_db_url) is None
    migrations.upgrade(empty_db_url)
    assert _tables(empty_db_url) == TABLES
    assert _diff(empty_db_url) == []


def test_upgrade_is_idempotent(empty_db_url):
    migrations.upgrade(empty_db_url)
    migrations.upgrade(empty_db_url)
    assert migrations.current(empty_db_url) == migrations.head()


def test_single_head():
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory.from_config(migrations.alembic_config("sqlite://")).get_heads()
    assert len(heads) == 1


def test_migrate_command_from_another_cwd(tmp_path):
    """``ncservice migrate`` works from any working directory (no alembic.ini lookup in the cwd)."""
    url = f"sqlite:///{tmp_path / 'x.db'}"
    env = {**os.environ, "NCS_DATABASE_URL": url, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "ncservice.cli", "migrate"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert _tables(url) == TABLES
