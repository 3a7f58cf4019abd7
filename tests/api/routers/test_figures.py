"""GET /sweeps/{id}/figures/{name}.png and GET /jobs/{id}/figures/{name}.png (issue 6)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from tests.api.conftest import assert_problem
from tests.api.fakework import run_job

BASE = {"data": {"name": "teacher", "n": 100}, "model": {"depth": 3, "width": 8}, "schedule": {"epochs": 3},
        "measure": {"every": 1}}
GRID = {"model.batch_norm": ["affine", "none"], "optim.weight_decay": [1e-4, 1e-3]}
# matplotlib's default cycle: C0 blue, C1 orange, C2 green
C0, C1, C2 = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E), (0x2C, 0xA0, 0x2C)


def _image(resp) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "image/png"
    img = np.asarray(Image.open(io.BytesIO(resp.content)).convert("RGB")).astype(int)
    assert img.std() > 10  # not a blank canvas
    return img


def _pixels(img: np.ndarray, rgb: tuple[int, int, int]) -> int:
    return int((np.abs(img - np.array(rgb)).sum(axis=2) < 12).sum())


def _sweep(client, grid=GRID, **measure):
    body = {"base": {**BASE, "measure": {**BASE["measure"], **measure}}, "grid": grid, "seeds": [0]}
    out = client.post("/sweeps", json=body)
    assert out.status_code == 202, out.text
    return out.json()


def test_fig31_png_one_line_per_batch_norm_mode(client, sessionmaker):
    sweep = _sweep(client)
    sid = sweep["id"]
    not_ready = assert_problem(client.get(f"/sweeps/{sid}/figures/fig3.1.png"), 409)
    assert not_ready["type"].endswith("figure-not-ready")
    for job in sweep["jobs"]:
        run_job(sessionmaker, job["id"])
    resp = client.get(f"/sweeps/{sid}/figures/fig3.1.png")
    img = _image(resp)
    assert img.shape == (480, 1200, 3)
    # two BN modes -> two colours of lines, the third colour of the cycle is unused
    assert _pixels(img, C0) > 200 and _pixels(img, C1) > 200 and _pixels(img, C2) == 0
    again = client.get(f"/sweeps/{sid}/figures/fig3.1.png", headers={"If-None-Match": resp.headers["ETag"]})
    assert again.status_code == 304
    # last layer only: no Figure 3.3
    assert_problem(client.get(f"/sweeps/{sid}/figures/fig3.3.png"), 404, "name")


def test_fig33_png_from_per_layer_points(client, sessionmaker):
    sweep = _sweep(client, grid={"optim.weight_decay": [1e-4, 1e-3, 1e-2]}, layers="all")
    for job in sweep["jobs"]:
        run_job(sessionmaker, job["id"], layers=[0, 1, 2])
    img = _image(client.get(f"/sweeps/{sweep['id']}/figures/fig3.3.png"))
    assert img.shape == (900, 1300, 3)
    assert min(_pixels(img, c) for c in (C0, C1, C2)) > 100  # one line per weight decay


def test_unknown_figures_and_sweeps_are_404_problems(client):
    sid = _sweep(client)["id"]
    body = assert_problem(client.get(f"/sweeps/{sid}/figures/fig9.9.png"), 404, "name")
    assert body["type"].endswith("unknown-figure")
    assert_problem(client.get("/sweeps/0123456789abcdef0123456789abcdef/figures/fig3.1.png"), 404)
    assert_problem(client.get(f"/jobs/{'0' * 32}/figures/training_curves.png"), 404)


def test_training_curves_png_of_a_job(client, sessionmaker):
    out = client.post("/jobs", json={"kind": "train", "config": BASE})
    assert out.status_code == 202, out.text
    jid = out.json()["id"]
    assert_problem(client.get(f"/jobs/{jid}/figures/training_curves.png"), 409)
    assert_problem(client.get(f"/jobs/{jid}/figures/loss.png"), 404, "name")
    run_job(sessionmaker, jid, finish=False)  # available while the job runs
    img = _image(client.get(f"/jobs/{jid}/figures/training_curves.png"))
    assert img.shape == (800, 1200, 3)
    assert _pixels(img, C0) > 200 and _pixels(img, C1) > 50  # intra (C0) and inter (C1) share a panel
    assert_problem(client.get(f"/jobs/{jid}/figures/training_curves.png", params={"layer": 5}), 404, "layer")
