"""/sweeps: grid and preset submission, aggregate state and progress, results as JSON and CSV."""

from __future__ import annotations

import csv
import io
import itertools

import pytest

from db import jobs as dbjobs
from tests.api.conftest import assert_problem

BASE = {"data": {"name": "teacher", "n": 100}, "model": {"depth": 2, "width": 8}, "schedule": {"epochs": 4},
        "measure": {"every": 2}}
GRID = {"model.batch_norm": ["affine", "none"], "optim.weight_decay": [1e-4, 1e-3]}


def _post(client, body, **headers):
    return client.post("/sweeps", json=body, headers=headers)


def _run_key(run):
    return run["model"]["batch_norm"], run["optim"]["weight_decay"], run["model"]["width"], run["seed"]


def test_grid_sweep_expands_bundles_and_enqueues(client, queue, sessionmaker):
    body = {"name": "bn-x-wd", "base": BASE, "grid": {**GRID, "model.width": [8, 16]}, "seeds": [0, 1]}
    r = _post(client, body)
    assert r.status_code == 202, r.text
    out = r.json()
    assert r.headers["location"] == f"/sweeps/{out['id']}" == out["location"]
    assert out["runs"] == 16
    with sessionmaker() as s:
        jobs = dbjobs.sweep_jobs(s, out["id"])
        sweep = dbjobs.get_sweep(s, out["id"])
    assert sweep.name == "bn-x-wd" and sweep.preset is None
    # every grid point x seed exactly once, written by hand
    want = set(itertools.product(["affine", "none"], [1e-4, 1e-3], [8, 16], [0, 1]))
    runs = [run for j in jobs for run in j.config["runs"]]
    assert sorted(_run_key(run) for run in runs) == sorted(want)
    assert all(run["data"] == {**run["data"], "name": "teacher", "n": 100} for run in runs)
    # a bundle trains one architecture: width differs across bundles, never inside one
    assert len(jobs) == 2 and all(len({run["model"]["width"] for run in j.config["runs"]}) == 1 for j in jobs)
    assert {j["id"] for j in out["jobs"]} == {j.id for j in jobs}
    assert sorted(m["task_id"] for m in queue.sent) == sorted(j.id for j in jobs)
    assert {(m["name"], m["queue"]) for m in queue.sent} == {("ncs.train_bundle", "gpu")}


def test_preset_sweep(client, queue):
    r = _post(client, {"preset": "thesis-fig3.1", "scale": "small"})
    assert r.status_code == 202, r.text
    assert r.json()["runs"] == 21  # 3 batch-norm modes x 7 weight decays (thesis Fig. 3.1)
    got = client.get(r.headers["location"]).json()
    assert got["preset"] == "thesis-fig3.1" and got["runs"] == 21
    assert got["spec"]["grid"]["optim.weight_decay"] == [1e-4, 3e-4, 5e-4, 1e-3, 3e-3, 7e-3, 1e-2]
    assert len(queue.sent) == len(got["jobs"])


@pytest.mark.parametrize("body, field", [
    ({"base": BASE, "grid": {"model.colour": [1]}}, "grid"),
    ({"base": BASE, "grid": {"optim.weight_decay": []}}, "grid"),
    ({"base": BASE, "seeds": [0, 0]}, "seeds"),
    ({"base": {**BASE, "optim": {"lr": -1.0}}}, "base.optim.lr"),
    ({"base": BASE, "grid": {"optim.lr": [0.1, -1.0]}}, "grid.optim.lr"),
    ({"base": BASE, "colour": "red"}, "colour"),
    ({"preset": "thesis-fig9.9"}, "preset"),
    ({"preset": "thesis-fig3.1", "scale": "huge"}, "scale"),
])
def test_bad_sweeps_name_the_field(client, queue, body, field):
    problem = assert_problem(_post(client, body), 422, field)
    assert problem["detail"]
    assert queue.sent == []


