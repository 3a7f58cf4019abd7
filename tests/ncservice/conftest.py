"""Fixtures of the client tests: the real API app on a fresh migrated SQLite database with a recording queue
(the same fixtures as ``tests/api``, reused, so the client is checked against the real routes' shapes)."""

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from ncservice.cli import app as cli
from ncservice.client import NCClient
from tests.api.conftest import _migrated_template, api_db_url, app, queue, sessionmaker, settings  # noqa: F401


@pytest.fixture
def http(app):
    """FastAPI's TestClient on the app (errors answered as the server would, not raised)."""
    with TestClient(app, raise_server_exceptions=False) as tc:
        yield tc


@pytest.fixture
def invoke(http):
    """Run ``ncservice ARGS`` (typer's CliRunner) against the app; ``sleep`` is what the client does between
    polls."""
    runner = CliRunner()

    def run(*args: str, sleep=lambda s: None):
        factory = lambda url, key: NCClient(url, api_key=key, http_client=http, sleep=sleep)  # noqa: E731
        return runner.invoke(cli, list(args), obj={"client_factory": factory})

    return run
