"""ncservice.client: error mapping, ETag/Retry-After polling (httpx.MockTransport), and the real API app
in-process (FastAPI TestClient) for the request/response shapes, measure and reproduce."""

from __future__ import annotations

import email.parser
import io
import json

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from ncservice.client import NCClient, NCServiceError


def _client(handler, **kw) -> tuple[NCClient, list[float]]:
    sleeps: list[float] = []
    return NCClient("http://svc", transport=httpx.MockTransport(handler), sleep=sleeps.append, **kw), sleeps


# ------------------------------------------------------------------------------------------ errors

def test_problem_json_is_mapped_to_ncservice_error():
    problem = {"type": "urn:ncs:problem:input-error", "title": "Invalid input", "status": 422,
               "detail": "labels: one-hot labels given", "instance": "/measure", "field": "labels"}

    def handler(request):
        return httpx.Response(422, json=problem, headers={"content-type": "application/problem+json"})

    nc, _ = _client(handler)
    with pytest.raises(NCServiceError) as info:
        nc.get_job("x")
    err = info.value
    assert (err.status, err.title, err.detail, err.field, err.type) == (
        422, "Invalid input", "labels: one-hot labels given", "labels", "urn:ncs:problem:input-error")
    assert err.body == problem and "[labels]" in str(err)


def test_non_json_error_and_unreachable_service():
    nc, _ = _client(lambda r: httpx.Response(502, text="bad gateway"))
    with pytest.raises(NCServiceError) as info:
        nc.get_sweep("s")
    assert info.value.status == 502 and info.value.detail == "bad gateway" and info.value.field is None

    def down(request):
        raise httpx.ConnectError("connection refused", request=request)

    nc, _ = _client(down)
    with pytest.raises(NCServiceError) as info:
        nc.get_job("x")
    assert info.value.status is None and "connection refused" in info.value.detail
    assert isinstance(info.value.__cause__, httpx.ConnectError)


# ------------------------------------------------------------------------------------------ polling

class FakeJobServer:
    """A job whose row changes on given polls; answers 304 to a matching If-None-Match."""

    def __init__(self, states, retry_after="2"):
        self.states = states  # list of (version, status, epoch) per poll, the last repeated
        self.polls = 0
        self.seen_if_none_match: list[str | None] = []
        self.retry_after = retry_after

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/jobs/j1"
        version, status, epoch = self.states[min(self.polls, len(self.states) - 1)]
        self.polls += 1
        inm = request.headers.get("If-None-Match")
        self.seen_if_none_match.append(inm)
        headers = {"ETag": f'"{version}"'}
        if status not in ("succeeded", "failed", "canceled") and self.retry_after is not None:
            headers["Retry-After"] = self.retry_after
        if inm == f'"{version}"':
            return httpx.Response(304, headers=headers)
        return httpx.Response(200, headers=headers, json={
            "id": "j1", "status": status, "version": version, "progress": {"epoch": epoch, "total": 10}})


def test_wait_sends_etag_reuses_body_on_304_and_sleeps_retry_after():
    server = FakeJobServer([(1, "queued", None), (1, "queued", None), (2, "running", 5), (2, "running", 5),
                            (3, "succeeded", 10)])
    nc, sleeps = _client(server)
    final = nc.wait({"id": "j1", "location": "/jobs/j1", "kind": "train", "status": "queued"}, progress=True)
    assert final["status"] == "succeeded" and final["version"] == 3
    assert server.seen_if_none_match == [None, '"1"', '"1"', '"2"', '"2"']
    assert sleeps == [2.0, 2.0, 2.0, 2.0]


def test_wait_caps_retry_after_and_falls_back_to_poll_interval():
    server = FakeJobServer([(1, "running", 1), (2, "running", 2), (3, "failed", 2)], retry_after="100")
    nc, sleeps = _client(server, max_poll_interval=7.5)
    assert nc.wait("j1", progress=False)["status"] == "failed"  # a failed job is returned, not raised
    assert sleeps == [7.5, 7.5]
    server = FakeJobServer([(1, "running", 1), (2, "succeeded", 2)], retry_after=None)
    nc, sleeps = _client(server, poll_interval=0.25)
    nc.wait("j1", progress=False)
    assert sleeps == [0.25]


