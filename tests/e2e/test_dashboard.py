"""The dashboard in a real headless browser (Debian's chromium) against the API served by uvicorn on
127.0.0.1: screenshots decode and are not blank, the figures are drawn in them, the DOM names the jobs."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import threading
import time

import numpy as np
import pytest
from PIL import Image

from db import jobs as dbjobs
from tests.api.conftest import _migrated_template, api_db_url  # noqa: F401
from tests.api.fakework import run_job

pytestmark = pytest.mark.e2e

BASE = {"data": {"name": "teacher", "n": 100}, "model": {"depth": 3, "width": 8}, "schedule": {"epochs": 4},
        "measure": {"every": 1, "layers": "all"}}
C0 = np.array([0x1F, 0x77, 0xB4])  # matplotlib's first line colour


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(api_db_url, tmp_path):
    """(base URL, sessionmaker): the real app over HTTP on a fresh database, with a sweep of 2 jobs (one
    finished with per-layer metrics, one queued) and a lone train job that failed."""
    import uvicorn

    from api.app import create_app
    from ncengine.config import RunConfig
    from ncengine.sweep import SweepSpec, bundles, expand
    from ncservice.settings import Settings

    settings = Settings(_env_file=None, data_dir=tmp_path / "data", database_url=api_db_url)
    app = create_app(settings)
    sm = app.state.sessionmaker
    spec = SweepSpec(base=RunConfig.model_validate(BASE), grid={"optim.weight_decay": [1e-4, 1e-3],
                                                               "model.width": [8, 16]}, seeds=[0])
    packs = bundles(expand(spec), max_bundle_size=8)
    with sm() as s:
        sweep, jobs = dbjobs.create_sweep(s, name="dashboard e2e", preset=None, spec=spec.model_dump(mode="json"),
                                          bundles=[{"runs": [c.model_dump(mode="json") for c in b]} for b in packs])
        lone = dbjobs.create_job(s, kind="train", config={"runs": [packs[0][0].model_dump(mode="json")]})
        dbjobs.claim(s, lone.id, worker="w", lease_seconds=60)
        dbjobs.fail(s, lone.id, worker="w", code="nan_loss", message="loss diverged at epoch 3")
    assert len(jobs) == 2
    run_job(sm, jobs[0].id, layers=[0, 1, 2])
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", {"sweep": sweep.id, "jobs": [j.id for j in jobs], "lone": lone.id}
    server.should_exit = True
    thread.join(timeout=10)


def chromium(tmp_path, url: str, *, screenshot=None, dump_dom: bool = False) -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        msg = "chromium is missing: apt-get install -y chromium (.ci/run installs it)"
        if os.environ.get("NCS_REQUIRE_SERVICES") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--window-size=1400,2200", "--virtual-time-budget=3000"]  # < the pages' 5 s refresh
    if screenshot is not None:
        args.append(f"--screenshot={screenshot}")
    if dump_dom:
        args.append("--dump-dom")
    out = subprocess.run([*args, url], capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _screenshot(tmp_path, url, name) -> np.ndarray:
    path = tmp_path / f"{name}.png"
    chromium(tmp_path, url, screenshot=path)
    img = np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("RGB")).astype(int)
    assert img.shape == (2200, 1400, 3)
    assert img.std() > 15  # not blank
    return img


def _blue_pixels(img: np.ndarray) -> int:
    return int((np.abs(img - C0).sum(axis=2) < 12).sum())


def test_dashboard_in_a_real_browser(served, tmp_path):
    base, ids = served
    dom = chromium(tmp_path, f"{base}/", dump_dom=True)
    for jid in [*ids["jobs"], ids["lone"], ids["sweep"]]:
        assert jid in dom
    assert "dashboard e2e" in dom and "nan_loss" not in dom  # the index lists, the job page explains
    _screenshot(tmp_path, f"{base}/", "index")

    sweep_dom = chromium(tmp_path, f"{base}/ui/sweeps/{ids['sweep']}", dump_dom=True)
    assert f"/sweeps/{ids['sweep']}/figures/fig3.1.png" in sweep_dom
    assert f"/sweeps/{ids['sweep']}/figures/fig3.3.png" in sweep_dom
    assert all(j in sweep_dom for j in ids["jobs"])
    sweep_img = _screenshot(tmp_path, f"{base}/ui/sweeps/{ids['sweep']}", "sweep")
    assert _blue_pixels(sweep_img) > 300  # the figures were fetched and drawn by the browser

    job_img = _screenshot(tmp_path, f"{base}/ui/jobs/{ids['jobs'][0]}", "job")
    assert _blue_pixels(job_img) > 300  # the training curves
    lone_dom = chromium(tmp_path, f"{base}/ui/jobs/{ids['lone']}", dump_dom=True)
    assert "nan_loss" in lone_dom and "loss diverged at epoch 3" in lone_dom
