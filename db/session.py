"""Engine and session factory from a URL passed in (``db`` never reads the environment).

SQLite (the embedded default): WAL journal, ``busy_timeout`` 30 s, foreign keys on, and every
transaction starts with ``BEGIN IMMEDIATE`` (the pysqlite recipe from SQLAlchemy's SQLite dialect docs:
the driver's own implicit BEGIN is switched off and the ``begin`` event emits ours). A transaction
therefore takes SQLite's write lock up front and waits for it (up to the busy timeout) instead of
failing with "database is locked" when it later upgrades a read lock to a write lock.

Readers do not take the write lock: a session from :func:`make_read_sessionmaker` (the API's GET requests)
runs on the same engine with the execution option ``ncs_read_only``, and its transactions start with a plain
(deferred) ``BEGIN``. In WAL mode such a reader reads the last committed snapshot and never waits for a
writer (nor a writer for it), so polling ``GET /jobs/{id}`` does not queue behind the worker's writes. A
read-only session may still write (its first write statement then takes the write lock, waiting up to the
busy timeout), but it should end its read transaction first (commit) so it never upgrades a stale snapshot.

PostgreSQL: ``pool_pre_ping`` so a restarted server does not hand out dead connections.
"""

from __future__ import annotations

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000
#: execution option of read-only engines/sessions: SQLite transactions start with a deferred BEGIN
READ_ONLY_OPTION = "ncs_read_only"


def make_engine(url: str, **kwargs) -> Engine:
    """Create an engine for ``url`` with the settings above.

    Args:
        url: SQLAlchemy URL, e.g. ``sqlite:////abs/path/ncs.db`` or ``postgresql+psycopg://u@h/db``.
        **kwargs: passed to :func:`sqlalchemy.create_engine`.
    """
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        connect_args = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}
        connect_args.update(kwargs.pop("connect_args", {}))
        engine = create_engine(u, connect_args=connect_args, **kwargs)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):  # pragma: no cover - exercised by every SQLite test
            dbapi_conn.isolation_level = None  # let the "begin" event issue BEGIN, not pysqlite
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn):  # pragma: no cover - exercised by every SQLite test
            read_only = conn.get_execution_options().get(READ_ONLY_OPTION, False)
            conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(u, **kwargs)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """A sessionmaker whose objects stay readable after commit (``expire_on_commit=False``)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def make_read_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions for readers: the same engine and pool with the ``ncs_read_only`` execution option, so that on
    SQLite their transactions start with a deferred ``BEGIN`` (WAL snapshot reads that never wait for the
    write lock); on PostgreSQL the option changes nothing (MVCC readers never block)."""
    return sessionmaker(bind=engine.execution_options(**{READ_ONLY_OPTION: True}), expire_on_commit=False)
