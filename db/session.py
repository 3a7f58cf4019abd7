"""Engine and session factory from a URL passed in (``db`` never reads the environment).

SQLite (the embedded default): WAL journal, ``busy_timeout`` 30 s, foreign keys on, and every
transaction starts with ``BEGIN IMMEDIATE`` (the pysqlite recipe from SQLAlchemy's SQLite dialect docs:
the driver's own implicit BEGIN is switched off and the ``begin`` event emits ours). A transaction
therefore takes SQLite's write lock up front and waits for it (up to the busy timeout) instead of
failing with "database is locked" when it later upgrades a read lock to a write lock.

PostgreSQL: ``pool_pre_ping`` so a restarted server does not hand out dead connections.
"""

from __future__ import annotations

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000


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
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(u, **kwargs)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """A sessionmaker whose objects stay readable after commit (``expire_on_commit=False``)."""
    return sessionmaker(bind=engine, expire_on_commit=False)
