"""Shared fixtures. Service-backed fixtures skip when the server is absent, unless
NCS_REQUIRE_SERVICES=1 (set by .ci/run), where they fail instead: CI must never skip integration tests."""

from __future__ import annotations

import os
import socket

import pytest

POSTGRES_ADMIN_URL = os.environ.get("NCS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("NCS_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """Skip (or, in CI, fail) when a real server the test needs is not reachable."""
    if _reachable(host, port):
        return
    msg = f"{name} is not reachable on {host}:{port}"
    if os.environ.get("NCS_REQUIRE_SERVICES") == "1":
        pytest.fail(msg + " and NCS_REQUIRE_SERVICES=1")
    pytest.skip(msg)