def test_wait_timeout_and_bare_sweep_id():
    server = FakeJobServer([(1, "running", 1)])
    nc, _ = _client(server)
    with pytest.raises(TimeoutError, match="still running"):
        nc.wait("j1", progress=False, timeout=0)

    calls = []

    def handler(request):
        calls.append(request.url.path)
        if request.url.path.startswith("/jobs/"):
            return httpx.Response(404, json={"title": "Not Found", "status": 404, "detail": "no such job"})
        n = sum(1 for c in calls if c.startswith("/sweeps/"))
        status = "running" if n < 3 else "succeeded"
        return httpx.Response(200, json={"id": "s1", "status": status, "progress": {"epoch": n, "total": 3}})

    nc, sleeps = _client(handler)
    assert nc.wait("s1", progress=False)["status"] == "succeeded"
    assert calls == ["/jobs/s1", "/sweeps/s1", "/sweeps/s1", "/sweeps/s1"] and sleeps == [1.0, 1.0]


def test_job_metrics_follows_cursor_pages():
    pages = {None: ([{"epoch": 1}, {"epoch": 2}], "c1"), "c1": ([{"epoch": 3}], None)}
    seen = []

    def handler(request):
        seen.append(dict(request.url.params))
        items, nxt = pages[request.url.params.get("cursor")]
        return httpx.Response(200, json={"items": items, "next_cursor": nxt})

    nc, _ = _client(handler)
    assert [p["epoch"] for p in nc.job_metrics("j1", run_index=0, layer=4)] == [1, 2, 3]
    assert seen[0] == {"limit": "500", "run_index": "0", "layer": "4"} and seen[1]["cursor"] == "c1"


def _multipart_arrays(request: httpx.Request) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    raw = b"Content-Type: " + request.headers["content-type"].encode() + b"\r\n\r\n" + request.read()
    msg = email.parser.BytesParser().parsebytes(raw)
    arrays, fields = {}, {}
    for part in msg.get_payload():
        name = part.get_param("name", header="content-disposition")
        if part.get_filename():
            arrays[name] = np.load(io.BytesIO(part.get_payload(decode=True)), allow_pickle=False)
        else:
            fields[name] = part.get_payload()
    return arrays, fields


def test_measure_sends_npy_parts_and_waits_for_a_queued_job():
    sent = {}

    def handler(request):
        if request.method == "POST":
            sent["arrays"], sent["fields"] = _multipart_arrays(request)
            assert request.url.params.get("async") == "true"
            return httpx.Response(202, json={"id": "m1", "kind": "measure", "status": "queued",
                                             "location": "/jobs/m1"}, headers={"Retry-After": "1"})
        return httpx.Response(200, json={"id": "m1", "status": "succeeded", "final": {"nc1": 0.5}})

    nc, _ = _client(handler)
    H = torch.arange(12, dtype=torch.bfloat16).reshape(4, 3)
    y = np.array([0, 1, 0, 1])
    W = np.ones((2, 3), dtype=np.float16)
    assert nc.measure(H, y, W, run_async=True, num_classes=2, center="global_mean") == {"nc1": 0.5}
    arrays, fields = sent["arrays"], sent["fields"]
    assert set(arrays) == {"features", "labels", "weights"}
    assert arrays["features"].dtype == np.float32 and np.array_equal(arrays["features"], np.arange(12.).reshape(4, 3))
    assert arrays["labels"].tolist() == [0, 1, 0, 1] and arrays["weights"].dtype == np.float16
    assert json.loads(fields["options"]) == {"num_classes": 2, "center": "global_mean"}
    with pytest.raises(TypeError, match="labels"):
        nc.measure(H, np.array([{}, 1, 0, 1], dtype=object))


# ------------------------------------------------------------------------ against the real API app

@pytest.fixture
def nc_app(app):
    with TestClient(app, raise_server_exceptions=False) as tc:
        yield NCClient("http://testserver", http_client=tc, sleep=lambda s: None)


