"""/jobs: submit, poll (ETag/304, Retry-After), metric/bound history with cursor pages, cancel, list.

Job states are reached through ``db.jobs`` (claim, add_metric_points, succeed, ...), as a worker would."""

from __future__ import annotations

import pytest

from db import jobs as dbjobs
from ncengine.config import RunConfig
from ncengine.ufm import UFMConfig
from tests.api.conftest import assert_problem

SMALL = {"data": {"name": "teacher", "n": 100}, "model": {"depth": 2, "width": 8}, "schedule": {"epochs": 3}}
UFM = {"num_classes": 3, "dim": 4, "samples_per_class": 2, "weight_decay": 0.01, "steps": 10, "seed": 0}


def _post_train(client, **headers):
    return client.post("/jobs", json={"kind": "train", "config": SMALL}, headers=headers)


def test_post_train_job_is_written_then_enqueued(client, queue, sessionmaker):
    r = _post_train(client)
    assert r.status_code == 202, r.text
    body = r.json()
    job_id = body["id"]
    assert r.headers["location"] == f"/jobs/{job_id}" == body["location"]
    assert int(r.headers["retry-after"]) > 0
    assert body["status"] == "queued" and body["kind"] == "train"
    # the task is sent by name, job id = task id = only argument, on the gpu queue
    assert queue.sent == [{"name": "ncs.train_bundle", "args": [job_id], "task_id": job_id, "queue": "gpu"}]
    with sessionmaker() as s:
        job = dbjobs.get_job(s, job_id)
        # stored as a one-member bundle of the fully validated RunConfig (defaults filled in)
        assert job.config == {"runs": [RunConfig.model_validate(SMALL).model_dump(mode="json")]}
        assert job.status == "queued" and job.sends == 1 and job.enqueued_at is not None


def test_post_ufm_job_goes_to_cpu_queue(client, queue, sessionmaker):
    r = client.post("/jobs", json={"kind": "ufm", "config": UFM})
    assert r.status_code == 202, r.text
    assert queue.sent[0]["name"] == "ncs.ufm" and queue.sent[0]["queue"] == "cpu"
    with sessionmaker() as s:
        assert dbjobs.get_job(s, r.json()["id"]).config == UFMConfig.model_validate(UFM).model_dump(mode="json")


@pytest.mark.parametrize("body, field", [
    ({"kind": "train", "config": {**SMALL, "optim": {"lr": -1}}}, "config.optim.lr"),
    ({"kind": "train", "config": {**SMALL, "model": {"depth": 2, "width": 8, "batch_norm": "maybe"}}},
     "config.model.batch_norm"),
    ({"kind": "train", "config": {**SMALL, "schedule": {"epochs": 10**9}}}, "config.schedule.epochs"),
    ({"kind": "train", "config": {**SMALL, "surprise": 1}}, "config.surprise"),
    ({"kind": "ufm", "config": {**UFM, "num_classes": 1}}, "config.num_classes"),
    ({"kind": "bake", "config": SMALL}, "kind"),
    ({"config": SMALL}, "kind"),
    ({"kind": "train"}, "config"),
])
def test_bad_job_bodies_name_the_field(client, queue, body, field):
    r = client.post("/jobs", json=body)
    problem = assert_problem(r, 422, field)
    assert problem["errors"] and problem["errors"][0]["field"] == field
    assert queue.sent == []


