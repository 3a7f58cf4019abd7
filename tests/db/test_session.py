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
        _assert_write_locked(path)
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


def test_sqlite_read_sessions_never_wait_for_a_writer(sqlite_url):
    """A read session (``make_read_sessionmaker``, the API's GET requests) begins deferred: while a plain sqlite3
    writer holds the write lock with an uncommitted change, it reads the last committed value at once (WAL
    snapshot, no busy wait), and it holds no lock that would keep that writer from committing."""
    from db.session import make_read_sessionmaker

    engine = make_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
        conn.execute(text("INSERT INTO t VALUES (1)"))
    path = sqlite_url.removeprefix("sqlite:///")
    writer = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE t SET x = 2")
        with make_read_sessionmaker(engine)() as s:
            t0 = time.perf_counter()
            assert s.execute(text("SELECT x FROM t")).scalar() == 1  # the committed snapshot
            assert time.perf_counter() - t0 < 1.0  # did not wait for the writer (busy timeout is 30 s)
            writer.execute("COMMIT")  # the open read transaction does not block the commit (WAL)
            s.commit()
            assert s.execute(text("SELECT x FROM t")).scalar() == 2
    finally:
        writer.close()
    # a writer's session still takes the write lock at BEGIN
    with make_sessionmaker(engine)() as s:
        s.execute(text("SELECT x FROM t")).scalar()
        _assert_write_locked(path)
    engine.dispose()


def _assert_write_locked(path: str) -> None:
    """Another connection cannot take the SQLite write lock of ``path`` now."""
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        raise AssertionError("the write lock should be held")
    except sqlite3.OperationalError as exc:
        assert "locked" in str(exc)
    finally:
        other.close()