def test_measure_against_the_real_api_equals_in_process(nc_app):
    from ncengine.metrics import measure

    rng = np.random.default_rng(0)
    C, d, n = 3, 6, 20
    y = np.repeat(np.arange(C), n)
    H = (rng.normal(size=(C, d))[y] + 0.3 * rng.normal(size=(C * n, d))).astype(np.float32)
    W, b = rng.normal(size=(C, d)), rng.normal(size=C)
    got = nc_app.measure(torch.from_numpy(H), y, W, b)
    want = json.loads(json.dumps(measure(H, y, W, b).to_dict()))
    assert got.keys() == want.keys() and "bounds" in got
    for key in ("nc1", "intra_cos_min", "inter_cos_max", "loss", "min_loss_m", "epsilon", "classifier_accuracy"):
        assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-12), key
    with pytest.raises(NCServiceError) as info:
        nc_app.measure(H, np.eye(C)[y])  # one-hot labels
    assert info.value.status == 422 and info.value.field == "labels"


def test_sweep_submit_get_results_shapes(nc_app, queue):
    acc = nc_app.submit_sweep("thesis-fig3.1", scale="small")
    assert acc["runs"] == 21 and acc["location"] == f"/sweeps/{acc['id']}" and len(queue.sent) == len(acc["jobs"])
    sweep = nc_app.get_sweep(acc["id"])
    assert sweep["status"] == "queued" and {j["id"] for j in sweep["jobs"]} == {j["id"] for j in acc["jobs"]}
    rows = nc_app.results(acc["id"], format="json")["rows"]
    frame = nc_app.results(acc["id"])  # pandas is in the test extra: a DataFrame, one row per run
    assert list(frame.index) == list(range(len(rows))) and len(frame) == len(rows)
    assert frame["run_index"].tolist() == [r["run_index"] for r in rows]
    assert len(rows) == 21
    assert {r["config.model.batch_norm"] for r in rows} == {"affine", "non_affine", "none"}
    csv_text = nc_app.results(acc["id"], format="csv")
    assert len(csv_text.strip().splitlines()) == 1 + 21
    with pytest.raises(NCServiceError) as info:
        nc_app.submit_sweep("thesis-fig9")
    assert info.value.status == 422 and info.value.field == "preset"
    with pytest.raises(NCServiceError) as info:
        nc_app.get_sweep("nope")
    assert info.value.status == 404


def test_cancel_sweep_and_job_against_the_real_api(nc_app, sessionmaker):
    from db import jobs as dbjobs

    base = {"data": {"name": "teacher", "n": 100}, "model": {"depth": 2, "width": 8},
            "schedule": {"epochs": 3}}
    acc = nc_app.submit_sweep({"base": base, "grid": {"model.width": [8, 16, 32]}})
    first, *rest = (j["id"] for j in acc["jobs"])
    with sessionmaker() as s:
        dbjobs.claim(s, first, worker="w", lease_seconds=60)
    sweep = nc_app.cancel_sweep(acc["id"])
    assert sweep["id"] == acc["id"] and sweep["status"] == "running"
    assert sweep["counts"] == {"cancelling": 1, "canceled": 2}
    assert sweep.keys() == nc_app.get_sweep(acc["id"]).keys()  # the GET /sweeps/{id} shape
    assert nc_app.cancel_sweep(acc["id"])["counts"] == sweep["counts"]  # idempotent
    assert nc_app.cancel_job(rest[0])["status"] == "canceled"
    with pytest.raises(NCServiceError) as info:
        nc_app.cancel_sweep("nope")
    assert info.value.status == 404 and info.value.field == "id"
    with pytest.raises(NCServiceError) as info:
        nc_app.cancel_job("nope")
    assert info.value.status == 404


# ------------------------------------------------------------- reproduce, with a fake worker in-process

def _fake_final(cfg: dict, layer: int | None = None) -> dict:
    """Synthetic but plausible final metrics, a known function of (batch_norm, weight_decay, layer)."""
    bn, wd = cfg["model"]["batch_norm"], cfg["optim"]["weight_decay"]
    conv = not (bn == "none" and wd >= 3e-3)
    depth = cfg["model"]["depth"]
    layer = depth - 1 if layer is None else layer
    return {"num_classes": 10, "train_loss": 0.01, "train_accuracy": 1.0 if conv else 0.8, "nc1": 0.1,
            "intra_cos_min": 0.5 + 10 * wd + 0.01 * layer, "inter_cos_max": -0.05 - wd - 0.001 * layer,
            "ncc_accuracy": min(1.0, layer / (depth - 1)), "inter_cos": [[1.0, 0.0], [0.0, 1.0]]}


