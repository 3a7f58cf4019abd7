"""Fuzzing: schemathesis generates requests from the app's own OpenAPI schema (valid and invalid ones) and sends
them in-process (ASGI, no network server). Properties: never a 5xx, and every error is RFC 9457 problem+json
with ``type``, ``title`` and ``status`` equal to the HTTP status. Bounded: a few examples per operation."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, Phase, settings

from api.app import create_app
from api.deps import get_queue
from ncservice.settings import Settings
from tests.api.conftest import RecordingQueue


def _build_app():
    """The app under test, built at import (schemathesis collects one test per operation from its schema);
    its database is migrated by the module fixture below before any request is sent."""
    root = Path(tempfile.mkdtemp(prefix="ncs-fuzz-"))
    url = f"sqlite:///{root / 'ncs.db'}"
    cfg = Settings(_env_file=None, data_dir=root / "data", database_url=url, measure_sync_max_elements=10_000,
                   max_upload_bytes=1_000_000, max_json_bytes=1_000_000, max_sweep_runs=50,
                   max_total_epochs=5_000)
    app = create_app(cfg)
    app.dependency_overrides[get_queue] = RecordingQueue
    return app, root, url


APP, ROOT, DB_URL = _build_app()
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
# valid requests (must not 5xx) and invalid ones (must be refused as problem+json, never 5xx)
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                with_security_parameters=False)  # no key exists: auth is off on loopback


@pytest.fixture(scope="module", autouse=True)
def _migrated():
    import migrations

    migrations.upgrade(DB_URL)
    yield
    APP.state.engine.dispose()
    shutil.rmtree(ROOT, ignore_errors=True)


@schema.parametrize()
@settings(max_examples=12, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
def test_no_server_error_and_every_error_is_problem_json(case):
    response = case.call()
    where = f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
    assert response.status_code < 500, where
    if response.status_code >= 400:
        ctype = response.headers.get("content-type") or [""]  # schemathesis: header -> list of values
        assert ctype[0].startswith("application/problem+json"), where
        body = json.loads(response.text)
        assert body["status"] == response.status_code, where
        assert body["type"].startswith("urn:ncs:problem:") and body["title"], where