def test_sweep_state_progress_and_results(client, sessionmaker):
    out = _post(client, {"base": BASE, "grid": {**GRID, "model.width": [8, 16]}, "seeds": [0]}).json()
    sid = out["id"]
    s0 = client.get(f"/sweeps/{sid}").json()
    assert s0["status"] == "queued" and s0["counts"] == {"queued": 2} and s0["runs"] == 8
    assert s0["progress"] == {"epoch": 0, "total": 8, "fraction": 0.0}  # 2 jobs x 4 epochs planned
    j0, j1 = (j["id"] for j in s0["jobs"])
    with sessionmaker() as s:
        dbjobs.claim(s, j0, worker="w", lease_seconds=60)
        dbjobs.report_progress(s, j0, worker="w", epoch=1, total=4)
        dbjobs.claim(s, j1, worker="w", lease_seconds=60)
        runs1 = dbjobs.get_job(s, j1).config["runs"]
        result = {"runs": [{"config": run, "final": {"nc1": 0.1 * i, "train_accuracy": 1.0,
                                                     "intra_cos": [0.9, 0.8], "bounds": {"epsilon": 0.01}}}
                           for i, run in enumerate(runs1)]}
        dbjobs.succeed(s, j1, worker="w", result=result)
    s1 = client.get(f"/sweeps/{sid}").json()
    assert s1["status"] == "running" and s1["counts"] == {"running": 1, "succeeded": 1}
    assert s1["progress"]["epoch"] == 5 and s1["progress"]["fraction"] == pytest.approx(5 / 8)

    res = client.get(f"/sweeps/{sid}/results").json()
    rows = res["rows"]
    assert len(rows) == 8 and res["columns"][:3] == ["job_id", "run_index", "status"]
    done = [r for r in rows if r["job_id"] == j1]
    assert [r["nc1"] for r in done] == pytest.approx([0.1 * i for i in range(4)])
    assert all(r["status"] == "succeeded" and r["bounds.epsilon"] == 0.01 and r["intra_cos"] == "0.9;0.8"
               for r in done)
    assert all("nc1" not in r and r["status"] == "running" for r in rows if r["job_id"] == j0)
    assert {(r["config.model.batch_norm"], r["config.optim.weight_decay"]) for r in done} == \
        set(itertools.product(["affine", "none"], [1e-4, 1e-3]))

    text = client.get(f"/sweeps/{sid}/results", params={"format": "csv"})
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(text.text)))
    assert len(table) == 8 and list(table[0]) == res["columns"]
    assert sorted(float(r["nc1"]) for r in table if r["job_id"] == j1) == pytest.approx([0, 0.1, 0.2, 0.3])
    assert_problem(client.get(f"/sweeps/{sid}/results", params={"format": "xml"}), 422, "query.format")

    with sessionmaker() as s:
        dbjobs.fail(s, j0, worker="w", code="boom", message="x")
    assert client.get(f"/sweeps/{sid}").json()["status"] == "failed"


def test_unknown_sweep_404_and_idempotency(client, queue):
    assert_problem(client.get("/sweeps/nope"), 404, "id")
    assert_problem(client.get("/sweeps/nope/results"), 404, "id")
    body = {"base": BASE, "grid": GRID}
    a = _post(client, body, **{"Idempotency-Key": "s1"})
    b = _post(client, body, **{"Idempotency-Key": "s1"})
    assert a.json()["id"] == b.json()["id"] and a.json()["jobs"] == b.json()["jobs"]
    assert len(queue.sent) == len(a.json()["jobs"])
    assert_problem(_post(client, {**body, "seeds": [3]}, **{"Idempotency-Key": "s1"}), 422, "Idempotency-Key")
    listed = client.get("/sweeps").json()
    assert [s["id"] for s in listed["items"]] == [a.json()["id"]] and listed["next_cursor"] is None


# ---------------------------------------------------------------------------------------------- cancel

