"""GET /jobs/{id}/events: server-sent events of state changes, metric points and progress; Last-Event-ID."""

from __future__ import annotations

import json
import threading
import time

from db import jobs as dbjobs
from tests.api.conftest import assert_problem
from tests.api.fakework import point, run_job

CONFIG = {"data": {"name": "teacher", "n": 100}, "model": {"depth": 2, "width": 8}, "schedule": {"epochs": 4},
          "measure": {"every": 1}}


def parse_sse(lines) -> list[dict]:
    """A minimal SSE parser (WHATWG): blank line ends an event; ``field: value``; ``:`` starts a comment."""
    events, cur = [], {}
    for line in lines:
        if line == "":
            if "data" in cur or "event" in cur:
                events.append({"id": cur.get("id"), "event": cur.get("event", "message"),
                               "data": json.loads(cur["data"]) if "data" in cur else None})
            cur = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            cur[name] = value[1:] if value.startswith(" ") else value
    return events


def _stream(client, job_id, **headers):
    with client.stream("GET", f"/jobs/{job_id}/events", params={"poll": 0.05}, headers=headers) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        return parse_sse(resp.iter_lines())


def _job(client):
    out = client.post("/jobs", json={"kind": "train", "config": CONFIG})
    assert out.status_code == 202, out.text
    return out.json()["id"]


def test_finished_job_streams_history_then_ends(client, sessionmaker):
    jid = _job(client)
    runs = run_job(sessionmaker, jid)
    events = _stream(client, jid)
    with sessionmaker() as s:
        want_states = [e.status for e in dbjobs.job_events(s, jid)]
    assert want_states[-2:] == ["running", "succeeded"]
    assert [e["data"]["status"] for e in events if e["event"] == "state"] == want_states
    metrics = [e["data"] for e in events if e["event"] == "metric"]
    assert [(m["epoch"], m["layer"]) for m in metrics] == [(e, -1) for e in range(4)]
    for m in metrics:  # the values the fake worker wrote, recomputed
        assert m["metrics"] == point(m["epoch"], -1, runs[0], 4)["metrics"]
    assert [e["data"] for e in events if e["event"] == "progress"] == [{"epoch": 4, "total": 4}]
    assert events[-1] == {"id": events[-1]["id"], "event": "end", "data": {"status": "succeeded"}}
    assert len({e["id"] for e in events[:-1]}) == len(events) - 1  # every event but "end" moves the cursor


def test_last_event_id_resumes_after_that_event(client, sessionmaker):
    jid = _job(client)
    run_job(sessionmaker, jid)
    full = _stream(client, jid)
    for k in (0, 3, len(full) - 2):
        again = _stream(client, jid, **{"Last-Event-ID": full[k]["id"]})
        assert again == full[k + 1:], k


def test_live_progress_while_the_job_runs(client, sessionmaker):
    jid = _job(client)

    def work():
        with sessionmaker() as s:
            time.sleep(0.2)
            dbjobs.claim(s, jid, worker="w", lease_seconds=60)
            for e in range(4):
                time.sleep(0.25)
                dbjobs.report_progress(s, jid, worker="w", epoch=e + 1, total=4)
                dbjobs.add_metric_points(s, jid, [{"run_index": 0, **point(e, -1, CONFIG | {
                    "model": {"batch_norm": "affine"}, "optim": {"weight_decay": 1e-3}}, 4)}])
            dbjobs.succeed(s, jid, worker="w", result={"runs": []})

    worker = threading.Thread(target=work)
    worker.start()
    try:
        events = _stream(client, jid)
    finally:
        worker.join()
    kinds = [e["event"] for e in events]
    assert kinds[0] == "state" and kinds[-1] == "end"
    progress = [e["data"]["epoch"] for e in events if e["event"] == "progress"]
    assert progress == sorted(progress) and progress[-1] == 4 and len(progress) >= 3  # seen live, epoch by epoch
    assert [e["data"]["epoch"] for e in events if e["event"] == "metric"] == [0, 1, 2, 3]
    assert [e["data"]["status"] for e in events if e["event"] == "state"][-3:] == ["queued", "running",
                                                                                  "succeeded"][-3:]


def test_unknown_job_and_bad_last_event_id(client, sessionmaker):
    assert_problem(client.get(f"/jobs/{'0' * 32}/events"), 404)
    jid = _job(client)
    assert_problem(client.get(f"/jobs/{jid}/events", headers={"Last-Event-ID": "nope"}), 422,
                   "header.Last-Event-ID")
