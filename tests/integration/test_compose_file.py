"""docker-compose.yml: the services DESIGN.md lists, one image, the GPU reservation; validated by the
compose client where one is installed (no Docker engine runs here)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_compose_services():
    doc = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = doc["services"]
    assert {"postgres", "redis", "api", "worker-cpu", "worker-gpu", "migrate"} <= set(services)
    assert services["worker-cpu"]["command"] == ["ncservice", "worker", "--queues", "cpu"]
    assert services["worker-gpu"]["command"] == ["ncservice", "worker", "--queues", "gpu"]
    (dev,) = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"]
    for name in ("api", "worker-cpu", "worker-gpu", "migrate"):
        env = services[name]["environment"]
        assert env["NCS_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["NCS_BROKER_URL"].startswith("redis://")
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert (REPO / "Dockerfile").read_text().count("pip install .") == 1


def test_compose_config_validates():
    """``docker compose config`` (v2 plugin) or ``docker-compose config`` (v1), whichever exists; when
    neither does, the YAML is at least parsed (test above)."""
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        probe = subprocess.run([*cmd, "version"], capture_output=True, text=True)
        if probe.returncode != 0:
            continue
        out = subprocess.run([*cmd, "config", "-q"], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return
    assert yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