def test_body_not_json_is_400_and_another_media_type_415(client, queue):
    r = client.post("/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert_problem(r, 400, "body")
    r = client.post("/jobs", content=b"kind=train", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and r.headers["content-type"].startswith("application/problem+json")
    assert queue.sent == []


def test_idempotency_key_replay_and_conflict(client, queue):
    a = _post_train(client, **{"Idempotency-Key": "k-1"})
    b = _post_train(client, **{"Idempotency-Key": "k-1"})
    assert a.status_code == b.status_code == 202
    assert a.json()["id"] == b.json()["id"]
    assert len(queue.sent) == 1  # a replay does not send the task twice
    c = client.post("/jobs", json={"kind": "train", "config": {**SMALL, "seed": 7}},
                    headers={"Idempotency-Key": "k-1"})
    assert_problem(c, 422, "Idempotency-Key")
    d = _post_train(client, **{"Idempotency-Key": "k-2"})
    assert d.json()["id"] != a.json()["id"] and len(queue.sent) == 2


def test_unknown_job_is_404_everywhere(client):
    for method, path in [("get", "/jobs/nope"), ("get", "/jobs/nope/metrics"), ("get", "/jobs/nope/bounds"),
                         ("post", "/jobs/nope/cancel")]:
        problem = assert_problem(getattr(client, method)(path), 404, "id")
        assert "nope" in problem["detail"]


def test_etag_304_until_the_job_changes_and_retry_after_while_active(client, sessionmaker):
    job_id = _post_train(client).json()["id"]
    r1 = client.get(f"/jobs/{job_id}")
    assert r1.status_code == 200
    etag = r1.headers["etag"]
    assert r1.json()["version"] == int(etag.strip('"'))
    assert "retry-after" in r1.headers  # queued
    r2 = client.get(f"/jobs/{job_id}", headers={"If-None-Match": etag})
    assert r2.status_code == 304 and r2.content == b"" and r2.headers["etag"] == etag
    assert client.get(f"/jobs/{job_id}", headers={"If-None-Match": f'W/{etag}, "zzz"'}).status_code == 304
    with sessionmaker() as s:
        assert dbjobs.claim(s, job_id, worker="w1@host", lease_seconds=60) is not None
    r3 = client.get(f"/jobs/{job_id}", headers={"If-None-Match": etag})
    assert r3.status_code == 200 and r3.headers["etag"] != etag
    assert r3.json()["status"] == "running" and r3.json()["attempts"] == 1 and "retry-after" in r3.headers
    r4 = client.get(f"/jobs/{job_id}", headers={"If-None-Match": r3.headers["etag"]})
    assert r4.status_code == 304
    with sessionmaker() as s:
        dbjobs.succeed(s, job_id, worker="w1@host", result={"runs": [{"nc1": 0.5}]})
    r5 = client.get(f"/jobs/{job_id}", headers={"If-None-Match": r3.headers["etag"]})
    assert r5.status_code == 200 and r5.json()["status"] == "succeeded" and "retry-after" not in r5.headers



def test_304_is_one_primary_key_query_of_version(client, app):
    """The polling path reads (version, status) of one job by primary key and nothing else: no full row, no
    metric points, no bounds, no JSON."""
    from sqlalchemy import event

    job_id = _post_train(client).json()["id"]
    etag = client.get(f"/jobs/{job_id}").headers["etag"]  # warms the auth "keys exist?" cache too
    statements: list[str] = []

    def record(conn, cursor, statement, params, context, executemany):
        if statement.lstrip().upper().startswith(("SELECT", "UPDATE", "INSERT", "DELETE")):
            statements.append(" ".join(statement.split()))

    event.listen(app.state.engine, "before_cursor_execute", record)
    try:
        assert client.get(f"/jobs/{job_id}", headers={"If-None-Match": etag}).status_code == 304
    finally:
        event.remove(app.state.engine, "before_cursor_execute", record)
    assert len(statements) == 1, statements
    select_list = statements[0].split(" FROM ")[0].removeprefix("SELECT ")
    assert sorted(c.strip() for c in select_list.split(",")) == ["jobs.status", "jobs.version"], statements
    assert "FROM jobs WHERE jobs.id = ?" in statements[0], statements


def test_new_metric_points_change_the_etag_and_the_body_is_never_stale(client, sessionmaker):
    """Points and bounds bump the version (the ETag covers latest_metrics/bounds); a cached body is served only
    for the version it was built at, so every change shows at the next poll."""
    job_id = _post_train(client).json()["id"]
    with sessionmaker() as s:
        dbjobs.claim(s, job_id, worker="w", lease_seconds=60)
    r1 = client.get(f"/jobs/{job_id}")
    assert r1.json()["latest_metrics"] == []
    assert client.get(f"/jobs/{job_id}").content == r1.content  # same version: same body (cached)
    with sessionmaker() as s:  # no progress write: only the points
        assert dbjobs.add_metric_points(s, job_id, [{"epoch": 3, "metrics": {"nc1": 0.25}}]) == 1
        assert dbjobs.add_metric_points(s, job_id, [{"epoch": 3, "metrics": {"nc1": 9.0}}]) == 0  # skipped
    r2 = client.get(f"/jobs/{job_id}", headers={"If-None-Match": r1.headers["etag"]})
    assert r2.status_code == 200 and int(r2.headers["etag"].strip('"')) == int(r1.headers["etag"].strip('"')) + 1
    assert [(p["epoch"], p["metrics"]["nc1"]) for p in r2.json()["latest_metrics"]] == [(3, 0.25)]
    with sessionmaker() as s:
        dbjobs.add_bounds(s, job_id, [{"epoch": 3, "block": {"epsilon": 0.5}}])
    r3 = client.get(f"/jobs/{job_id}", headers={"If-None-Match": r2.headers["etag"]})
    assert r3.status_code == 200 and r3.json()["bounds"] == [{"run_index": 0, "epoch": 3, "block": {"epsilon": 0.5}}]
    with sessionmaker() as s:
        dbjobs.report_progress(s, job_id, worker="w", epoch=4, total=10)
    r4 = client.get(f"/jobs/{job_id}")
    assert r4.json()["progress"]["epoch"] == 4 and r4.json()["version"] == int(r4.headers["etag"].strip('"'))
    assert client.get(f"/jobs/{job_id}", headers={"If-None-Match": r4.headers["etag"]}).status_code == 304

def _run_with_history(client, sessionmaker, runs=2, epochs=5, layers=(-1,)):
    job_id = _post_train(client).json()["id"]
    with sessionmaker() as s:
        dbjobs.claim(s, job_id, worker="w", lease_seconds=60)
        dbjobs.report_progress(s, job_id, worker="w", epoch=epochs, total=10)
        pts = [{"run_index": r, "epoch": e, "layer": layer, "metrics": {"nc1": 100 * r + e + layer / 10}}
               for r in range(runs) for e in range(epochs) for layer in layers]
        dbjobs.add_metric_points(s, job_id, pts[::-1])  # insertion order must not matter
        dbjobs.add_bounds(s, job_id, [{"run_index": r, "epoch": e, "block": {"epsilon": r + e / 10}}
                                      for r in range(runs) for e in range(epochs)])
    return job_id


def test_job_shows_progress_latest_metrics_and_latest_bounds(client, sessionmaker):
    job_id = _run_with_history(client, sessionmaker, runs=2, epochs=5, layers=(0, 1, -1))
    body = client.get(f"/jobs/{job_id}").json()
    assert body["progress"] == {"epoch": 5, "total": 10, "fraction": 0.5}
    latest = {(p["run_index"], p["layer"]): p for p in body["latest_metrics"]}
    assert set(latest) == {(r, layer) for r in range(2) for layer in (0, 1, -1)}
    assert all(p["epoch"] == 4 for p in latest.values())
    assert latest[(1, 0)]["metrics"]["nc1"] == pytest.approx(104.0)
    assert sorted((b["run_index"], b["epoch"], b["block"]["epsilon"]) for b in body["bounds"]) == \
        [(0, 4, pytest.approx(0.4)), (1, 4, pytest.approx(1.4))]
    assert body["final"] is None and body["error"] is None


def _collect(client, url, limit):
    items, cursor, pages = [], None, 0
    while True:
        r = client.get(url, params={"limit": limit, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["items"]) <= limit
        items += page["items"]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            return items, pages


def test_metric_history_pages_and_filters(client, sessionmaker):
    job_id = _run_with_history(client, sessionmaker, runs=2, epochs=5, layers=(0, -1))
    items, pages = _collect(client, f"/jobs/{job_id}/metrics", limit=3)
    expected = sorted((r, e, layer) for r in range(2) for e in range(5) for layer in (0, -1))
    assert [(p["run_index"], p["epoch"], p["layer"]) for p in items] == expected
    assert pages == 7  # ceil(20 / 3)
    assert all(p["metrics"]["nc1"] == pytest.approx(100 * p["run_index"] + p["epoch"] + p["layer"] / 10)
               for p in items)
    only = client.get(f"/jobs/{job_id}/metrics", params={"run_index": 1, "layer": -1}).json()
    assert [(p["run_index"], p["epoch"], p["layer"]) for p in only["items"]] == [(1, e, -1) for e in range(5)]
    bounds, _ = _collect(client, f"/jobs/{job_id}/bounds", limit=4)
    assert [(b["run_index"], b["epoch"]) for b in bounds] == [(r, e) for r in range(2) for e in range(5)]
    assert_problem(client.get(f"/jobs/{job_id}/metrics", params={"cursor": "garbage!"}), 422, "cursor")
    assert_problem(client.get(f"/jobs/{job_id}/metrics", params={"limit": 0}), 422, "query.limit")


def test_cancel_transitions(client, sessionmaker):
    queued = _post_train(client).json()["id"]
    r = client.post(f"/jobs/{queued}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    again = client.post(f"/jobs/{queued}/cancel")  # idempotent
    assert again.status_code == 200 and again.json()["status"] == "canceled"
    assert again.json()["version"] == r.json()["version"]

    running = _post_train(client).json()["id"]
    with sessionmaker() as s:
        dbjobs.claim(s, running, worker="w", lease_seconds=60)
    r = client.post(f"/jobs/{running}/cancel")
    assert r.status_code == 202 and r.json()["status"] == "cancelling"
    assert client.get(f"/jobs/{running}").json()["cancel_requested"] is True
    assert client.post(f"/jobs/{running}/cancel").json()["status"] == "cancelling"

    for end in ("succeed", "fail"):
        done = _post_train(client).json()["id"]
        with sessionmaker() as s:
            dbjobs.claim(s, done, worker="w", lease_seconds=60)
            if end == "succeed":
                dbjobs.succeed(s, done, worker="w", result={"runs": []})
            else:
                dbjobs.fail(s, done, worker="w", code="boom", message="it broke")
        problem = assert_problem(client.post(f"/jobs/{done}/cancel"), 409, "status")
        assert problem["job_status"] == ("succeeded" if end == "succeed" else "failed")
    failed = client.get(f"/jobs/{done}").json()
    assert failed["error"] == {"code": "boom", "message": "it broke"}


def test_list_jobs_pages_newest_first_and_filters(client, sessionmaker):
    ids = [_post_train(client).json()["id"] for _ in range(5)]
    ufm = client.post("/jobs", json={"kind": "ufm", "config": UFM}).json()["id"]
    with sessionmaker() as s:
        dbjobs.claim(s, ids[0], worker="w", lease_seconds=60)
    items, pages = _collect(client, "/jobs", limit=2)
    assert [j["id"] for j in items] == [ufm, *ids[::-1]] and pages == 3
    assert [j["id"] for j in client.get("/jobs", params={"kind": "ufm"}).json()["items"]] == [ufm]
    running = client.get("/jobs", params={"status": "running"}).json()
    assert [j["id"] for j in running["items"]] == [ids[0]] and running["next_cursor"] is None
    both = client.get("/jobs", params=[("status", "running"), ("kind", "train"), ("status", "queued")]).json()
    assert {j["id"] for j in both["items"]} == set(ids)
    assert_problem(client.get("/jobs", params={"status": "sleeping"}), 422, "query.status.0")
    assert_problem(client.get("/jobs", params={"cursor": "%%%"}), 422, "cursor")
