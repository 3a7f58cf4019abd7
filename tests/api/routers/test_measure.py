"""POST /measure: multipart and JSON, sync and async, against ncengine.metrics.measure and closed forms;
every error path of the measurement core answers 422 problem+json naming the field."""

from __future__ import annotations

import hashlib
import io
import json
import math

import numpy as np
import pytest

from db import jobs as dbjobs
from ncengine.io import load_array
from ncengine.metrics import measure
from tests.api.conftest import assert_problem


def _npy(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, **kw)
    return buf.getvalue()


def _files(**arrays) -> dict:
    return {name: (f"{name}.npy", _npy(a), "application/octet-stream") for name, a in arrays.items()}


def _data(n_per=20, d=5, C=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(C), n_per)
    H = (rng.normal(size=(C, d))[y] + 0.5 * rng.normal(size=(len(y), d))).astype(np.float32)
    W = rng.normal(size=(C, d))
    b = rng.normal(size=C)
    return H, y, W, b


def assert_same(got, want, path="result"):
    """Recursive equality to 1e-12 relative (floats), exact for everything else."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (path, set(got) ^ set(want))
        for k in want:
            assert_same(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{path}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        assert got == pytest.approx(want, rel=1e-12, abs=1e-12), (path, got, want)
    else:
        assert got == want, (path, got, want)


def test_multipart_sync_equals_direct_call(client, queue, settings):
    H, y, W, b = _data()
    r = client.post("/measure", files=_files(features=H, labels=y, weights=W, bias=b))
    assert r.status_code == 200, r.text
    want = measure(H, y, W, b).to_dict()
    assert_same(r.json(), want)
    assert "bounds" in r.json() and r.json()["num_samples"] == 60
    assert queue.sent == []
    assert not any(settings.upload_dir.glob("*/*"))  # sync uploads are removed afterwards


def test_json_sync_equals_direct_call_with_options(client):
    H, y, W, _ = _data(seed=1)
    H64 = H.astype(np.float64)
    body = {"features": H64.tolist(), "labels": y.tolist(), "weights": W.tolist(),
            "options": {"center": "global_mean", "global_mean": "sample"}}
    r = client.post("/measure", json=body)
    assert r.status_code == 200, r.text
    assert_same(r.json(), measure(H64, y, W, center="global_mean", global_mean="sample").to_dict())


def test_held_out_split_and_options_as_multipart_field(client):
    H, y, W, _ = _data(seed=2)
    Ht, yt, _, _ = _data(n_per=7, seed=3)
    r = client.post("/measure", files=_files(features=H, labels=y + 1, weights=W, test_features=Ht,
                                             test_labels=yt + 1),
                    data={"options": json.dumps({"remap_labels": True})})
    assert r.status_code == 200, r.text
    want = measure(H, y + 1, W, test_features=Ht, test_labels=yt + 1, remap_labels=True).to_dict()
    assert_same(r.json(), want)
    assert "test_ncc_accuracy" in r.json()


def test_simplex_etf_closed_form(client):
    """Features and weights at an exact simplex ETF (thesis optimum): inter_cos = -1/(C-1), intra_cos = 1,
    nc1 = 0, self-duality 0, alpha = beta = sqrt((C-1)/C), loss = m = log(1 + (C-1)/e), epsilon = 0."""
    C, n_per = 4, 5
    M = np.eye(C) - 1.0 / C  # rows: centred simplex vertices, ||m_c||^2 = (C-1)/C
    y = np.repeat(np.arange(C), n_per)
    H = M[y]
    r = client.post("/measure", json={"features": H.tolist(), "labels": y.tolist(), "weights": M.tolist()})
    assert r.status_code == 200, r.text
    res = r.json()
    off = np.array(res["inter_cos"])[~np.eye(C, dtype=bool)]
    assert np.allclose(off, -1.0 / (C - 1), atol=1e-12)
    assert res["inter_cos_max"] == pytest.approx(-1.0 / (C - 1), abs=1e-12)
    assert res["intra_cos_min"] == pytest.approx(1.0, abs=1e-12)
    assert res["nc1_trace_ratio"] == pytest.approx(0.0, abs=1e-12)
    assert res["nc3_self_duality"] == pytest.approx(0.0, abs=1e-12)
    assert res["ncc_accuracy"] == 1.0 and res["classifier_accuracy"] == 1.0
    assert res["alpha"] == pytest.approx(math.sqrt((C - 1) / C), rel=1e-12)
    assert res["beta"] == pytest.approx(math.sqrt((C - 1) / C), rel=1e-12)
    m = math.log(1 + (C - 1) / math.e)
    assert res["min_loss_m"] == pytest.approx(m, rel=1e-12)
    assert res["loss"] == pytest.approx(m, rel=1e-12)
    assert res["epsilon"] == pytest.approx(0.0, abs=1e-12)


def _bad_inputs():
    H, y, W, b = _data()
    nan = H.copy()
    nan[3, 1] = np.nan
    return [
        ("one-hot labels", _files(features=H, labels=np.eye(3)[y]), "labels"),
        ("length mismatch", _files(features=H, labels=y[:-1]), "labels"),
        ("NaN features", _files(features=nan, labels=y), "features"),
        ("empty class", _files(features=H, labels=np.where(y == 1, 2, y)), "labels"),
        ("float labels", _files(features=H, labels=y + 0.5), "labels"),
        ("wrong weight shape", _files(features=H, labels=y, weights=W[:, :-1]), "weights"),
        ("wrong bias shape", _files(features=H, labels=y, weights=W, bias=b[:-1]), "bias"),
        ("bias without weights", _files(features=H, labels=y, bias=b), "bias"),
        ("pickled .npy", {"features": ("f.npy", _npy(np.array([{"a": 1}] * 60, dtype=object), allow_pickle=True)),
                          **_files(labels=y)}, "features"),
        ("unsupported suffix", {"features": ("f.txt", b"1 2 3"), **_files(labels=y)}, "features"),
        ("garbage .npy", {"features": ("f.npy", b"\x93NUMPY garbage"), **_files(labels=y)}, "features"),
        ("missing labels", _files(features=H), "labels"),
        ("test split half given", _files(features=H, labels=y, test_features=H), "test_labels"),
    ]


@pytest.mark.parametrize("name, files, field", _bad_inputs(), ids=[c[0] for c in _bad_inputs()])
def test_measure_core_errors_are_422_naming_the_field(client, queue, name, files, field):
    problem = assert_problem(client.post("/measure", files=files), 422, field)
    assert problem["detail"]
    assert queue.sent == []


def test_empty_class_via_num_classes_option(client):
    H, y, _, _ = _data()
    r = client.post("/measure", files=_files(features=H, labels=y), data={"num_classes": "4"})
    body = assert_problem(r, 422, "labels")
    assert "[3]" in body["detail"]  # names the class without samples


@pytest.mark.parametrize("body, field", [
    ({"features": [[1.0, 2.0], [float("nan"), 1.0], [0.0, 1.0], [1.0, 1.0]], "labels": [0, 0, 1, 1]}, "features"),
    ({"features": [[1.0, 2.0], [1.0], [0.0, 1.0], [1.0, 1.0]], "labels": [0, 0, 1, 1]}, "features"),
    ({"features": [[1.0, 2.0], [2.0, 1.0], [0.0, 1.0], [1.0, 1.0]], "labels": [0, 0, 1]}, "labels"),
    ({"features": [[1.0, 2.0], [2.0, 1.0], [0.0, 1.0], [1.0, 1.0]], "labels": [[1, 0], [1, 0], [0, 1], [0, 1]]},
     "labels"),
    ({"features": [[1.0, 2.0], [2.0, 1.0]], "labels": [0, 1], "options": {"center": "middle"}}, "options.center"),
    ({"features": [[1.0, 2.0], [2.0, 1.0]], "labels": [0, 1], "extra": 1}, "extra"),
    ({"labels": [0, 1]}, "features"),
])
def test_json_errors_name_the_field(client, body, field):
    r = client.post("/measure", content=json.dumps(body), headers={"content-type": "application/json"})
    assert_problem(r, 422, field)


def test_bad_bodies(client):
    assert_problem(client.post("/measure", content=b"{oops", headers={"content-type": "application/json"}),
                   400, "body")
    assert_problem(client.post("/measure", content=b"a,b", headers={"content-type": "text/csv"}), 415,
                   "Content-Type")
    H, y, _, _ = _data()
    assert_problem(client.post("/measure", files={**_files(features=H, labels=y), "extra": ("x.npy", b"")}),
                   422, "extra")
    assert_problem(client.post("/measure", files=_files(features=H, labels=y), data={"options": "{"}),
                   422, "options")
    assert_problem(client.post("/measure", files=_files(features=H, labels=y),
                               data={"options": json.dumps({"num_classes": 1})}), 422, "options.num_classes")


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_async_multipart_queues_a_job_with_the_files_on_disk(client, queue, sessionmaker, settings):
    H, y, W, _ = _data()
    files = _files(features=H, labels=y, weights=W)
    r = client.post("/measure?async=true", files=files, data={"num_classes": "3"})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert r.headers["location"] == f"/jobs/{job_id}" and "retry-after" in r.headers
    assert queue.sent == [{"name": "ncs.measure", "args": [job_id], "task_id": job_id, "queue": "cpu"}]
    with sessionmaker() as s:
        job = dbjobs.get_job(s, job_id)
        assert job.kind == "measure" and job.status == "queued"
        inputs = job.config["inputs"]
        assert job.config["options"] == {"num_classes": 3, "center": "none", "global_mean": "class_mean",
                                         "remap_labels": False}
        assert inputs["bias"] is None and inputs["test_features"] is None
        for name, arr in (("features", H), ("labels", y), ("weights", W)):  # relative to upload_dir
            assert inputs[name] == f"{inputs['features'].split('/')[0]}/{name}.npy"
            assert np.array_equal(load_array(settings.upload_dir / inputs[name], field=name), arr)
        arts = {a.name: a for a in dbjobs.list_artifacts(s, job_id=job_id)}
        assert {a.kind for a in arts.values()} == {"upload"}
        for name in ("features", "labels", "weights"):
            raw = files[name][1]
            assert arts[f"{name}.npy"].sha256 == _sha(raw) and arts[f"{name}.npy"].bytes == len(raw)


def test_large_input_goes_async_and_json_arrays_are_saved(client, queue, sessionmaker, settings):
    rng = np.random.default_rng(5)
    n, d = 2_100, 5  # N*d = 10500 > measure_sync_max_elements = 10000 in the test settings
    assert n * d > settings.measure_sync_max_elements
    y = np.arange(n) % 3
    H = rng.normal(size=(n, d))
    r = client.post("/measure", json={"features": H.tolist(), "labels": y.tolist()})
    assert r.status_code == 202, r.text
    with sessionmaker() as s:
        inputs = dbjobs.get_job(s, r.json()["id"]).config["inputs"]
    assert np.array_equal(load_array(settings.upload_dir / inputs["features"], field="features"), H)
    assert np.array_equal(load_array(settings.upload_dir / inputs["labels"], field="labels"), y)
    # async answers refuse at once what the shapes already show
    bad = client.post("/measure?async=true", json={"features": H[:10].tolist(), "labels": y[:9].tolist()})
    assert_problem(bad, 422, "labels")
    assert len(queue.sent) == 1


def test_async_idempotency_key_reuses_the_job(client, queue, settings):
    H, y, _, _ = _data()
    a = client.post("/measure?async=true", files=_files(features=H, labels=y), headers={"Idempotency-Key": "m1"})
    b = client.post("/measure?async=true", files=_files(features=H, labels=y), headers={"Idempotency-Key": "m1"})
    assert a.status_code == b.status_code == 202 and a.json()["id"] == b.json()["id"]
    assert len(queue.sent) == 1
    assert len(list(settings.upload_dir.iterdir())) == 1  # the replay's copy was removed
    c = client.post("/measure?async=true", files=_files(features=H, labels=(y + 1) % 3),
                    headers={"Idempotency-Key": "m1"})
    assert_problem(c, 422, "Idempotency-Key")


def test_bundle_upload(client):
    H, y, W, _ = _data(seed=4)
    buf = io.BytesIO()
    np.savez(buf, features=H, labels=y, weights=W)
    r = client.post("/measure", files={"bundle": ("all.npz", buf.getvalue())})
    assert r.status_code == 200, r.text
    assert_same(r.json(), measure(H, y, W).to_dict())


def test_upload_over_the_limit_is_413(client, settings):
    big = np.zeros((settings.max_upload_bytes // 8 + 10, 1))
    r = client.post("/measure", files=_files(features=big, labels=np.zeros(len(big), dtype=int)))
    assert_problem(r, 413, "body")
    assert not settings.upload_dir.exists() or not any(settings.upload_dir.iterdir())
