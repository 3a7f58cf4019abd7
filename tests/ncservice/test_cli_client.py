"""The client commands of ``ncservice`` (submit, status, watch, results, measure --url), run through typer's
CliRunner against the real API app (an NCClient over FastAPI's TestClient), and ``--help`` examples."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from ncservice.cli import app as cli
from ncservice.client import NCClient
from tests.api.fakework import final_metrics, run_job

BASE = {"data": {"name": "teacher", "n": 100}, "model": {"depth": 2, "width": 8}, "schedule": {"epochs": 3},
        "measure": {"every": 1}}


def test_submit_preset_and_status(invoke, http):
    res = invoke("submit", "--preset", "thesis-fig3.1", "--scale", "small")
    assert res.exit_code == 0, res.output
    sid = res.stdout.strip().splitlines()[-1]
    sweep = http.get(f"/sweeps/{sid}").json()
    assert sweep["runs"] == 3 * 7 and sweep["preset"] == "thesis-fig3.1"  # 3 BN modes x 7 weight decays
    out = invoke("status", sid)
    assert out.exit_code == 0, out.output
    assert all(j["id"] in out.stdout for j in sweep["jobs"]) and "queued" in out.stdout
    as_json = json.loads(invoke("status", sid, "--json").stdout)
    assert as_json["id"] == sid and as_json["status"] == "queued"


def test_submit_yaml_sweep_and_job(invoke, http, tmp_path):
    import yaml

    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({"base": BASE, "grid": {"optim.weight_decay": [1e-4, 1e-3, 1e-2]},
                                    "seeds": [0, 1]}))
    res = invoke("submit", str(spec))
    assert res.exit_code == 0, res.output
    assert http.get(f"/sweeps/{res.stdout.split()[-1]}").json()["runs"] == 6
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"kind": "train", "config": BASE}))
    res = invoke("submit", str(job))
    assert res.exit_code == 0, res.output
    assert http.get(f"/jobs/{res.stdout.split()[-1]}").json()["kind"] == "train"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": {**BASE, "model": {"depth": -3}}, "grid": {}}))
    res = invoke("submit", str(bad))
    assert res.exit_code == 2 and "error: 422" in res.output and "depth" in res.output
    assert invoke("submit").exit_code == 2  # neither SPEC nor --preset


def test_watch_until_done_then_results(invoke, http, sessionmaker):
    res = invoke("submit", "--preset", "thesis-fig3.1", "--scale", "small")
    sid = res.stdout.split()[-1]
    jobs = [j["id"] for j in http.get(f"/sweeps/{sid}").json()["jobs"]]
    pending = list(jobs)

    def work(_seconds):  # each poll interval, one more job runs to completion
        run_job(sessionmaker, pending.pop(0), epochs=2)

    out = invoke("watch", sid, sleep=work)
    assert out.exit_code == 0, out.output
    assert f"sweep {sid} succeeded" in out.stdout and not pending
    text = invoke("results", sid, "--format", "csv")
    assert text.exit_code == 0, text.output
    rows = list(csv.DictReader(io.StringIO(text.stdout)))
    assert len(rows) == 21
    for row in rows:
        want = final_metrics({"model": {"batch_norm": row["config.model.batch_norm"]},
                              "optim": {"weight_decay": float(row["config.optim.weight_decay"])}})
        assert float(row["intra_cos_min"]) == pytest.approx(want["intra_cos_min"])
        assert float(row["inter_cos_max"]) == pytest.approx(want["inter_cos_max"])
    data = json.loads(invoke("results", sid, "--format", "json").stdout)
    assert len(data["rows"]) == 21 and {r["status"] for r in data["rows"]} == {"succeeded"}
    assert invoke("results", sid, "--format", "xml").exit_code == 2


def test_watch_a_failed_job_exits_1(invoke, http, sessionmaker):
    from db import jobs as dbjobs

    jid = invoke("submit", "--preset", "thesis-fig3.3", "--scale", "small").stdout.split()[-1]
    job_id = http.get(f"/sweeps/{jid}").json()["jobs"][0]["id"]

    def crash(_seconds):
        with sessionmaker() as s:
            dbjobs.claim(s, job_id, worker="w", lease_seconds=60)
            dbjobs.fail(s, job_id, worker="w", code="nan-loss", message="loss diverged")

    out = invoke("watch", job_id, sleep=crash)
    assert out.exit_code == 1 and f"job {job_id} failed" in out.stdout
    status = invoke("status", job_id)
    assert "nan-loss" in status.stdout and "failed" in status.stdout
    assert invoke("status", "f" * 32).exit_code == 2


def test_cancel_a_sweep_or_a_job(invoke, http, sessionmaker, tmp_path):
    import yaml

    from db import jobs as dbjobs

    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({"base": BASE, "grid": {"model.width": [8, 16, 32]}}))  # 3 jobs
    sid = invoke("submit", str(spec)).stdout.split()[-1]
    jobs = [j["id"] for j in http.get(f"/sweeps/{sid}").json()["jobs"]]
    assert len(jobs) == 3
    with sessionmaker() as s:
        dbjobs.claim(s, jobs[0], worker="w", lease_seconds=60)
    out = invoke("cancel", sid)  # a sweep id: every unfinished job of the sweep
    assert out.exit_code == 0, out.output
    assert f"sweep {sid} running (2 canceled, 1 cancelling)" in out.stdout
    states = {j["id"]: j["status"] for j in http.get(f"/sweeps/{sid}").json()["jobs"]}
    assert states == {j: "cancelling" if j == jobs[0] else "canceled" for j in jobs}
    again = json.loads(invoke("cancel", sid, "--json").stdout)  # idempotent
    assert again["id"] == sid and again["counts"] == {"cancelling": 1, "canceled": 2}

    job = invoke("submit", "--preset", "thesis-fig3.3", "--scale", "small").stdout.split()[-1]
    job_id = http.get(f"/sweeps/{job}").json()["jobs"][0]["id"]
    out = invoke("cancel", job_id)  # a job id: that job alone
    assert out.exit_code == 0 and f"job {job_id} canceled" in out.stdout
    assert invoke("cancel", "f" * 32).exit_code == 2


def test_measure_remote_equals_local(invoke, tmp_path):
    from ncengine.metrics import measure

    rng = np.random.default_rng(1)
    C, d, n = 3, 5, 12
    y = np.repeat(np.arange(C), n)
    H = rng.normal(size=(C, d))[y] + 0.2 * rng.normal(size=(C * n, d))
    W = rng.normal(size=(C, d))
    for name, arr in (("H", H), ("y", y), ("W", W)):
        np.save(tmp_path / f"{name}.npy", arr)
    args = [str(tmp_path / "H.npy"), str(tmp_path / "y.npy"), "--weights", str(tmp_path / "W.npy"), "--json"]
    remote = invoke("measure", *args, "--url", "http://testserver")
    assert remote.exit_code == 0, remote.output
    got = json.loads(remote.stdout)
    want = measure(H, y, W).to_dict()
    for key in ("nc1", "intra_cos_min", "inter_cos_max", "nc3_self_duality", "ncc_accuracy"):
        assert got[key] == pytest.approx(want[key], rel=1e-10, abs=1e-12), key
    assert got["bounds"]["min_loss_m"] == pytest.approx(want["bounds"]["min_loss_m"])
    np.save(tmp_path / "y2.npy", np.eye(C)[y])  # one-hot: refused by the service, which names the field
    bad = invoke("measure", str(tmp_path / "H.npy"), str(tmp_path / "y2.npy"), "--url", "http://testserver")
    assert bad.exit_code == 2 and "labels" in bad.output


@pytest.mark.parametrize("command", ["submit", "status", "watch", "cancel", "results", "measure", "reproduce",
                                     "serve", "api", "worker", "reconciler", "migrate"])
def test_help_shows_an_example(command):
    res = CliRunner().invoke(cli, [command, "--help"], terminal_width=200)
    assert res.exit_code == 0 and "Example" in res.stdout and f"ncservice {command}" in res.stdout
