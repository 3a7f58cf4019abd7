"""Service commands of ``ncservice``: ``serve`` (embedded), ``api``, ``worker``, ``reconciler``, ``migrate``.

Embedded (``ncservice serve``, nothing to configure): SQLite + Celery's filesystem transport under
``./ncs-data`` (``NCS_DATA_DIR``); runs the migrations, then starts uvicorn (``api.app:create_app``) and a
real Celery worker (queues ``gpu,cpu``, solo pool) as subprocesses and the reconciler as a thread, and stops
them all on Ctrl-C / SIGTERM (the worker at CPU niceness 10, so training yields the cores to the API;
children get SIGTERM, then SIGKILL after ``NCS_SHUTDOWN_GRACE_SECONDS``; a
job interrupted that way is released and resumes from its checkpoint on the next start).

Cluster: ``NCS_DATABASE_URL=postgresql+psycopg://...`` and ``NCS_BROKER_URL=redis://...`` on every machine;
``ncservice migrate`` once, ``ncservice api`` (runs the reconciler too unless ``--no-reconciler``; several
reconcilers are safe; ``NCS_API_WORKERS`` uvicorn processes, by default min(4, CPUs) on PostgreSQL and 1 on
SQLite) and ``ncservice worker --queues gpu`` per GPU (``CUDA_VISIBLE_DEVICES``) or
``--queues cpu``. ``ncservice reconciler`` runs the reconciler alone.
"""

from __future__ import annotations

import logging
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import typer

from ncservice.settings import Settings, get_settings

#: CPU niceness of the Celery worker that ``ncservice serve`` starts (``NCS_WORKER_NICE`` overrides it)
EMBEDDED_WORKER_NICE = 10
#: prometheus-client's multiprocess folder (api.metrics.MULTIPROC_ENV), set when uvicorn runs several workers
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

log = logging.getLogger("ncservice")


def _logging(level: str = "INFO") -> None:
    """JSON lines unless stderr is a TTY (``NCS_LOG_FORMAT``: auto|json|text), see ``ncservice.logs``."""
    from ncservice.logs import setup_logging

    setup_logging(level, fmt=get_settings().log_format)


def migrate_db(settings: Settings, revision: str = "head") -> None:
    """Upgrade the settings' database to ``revision`` (creates the SQLite folder first)."""
    import migrations

    if settings.is_sqlite:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrations.upgrade(settings.resolved_database_url, revision)


def _wait_for_stop(stop: threading.Event) -> None:
    def handler(signum, _frame):
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)  # a closed terminal or a dropped SSH session stops it too


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM when ``serve`` dies, even by SIGKILL, so no orphan keeps the port."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _terminate(procs: dict[str, subprocess.Popen], grace: float) -> None:
    for name, p in procs.items():
        if p.poll() is None:
            log.info("stopping %s (pid %d)", name, p.pid)
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for name, p in procs.items():
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s: killing it", name, grace)
            p.kill()
            p.wait()


def serve(host: str | None = None, port: int | None = None) -> int:
    """Run the embedded service until SIGINT/SIGTERM/SIGHUP; returns the exit code."""
    from worker.reconciler import Reconciler

    _logging()
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    data_dir = settings.data_dir.resolve()
    migrate_db(settings)
    env = {**os.environ, "NCS_DATA_DIR": str(data_dir)}  # children resolve the same folder whatever their cwd
    # one machine for the API and training: the worker yields the CPU to the API, so polls stay fast
    env.setdefault("NCS_WORKER_NICE", str(EMBEDDED_WORKER_NICE))
    host = host or settings.host
    port = port or settings.port
    env["NCS_HOST"] = host  # the API checks its auth against the address it really listens on
    if not _auth_ok(settings.model_copy(update={"host": host})):
        return 2
    stop = threading.Event()
    _wait_for_stop(stop)
    procs: dict[str, subprocess.Popen] = {}
    # own sessions: a terminal's Ctrl-C reaches only this process, which stops the children in order
    procs["worker"] = subprocess.Popen([sys.executable, "-m", "ncservice.cli", "worker", "--queues", "gpu,cpu"],
                                       env=env, start_new_session=True, preexec_fn=_die_with_parent)
    workers = settings.resolved_api_workers
    if workers > 1:
        env[MULTIPROC_ENV] = str(_fresh_multiproc_dir(data_dir / "prometheus"))
    procs["api"] = subprocess.Popen([sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory",
                                     "--host", host, "--port", str(port), "--workers", str(workers)],
                                    env=env, start_new_session=True, preexec_fn=_die_with_parent)
    rec = Reconciler(settings)
    rec.start()
    log.info("NC service on http://%s:%d (data in %s); Ctrl-C stops it", host, port, data_dir)
    code = 0
    while not stop.wait(0.5):
        dead = [n for n, p in procs.items() if p.poll() is not None]
        if dead:
            log.error("%s exited (code %s): stopping the service", dead[0], procs[dead[0]].returncode)
            code = 1
            break
    rec.stop()
    _terminate(procs, settings.shutdown_grace_seconds)
    log.info("stopped")
    return code


