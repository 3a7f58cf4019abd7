"""An async /measure job shows no server path: ``config.inputs`` names each upload relative to the server's upload
folder (``<upload id>/<field>.npy``) and the worker resolves it there."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest

from db import jobs as dbjobs
from ncengine.metrics import measure

ABSOLUTE = re.compile(r'"(/|[A-Za-z]:\\\\)[^"]*"')  # a JSON string that is an absolute POSIX/Windows path


def _data(n_per=10, C=3, d=4, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(C), n_per)
    return rng.normal(size=(C, d))[y] + 0.3 * rng.normal(size=(len(y), d)), y, rng.normal(size=(C, d))


def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _post(client, how, H, y, W):
    if how == "json":
        return client.post("/measure?async=true", json={"features": H.tolist(), "labels": y.tolist(),
                                                        "weights": W.tolist()})
    if how == "bundle":
        buf = io.BytesIO()
        np.savez(buf, features=H, labels=y, weights=W)
        return client.post("/measure?async=true", files={"bundle": ("all.npz", buf.getvalue())})
    return client.post("/measure?async=true", files={"features": ("f.npy", _npy(H)), "labels": ("l.npy", _npy(y)),
                                                     "weights": ("w.npy", _npy(W))})


@pytest.mark.parametrize("how", ["multipart", "json", "bundle"])
def test_get_job_shows_no_server_path_and_the_worker_still_reads_the_inputs(client, settings, how):
    from worker.tasks import run_job

    H, y, W = _data()
    r = _post(client, how, H, y, W)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    got = client.get(f"/jobs/{job_id}")
    assert got.status_code == 200
    text = got.text
    for leak in (str(settings.data_dir), str(settings.upload_dir), str(settings.data_dir.resolve())):
        assert leak not in text and json.dumps(leak)[1:-1] not in text, leak
    config = json.dumps(got.json()["config"])  # (the links are URL paths, not file paths)
    assert not ABSOLUTE.search(config), config
    inputs = got.json()["config"]["inputs"]
    given = {k: v for k, v in inputs.items() if v is not None}
    assert set(given) == {"features", "labels", "weights"}
    for name, value in given.items():
        upload_id, file_name = value.split("/")
        assert re.fullmatch(r"[0-9a-f]{32}", upload_id) and file_name in (f"{name}.npy", "bundle.npz")
    # the worker resolves them under settings.upload_dir
    assert run_job(job_id, settings=settings, kind="measure", worker="w@test") == "succeeded"
    final = client.get(f"/jobs/{job_id}").json()
    assert final["status"] == "succeeded", final
    assert final["final"]["nc1"] == pytest.approx(measure(H, y, W).to_dict()["nc1"], rel=1e-9)


def test_a_gone_upload_fails_the_job_without_a_server_path(client, settings, sessionmaker):
    import shutil

    from worker.tasks import run_job

    H, y, W = _data(seed=1)
    job_id = _post(client, "multipart", H, y, W).json()["id"]
    with sessionmaker() as s:
        upload_id = dbjobs.get_job(s, job_id).config["inputs"]["features"].split("/")[0]
    shutil.rmtree(settings.upload_dir / upload_id)
    assert run_job(job_id, settings=settings, kind="measure", worker="w@test") == "failed"
    body = client.get(f"/jobs/{job_id}").json()
    assert body["error"]["code"] == "input_error"
    assert "no longer on the server" in body["error"]["message"]
    assert str(settings.data_dir) not in json.dumps(body)


def test_an_input_outside_the_upload_folder_is_refused(client, settings, sessionmaker):
    from worker.tasks import run_job

    (settings.data_dir / "secret.npy").parent.mkdir(parents=True, exist_ok=True)
    np.save(settings.data_dir / "secret.npy", np.zeros((4, 2)))
    with sessionmaker() as s:
        job = dbjobs.create_job(s, kind="measure", config={
            "inputs": {"features": "../secret.npy", "labels": "../secret.npy"}, "options": {}})
    assert run_job(job.id, settings=settings, kind="measure", worker="w@test") == "failed"
    with sessionmaker() as s:
        row = dbjobs.get_job(s, job.id)
        assert row.error_code == "input_error" and "outside the upload folder" in row.error_message