def _three_job_sweep(client, **headers) -> tuple[str, list[str]]:
    """A sweep of 3 queued jobs (one bundle per width)."""
    r = _post(client, {"base": BASE, "grid": {"model.width": [8, 16, 32]}}, **headers)
    assert r.status_code == 202, r.text
    return r.json()["id"], [j["id"] for j in r.json()["jobs"]]


def test_cancel_sweep_of_queued_jobs_cancels_all_and_is_idempotent(client, sessionmaker):
    sid, jobs = _three_job_sweep(client)
    assert len(jobs) == 3
    r = client.post(f"/sweeps/{sid}/cancel")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body.keys() == client.get(f"/sweeps/{sid}").json().keys()  # the GET /sweeps/{id} shape
    assert body["id"] == sid and body["status"] == "canceled" and body["counts"] == {"canceled": 3}
    assert [j["id"] for j in body["jobs"]] == jobs and {j["status"] for j in body["jobs"]} == {"canceled"}
    with sessionmaker() as s:
        assert all(dbjobs.get_job(s, j).cancel_requested for j in jobs)
        events = {j: len(dbjobs.job_events(s, j)) for j in jobs}
    again = client.post(f"/sweeps/{sid}/cancel")  # idempotent: nothing changes
    assert again.status_code == 200 and again.json() == body
    with sessionmaker() as s:
        assert {j: len(dbjobs.job_events(s, j)) for j in jobs} == events


def test_cancel_sweep_with_a_running_job_is_202_until_the_worker_stops(client, sessionmaker):
    sid, (queued, running, done) = _three_job_sweep(client)
    with sessionmaker() as s:
        dbjobs.claim(s, running, worker="w", lease_seconds=60)
        dbjobs.claim(s, done, worker="w", lease_seconds=60)
        dbjobs.succeed(s, done, worker="w", result={"runs": []})
    r = client.post(f"/sweeps/{sid}/cancel")
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/sweeps/{sid}" and "retry-after" in r.headers
    states = {j["id"]: j["status"] for j in r.json()["jobs"]}
    assert states == {queued: "canceled", running: "cancelling", done: "succeeded"}  # an ended job stays
    assert r.json()["status"] == "running"
    assert client.get(f"/jobs/{running}").json()["cancel_requested"] is True
    with sessionmaker() as s:  # the worker reads the flag through the DB, as for a single job's cancel
        assert dbjobs.report_progress(s, running, worker="w", epoch=1, total=4) is True
    again = client.post(f"/sweeps/{sid}/cancel")
    assert again.status_code == 202 and again.json()["counts"] == r.json()["counts"]
    with sessionmaker() as s:
        dbjobs.mark_canceled(s, running, worker="w")
    last = client.post(f"/sweeps/{sid}/cancel")
    assert last.status_code == 200 and last.json()["status"] == "canceled"
    assert last.json()["counts"] == {"canceled": 2, "succeeded": 1}


def test_cancel_sweep_404_for_unknown_and_another_keys_sweep(client, sessionmaker):
    from db import keys as dbkeys

    with sessionmaker() as s:  # made before the app's first request
        tokens = {name: dbkeys.create_key(s, name=name, admin=False)[1] for name in ("alice", "bob")}
    alice, bob = ({"Authorization": f"Bearer {tokens[n]}"} for n in ("alice", "bob"))
    assert_problem(client.post("/sweeps/nope/cancel", headers=alice), 404, "id")
    sid, jobs = _three_job_sweep(client, **alice)
    problem = assert_problem(client.post(f"/sweeps/{sid}/cancel", headers=bob), 404, "id")
    assert sid in problem["detail"]
    assert {j["status"] for j in client.get(f"/sweeps/{sid}", headers=alice).json()["jobs"]} == {"queued"}
    r = client.post(f"/sweeps/{sid}/cancel", headers=alice)
    assert r.status_code == 200 and r.json()["counts"] == {"canceled": 3}
