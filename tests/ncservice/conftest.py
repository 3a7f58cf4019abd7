"""Fixtures of the client tests: the real API app on a fresh migrated SQLite database with a recording queue
(the same fixtures as ``tests/api``, reused, so the client is checked against the real routes' shapes)."""

from tests.api.conftest import _migrated_template, api_db_url, app, queue, sessionmaker, settings  # noqa: F401
