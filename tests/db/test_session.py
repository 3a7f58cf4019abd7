"""db.session: SQLite pragmas and BEGIN IMMEDIATE; sessions keep objects after commit."""

from __future__ import annotations

import sqlite3
import threading
import time

from sqlalchemy import text

from db.session import make_engine, make_sessionmaker


def test_sqlite_pragmas(sqlite_url):
    engine = make_engine(sqlite_url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    engine.dispose()


def test_sqlite_transactions_take_the_write_lock_at_begin(sqlite_url):
    """While a SQLAlchemy transaction is open (even one that only read), a plain sqlite3 writer with no
    busy timeout is refused: the transaction began with BEGIN IMMEDIATE, not a deferred BEGIN."""
    engine = make_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
    path = sqlite_url.removeprefix("sqlite:///")
    with engine.connect() as conn:
        conn.execute(text("SELECT count(*) FROM t")).scalar()  # a read opens the transaction
        other = sqlite3.connect(path, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            raise AssertionError("the write lock should be held")
        except sqlite3.OperationalError as exc:
            assert "locked" in str(exc)
        finally:
            other.close()
        conn.commit()
    engine.dispose()


def test_sqlite_second_writer_waits_instead_of_failing(sqlite_url):
    engine = make_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
    errors: list[BaseException] = []

    def hold():
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO t VALUES (1)"))
            time.sleep(0.5)

    th = threading.Thread(target=hold)
    th.start()
    time.sleep(0.1)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO t VALUES (2)"))
    except Exception as exc:  # pragma: no cover - the failure this test guards against
        errors.append(exc)
    th.join()
    assert errors == []
    with engine.connect() as conn:
        assert sorted(conn.execute(text("SELECT x FROM t")).scalars()) == [1, 2]
    engine.dispose()


def test_expire_on_commit_false(migrated_sqlite_url):
    from db import jobs

    engine = make_engine(migrated_sqlite_url)
    sm = make_sessionmaker(engine)
    with sm() as s:
        job = jobs.create_job(s, kind="measure", config={"a": 1})
    assert job.config == {"a": 1}  # readable after the session closed
    engine.dispose()