def _fresh_multiproc_dir(path: Path) -> Path:
    """An empty folder for prometheus-client's multiprocess files (stale files of a previous run removed)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _auth_ok(settings: Settings) -> bool:
    """Refuse (log why, return False) to serve an API open beyond loopback (``api.auth.check_startup``)."""
    from api.auth import AuthConfigError, check_startup
    from db.session import make_engine, make_sessionmaker

    engine = make_engine(settings.resolved_database_url)
    try:
        check_startup(settings, make_sessionmaker(engine))
    except AuthConfigError as exc:
        log.error("%s", exc)
        return False
    finally:
        engine.dispose()
    return True


def run_worker(queues: str, loglevel: str = "INFO", name: str | None = None) -> None:
    """Run a Celery worker (solo pool: one job at a time; one worker per GPU) on ``queues``."""
    from worker.celery_app import create_celery

    _logging(loglevel)
    settings = get_settings()
    if settings.is_sqlite:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    if settings.worker_nice > 0:
        os.nice(settings.worker_nice)  # batch work: lower CPU priority than an API sharing the machine
    app = create_celery(settings)
    argv = ["worker", "-Q", queues, "-P", "solo", "--loglevel", loglevel, "-n", name or f"ncs-{os.getpid()}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat"]
    app.worker_main(argv)


def run_api(host: str | None, port: int | None, reconciler: bool) -> None:
    """Run uvicorn on ``api.app:create_app`` (and the reconciler thread unless disabled)."""
    import uvicorn

    _logging()
    settings = get_settings()
    if host:
        os.environ["NCS_HOST"] = host  # the factory's settings see the address it really listens on
        get_settings.cache_clear()
    if not _auth_ok(settings.model_copy(update={"host": host or settings.host})):
        raise SystemExit(2)
    rec = None
    if reconciler:
        from worker.reconciler import Reconciler

        rec = Reconciler(settings)
        rec.start()
    workers = settings.resolved_api_workers
    if workers > 1 and not os.environ.get(MULTIPROC_ENV):  # /metrics sums every worker process
        os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="ncs-prometheus-")
    log.info("API with %d uvicorn worker process(es)", workers)
    try:
        uvicorn.run("api.app:create_app", factory=True, host=host or settings.host, port=port or settings.port,
                    workers=workers)
    finally:
        if rec is not None:
            rec.stop()


def run_reconciler() -> None:
    """Run the reconciler alone until SIGINT/SIGTERM."""
    from worker.reconciler import Reconciler

    _logging()
    stop = threading.Event()
    _wait_for_stop(stop)
    rec = Reconciler(get_settings())
    rec.start()
    stop.wait()
    rec.stop()


def register(app: typer.Typer) -> None:
    """Add the service commands to the ``ncservice`` typer app."""

    @app.command("serve", epilog="Example:\n\n  $ ncservice serve --port 8000   # then open http://127.0.0.1:8000/")
    def serve_cmd(host: str = typer.Option(None, help="Bind address (default NCS_HOST, 127.0.0.1)."),
                  port: int = typer.Option(None, help="Port (default NCS_PORT, 8000).")) -> None:
        """Embedded service: SQLite + filesystem broker under NCS_DATA_DIR (./ncs-data), API + worker +
        reconciler. Ctrl-C stops everything."""
        raise typer.Exit(serve(host, port))

    @app.command("api", epilog="Example:\n\n  $ NCS_DATABASE_URL=postgresql+psycopg://ncs@db/ncs "
                 "NCS_BROKER_URL=redis://redis:6379/0 ncservice api --host 0.0.0.0")
    def api_cmd(host: str = typer.Option(None, help="Bind address (default NCS_HOST)."),
                port: int = typer.Option(None, help="Port (default NCS_PORT)."),
                reconciler: bool = typer.Option(True, help="Also run the reconciler in this process.")) -> None:
        """Run the REST API (cluster mode: NCS_DATABASE_URL, NCS_BROKER_URL)."""
        run_api(host, port, reconciler)

    @app.command("worker", epilog="Example:\n\n  $ CUDA_VISIBLE_DEVICES=0 ncservice worker --queues gpu\n\n"
                 "  $ ncservice worker --queues cpu")
    def worker_cmd(queues: str = typer.Option("gpu,cpu", help="Comma-separated queues: gpu (training), cpu "
                                                              "(measure, ufm)."),
                   loglevel: str = typer.Option("INFO"),
                   name: str = typer.Option(None, help="Celery node name (default ncs-<pid>@<host>).")) -> None:
        """Run a Celery worker (solo pool). One per GPU: CUDA_VISIBLE_DEVICES=i ncservice worker --queues gpu."""
        run_worker(queues, loglevel, name)

    @app.command("reconciler", epilog="Example:\n\n  $ NCS_DATABASE_URL=... NCS_BROKER_URL=... ncservice reconciler")
    def reconciler_cmd() -> None:
        """Run the reconciler alone (re-sends lost jobs and jobs whose worker died)."""
        run_reconciler()

    @app.command("migrate", epilog="Example:\n\n  $ NCS_DATABASE_URL=postgresql+psycopg://ncs@db/ncs ncservice migrate")
    def migrate_cmd(revision: str = typer.Option("head", help="Alembic revision to upgrade to.")) -> None:
        """Create or upgrade the database schema (Alembic), from any working directory."""
        _logging()
        settings = get_settings()
        migrate_db(settings, revision)
        typer.echo(f"database at revision {revision}")
