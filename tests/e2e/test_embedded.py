"""Embedded mode, started the way the README says (``ncservice serve``) in a subprocess with NCS_DATA_DIR in
a tmp dir and a free port: SQLite + the filesystem broker + a real Celery worker + the reconciler. POST a
small sweep over HTTP, poll it to the end, compare with ncengine called directly; POST /measure; then
SIGINT stops every process cleanly."""

from __future__ import annotations

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


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_serve_end_to_end(tmp_path):
    from ncengine import train

    port = _free_port()
    data = tmp_path / "ncs-data"
    env = {**os.environ, "NCS_DATA_DIR": str(data), "NCS_PORT": str(port), "PYTHONPATH": str(REPO),
           "NCS_HEARTBEAT_SECONDS": "1"}
    for key in ("NCS_DATABASE_URL", "NCS_BROKER_URL"):
        env.pop(key, None)
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "ncservice.cli", "serve"], cwd=tmp_path, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.3)
        assert (data / "ncs.db").exists() and (data / "broker").is_dir()
        children = _children(proc.pid)
        assert len(children) == 2  # uvicorn + the Celery worker

        run = {"data": {"name": "teacher", "n": 64, "num_classes": 4, "input_dim": 8, "teacher_width": 16},
               "model": {"depth": 3, "width": 16}, "optim": {"batch_size": 32}, "schedule": {"epochs": 4},
               "measure": {"every": 2}}
        r = httpx.post(f"{base}/sweeps", json={"base": run, "seeds": [0, 1]}, timeout=30)
        assert r.status_code == 202, r.text
        job_ids = [j["id"] for j in r.json()["jobs"]]
        deadline = time.monotonic() + 180
        finals = {}
        while len(finals) < len(job_ids):
            for jid in job_ids:
                j = httpx.get(f"{base}/jobs/{jid}", timeout=10).json()
                if j["status"] in ("succeeded", "failed", "canceled"):
                    finals[jid] = j
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-5000:]
            time.sleep(0.3)
        assert {j["status"] for j in finals.values()} == {"succeeded"}, finals
        ref = train.run([{**run, "seed": 0}, {**run, "seed": 1}], device="cpu")
        got = sorted((r for j in finals.values() for r in j["final"]["runs"]), key=lambda r: r["seed"])
        for g, want in zip(got, ref):
            assert g["final"]["train_loss"] == pytest.approx(want.final["train_loss"], rel=1e-5)
            assert g["final"]["nc1"] == pytest.approx(want.final["nc1"], rel=1e-4)

        from ncengine.metrics import measure

        rng = np.random.default_rng(0)
        y = np.repeat(np.arange(3), 5)
        H = rng.normal(size=(15, 3)) + 2 * np.eye(3)[y]
        r = httpx.post(f"{base}/measure", json={"features": H.tolist(), "labels": y.tolist()}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body.get("metrics", body)["nc1"] == pytest.approx(measure(H, y).to_dict()["nc1"], rel=1e-9)
    finally:
        children = _children(proc.pid)
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
    deadline = time.monotonic() + 10
    while any(_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(c) for c in children)
    assert b"stopped" in (tmp_path / "serve.log").read_bytes()
