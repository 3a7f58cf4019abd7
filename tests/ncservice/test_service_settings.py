"""Service settings of the performance work (issue 7, "Load"): uvicorn worker processes per database kind, the
embedded worker's CPU niceness, extra broker transport options."""

from __future__ import annotations

import os

from ncservice.settings import Settings


def test_api_workers_auto_is_one_on_sqlite_and_cpus_capped_at_4_on_postgres(tmp_path):
    sqlite = Settings(_env_file=None, data_dir=tmp_path)
    assert sqlite.resolved_api_workers == 1
    pg = Settings(_env_file=None, data_dir=tmp_path, database_url="postgresql+psycopg://u@h/db")
    assert pg.resolved_api_workers == max(1, min(4, os.cpu_count() or 1))
    assert Settings(_env_file=None, data_dir=tmp_path, api_workers=3).resolved_api_workers == 3


def test_broker_options_reach_the_transport_options(tmp_path, monkeypatch):
    monkeypatch.setenv("NCS_BROKER_OPTIONS", '{"visibility_timeout": 2, "unacked_restore_interval": 0.5}')
    redis = Settings(_env_file=None, data_dir=tmp_path, broker_url="redis://h:6379/0", broker_key_prefix="p_")
    assert redis.broker_transport_options() == {"visibility_timeout": 2, "unacked_restore_interval": 0.5,
                                                "global_keyprefix": "p_"}
    fs = Settings(_env_file=None, data_dir=tmp_path).broker_transport_options()
    assert fs["visibility_timeout"] == 2 and fs["data_folder_in"] == str((tmp_path / "broker" / "out").resolve())


def test_worker_nice_lowers_the_worker_priority(tmp_path, monkeypatch):
    """run_worker applies NCS_WORKER_NICE with os.nice before Celery starts (serve sets 10 for its worker)."""
    from ncservice import service

    calls: list[int] = []
    monkeypatch.setattr(os, "nice", lambda inc: calls.append(inc) or inc)
    monkeypatch.setenv("NCS_WORKER_NICE", "7")
    monkeypatch.setenv("NCS_DATA_DIR", str(tmp_path))
    service.get_settings.cache_clear()

    class FakeApp:
        def worker_main(self, argv):
            calls.append(argv[0])

    import worker.celery_app

    monkeypatch.setattr(worker.celery_app, "create_celery", lambda settings: FakeApp())
    monkeypatch.setattr(service, "_logging", lambda *a, **k: None)  # leave the test session's logging alone
    try:
        service.run_worker("cpu", "WARNING")
    finally:
        service.get_settings.cache_clear()
    assert calls == [7, "worker"]
    assert service.EMBEDDED_WORKER_NICE == 10