class FakeWorker:
    """Called as the client's ``sleep``: runs every queued job to success through ``db.jobs``, as a worker."""

    def __init__(self, sessionmaker, queue):
        self.sessionmaker, self.queue, self.calls = sessionmaker, queue, 0

    def __call__(self, seconds: float) -> None:
        from db import jobs as dbjobs

        self.calls += 1
        with self.sessionmaker() as s:
            for sent in self.queue.sent:
                job = dbjobs.get_job(s, sent["task_id"])
                if job.status != "queued":
                    continue
                dbjobs.claim(s, job.id, worker="w@test", lease_seconds=60)
                runs, points = [], []
                for i, cfg in enumerate(job.config["runs"]):
                    E, L = cfg["schedule"]["epochs"], cfg["model"]["depth"]
                    layers = range(1, L) if cfg["measure"]["layers"] == "all" else [L - 1]
                    for epoch in (E // 2, E):
                        points += [{"run_index": i, "epoch": epoch, "layer": layer,
                                    "metrics": _fake_final(cfg, layer)} for layer in layers]
                    final = _fake_final(cfg)
                    final.update(converged=final["train_accuracy"] == 1.0,
                                 effective_depth=int(round(8 - 500 * cfg["optim"]["weight_decay"])))
                    runs.append({"index": i, "seed": cfg["seed"], "config": cfg, "final": final})
                dbjobs.report_progress(s, job.id, worker="w@test", epoch=1, total=2)
                dbjobs.add_metric_points(s, job.id, points)
                dbjobs.succeed(s, job.id, worker="w@test", result={"runs": runs})


@pytest.mark.parametrize("preset", ["thesis-fig3.1", "thesis-fig3.3"])
def test_reproduce_against_the_real_api(app, queue, sessionmaker, tmp_path, preset):
    import csv

    import matplotlib.image as mpimg

    from ncservice import figures
    from ncservice.reproduce import reproduce
    from ncengine.sweep import THESIS_WEIGHT_DECAYS

    worker = FakeWorker(sessionmaker, queue)
    with TestClient(app, raise_server_exceptions=False) as tc:
        nc = NCClient("http://testserver", http_client=tc, sleep=worker)
        written = reproduce(nc, preset, "small", tmp_path, progress=False, echo=lambda *a: None)
    assert worker.calls >= 1
    n_runs = 21 if preset == "thesis-fig3.1" else 7
    with open(written["results.csv"]) as f:
        assert len(list(csv.DictReader(f))) == n_runs
    rows = json.loads(written["results.json"].read_text())
    wds = list(THESIS_WEIGHT_DECAYS)
    curves = mpimg.imread(written["training_curves.png"])
    assert curves.shape[:2] == (800, 1200)
    if preset == "thesis-fig3.1":
        assert mpimg.imread(written["fig3.1.png"]).shape[:2] == (480, 1200)
        lines = {ln.get_gid(): ln for ax in figures.build_fig31(rows).axes for ln in ax.get_lines()}
        for mode in ("affine", "non_affine", "none"):
            np.testing.assert_allclose(lines[f"intra:{mode}"].get_xdata(), wds)
            np.testing.assert_allclose(lines[f"intra:{mode}"].get_ydata(), [0.5 + 10 * w + 0.05 for w in wds])
        np.testing.assert_allclose(lines["inter-nc:none"].get_xdata(), [3e-3, 7e-3, 1e-2])
        np.testing.assert_allclose(lines["etf"].get_ydata(), [-1 / 9] * 2)
    else:
        assert mpimg.imread(written["fig3.3.png"]).shape[:2] == (900, 1300)
        with open(written["fig3.3_layers.csv"]) as f:
            layer_rows = list(csv.DictReader(f))
        assert len(layer_rows) == 7 * 14  # depth 15: hidden layers 1..14 at the final epoch
        fig = figures.build_fig33([{k: float(v) for k, v in r.items() if k in (
            "weight_decay", "layer", "ncc_accuracy", "intra_cos_min", "inter_cos_max")} for r in layer_rows], rows)
        lines = {ln.get_gid(): ln for ax in fig.axes for ln in ax.get_lines()}
        assert len(lines) == 3 * 7 + 1
        np.testing.assert_allclose(lines["ncc:0.001"].get_ydata(), [min(1.0, l / 14) for l in range(1, 15)])
        np.testing.assert_allclose(lines["effective_depth"].get_ydata(), [round(8 - 500 * w) for w in wds])
