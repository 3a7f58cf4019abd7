from __future__ import annotations

import pytest

from ncservice.settings import Settings


def tiny_run(seed: int, epochs: int = 6, every: int = 2) -> dict:
    """A RunConfig json small enough for CPU tests (64 samples, 4 classes, depth 3, width 16)."""
    return {"data": {"name": "teacher", "n": 64, "num_classes": 4, "input_dim": 8, "teacher_width": 16},
            "model": {"depth": 3, "width": 16}, "optim": {"batch_size": 32},
            "schedule": {"epochs": epochs}, "measure": {"every": every}, "seed": seed}


@pytest.fixture
def worker_settings(migrated_sqlite_url, tmp_path) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=migrated_sqlite_url, lease_seconds=10.0,
                    heartbeat_seconds=0.2, checkpoint_every=2, max_attempts=3, requeue_after_seconds=60)


@pytest.fixture
def sm(worker_settings):
    from worker.tasks import sessionmaker_for

    return sessionmaker_for(worker_settings.resolved_database_url)
