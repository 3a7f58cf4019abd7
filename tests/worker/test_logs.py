"""Worker logs name the job and the epoch (JSON lines, ncservice.logs)."""

from __future__ import annotations

import io
import json
import logging

from db import jobs as dbjobs
from ncservice.logs import make_handler
from tests.worker.conftest import tiny_run
from worker.tasks import run_job


def test_worker_logs_each_epoch_with_the_job_id(worker_settings, sm):
    with sm() as s:
        job = dbjobs.create_job(s, kind="train", config={"runs": [tiny_run(0, epochs=4, every=2)]})
    stream = io.StringIO()
    handler = make_handler(stream, "json")
    log = logging.getLogger("ncservice")
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        assert run_job(job.id, settings=worker_settings, kind="train", worker="w") == "succeeded"
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    epochs = [r for r in lines if "epoch" in r]
    assert epochs and all(r["job_id"] == job.id and job.id in r["msg"] for r in epochs)
    assert epochs[-1]["epoch"] == epochs[-1]["total"] == 4  # the last epoch is always logged
