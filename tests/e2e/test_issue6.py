"""Issue 6 end to end, through real processes:

1. ``ncservice serve`` (embedded: SQLite + filesystem broker + a Celery worker) in a subprocess, and
   ``examples/digits_features.py`` run against it: a real network's features through ``POST /measure`` equal
   ``ncengine.metrics.measure`` in-process on the same files.
2. ``ncservice migrate``/``api``/``worker`` against the real PostgreSQL + Redis, then
   ``ncservice reproduce thesis-fig3.1 --scale small``: the PNGs decode at their size, Figure 3.1 has one line
   of 7 weight decays per batch-norm mode and the ETF target, and the CSV has one row per run (21).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ncservice.cli", *args], cwd=cwd, env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def _wait_healthy(base: str, procs: list[subprocess.Popen], logs: list[Path], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for p, log in zip(procs, logs):
            assert p.poll() is None, log.read_text()[-5000:]
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "\n".join(log.read_text()[-3000:] for log in logs)
        time.sleep(0.3)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    for p in procs:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for key in ("NCS_DATABASE_URL", "NCS_BROKER_URL", "NCS_BROKER_KEY_PREFIX", "NCS_DATA_DIR", "NCS_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def test_digits_features_through_embedded_service(tmp_path):
    from ncengine.metrics import measure

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = _env(NCS_DATA_DIR=str(tmp_path / "ncs-data"), NCS_PORT=str(port))
    log = tmp_path / "serve.log"
    proc = _start(["serve"], env, log, tmp_path)
    try:
        _wait_healthy(base, [proc], [log])
        out = tmp_path / "digits"
        res = subprocess.run([sys.executable, str(REPO / "examples" / "digits_features.py"), "--url", base,
                              "--out", str(out), "--seed", "0"], env=env, cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr + log.read_text()[-3000:]
        assert "equal at rtol=1e-09" in res.stdout and "bounds (Theorem 2.3.1)" in res.stdout
    finally:
        _stop([proc])
    arrays = {k: np.load(out / f"{k}.npy", allow_pickle=False) for k in ("features", "labels", "weights", "bias")}
    want = measure(arrays["features"], arrays["labels"], arrays["weights"], arrays["bias"]).to_dict()
    got = json.loads((out / "measure_service.json").read_text())
    assert set(got) == set(want)
    for key, value in want.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert got["num_samples"] == 1797 and got["classifier_accuracy"] == 1.0
    assert got["bounds"]["loss"] >= got["bounds"]["min_loss_m"]


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_reproduce_fig31_small_against_postgres_and_redis(tmp_path, postgres_url, redis_url, redis_prefix):
    import matplotlib.image as mpimg

    from ncengine.sweep import THESIS_WEIGHT_DECAYS
    from ncservice import figures

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = _env(NCS_DATABASE_URL=postgres_url, NCS_BROKER_URL=redis_url, NCS_BROKER_KEY_PREFIX=redis_prefix,
               NCS_DATA_DIR=str(tmp_path / "ncs-data"), NCS_PORT=str(port))
    migrate = subprocess.run([sys.executable, "-m", "ncservice.cli", "migrate"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr
    logs = [tmp_path / "api.log", tmp_path / "worker.log"]
    procs = [_start(["api"], env, logs[0], tmp_path), _start(["worker", "--queues", "gpu,cpu"], env, logs[1], tmp_path)]
    out = tmp_path / "fig31"
    try:
        _wait_healthy(base, procs, logs)
        res = subprocess.run([sys.executable, "-m", "ncservice.cli", "reproduce", "thesis-fig3.1", "--scale",
                              "small", "--url", base, "--out", str(out), "--timeout", "1200", "--no-progress"],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1300)
        assert res.returncode == 0, res.stdout + res.stderr + "\n".join(l.read_text()[-3000:] for l in logs)
    finally:
        _stop(procs)
    assert mpimg.imread(out / "fig3.1.png").shape[:2] == (480, 1200)
    assert mpimg.imread(out / "training_curves.png").shape[:2] == (800, 1200)
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 21 and {r["status"] for r in table} == {"succeeded"}
    rows = json.loads((out / "results.json").read_text())
    lines = {ln.get_gid(): ln for ax in figures.build_fig31(rows).axes for ln in ax.get_lines()}
    for mode in ("affine", "non_affine", "none"):
        for panel in ("intra", "inter"):
            np.testing.assert_allclose(lines[f"{panel}:{mode}"].get_xdata(), THESIS_WEIGHT_DECAYS)
    np.testing.assert_allclose(lines["etf"].get_ydata(), [-1 / 9, -1 / 9])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs"] == 21 and summary["status"] == "succeeded"
