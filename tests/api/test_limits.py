"""Sweep and job specs that would explode are refused at POST with 422 naming the field, by ncengine's hard caps
and by the service's configurable limits (``Settings.max_*``, ``NCS_MAX_*``); nothing is stored or queued."""

from __future__ import annotations

import pytest

from db import jobs as dbjobs
from ncservice.settings import Settings
from tests.api.conftest import assert_problem

BASE = {"data": {"name": "teacher", "n": 60}, "model": {"depth": 2, "width": 8}, "schedule": {"epochs": 4}}


def _nothing_created(sessionmaker, queue) -> None:
    with sessionmaker() as s:
        assert dbjobs.list_jobs(s)[0] == [] and dbjobs.list_sweeps(s)[0] == []
    assert queue.sent == []


@pytest.mark.parametrize("name, body, field", [
    # 100 x 100 x 100 = 10^6 runs: refused before expanding (ncengine.sweep.MAX_SWEEP_RUNS)
    ("grid of 10^6 runs", {"base": BASE, "grid": {"optim.lr": [0.01 + i * 1e-4 for i in range(100)],
                                                 "optim.weight_decay": [i * 1e-5 for i in range(100)],
                                                 "data.seed": list(range(100))}}, "grid"),
    ("10^3 values for one key", {"base": BASE, "grid": {"data.seed": list(range(1000))}}, "grid"),
    ("epochs 10^9", {"base": {**BASE, "schedule": {"epochs": 10**9}}}, "base.schedule.epochs"),
    ("width 10^7", {"base": {**BASE, "model": {"depth": 2, "width": 10**7}}}, "base.model.width"),
    ("width 10^7 in the grid", {"base": BASE, "grid": {"model.width": [8, 10**7]}}, "grid.model.width"),
])
def test_hard_caps_refuse_exploding_sweeps(client, queue, sessionmaker, name, body, field):
    assert_problem(client.post("/sweeps", json=body), 422, field)
    _nothing_created(sessionmaker, queue)


@pytest.mark.parametrize("body", [
    {"kind": "train", "config": {**BASE, "schedule": {"epochs": 10**9}}},
    {"kind": "train", "config": {**BASE, "model": {"depth": 2, "width": 10**7}}},
    {"kind": "ufm", "config": {"num_classes": 3, "dim": 4, "samples_per_class": 2, "weight_decay": 1e-3,
                               "steps": 10**9, "seed": 0}},
])
def test_hard_caps_refuse_exploding_jobs(client, queue, sessionmaker, body):
    assert_problem(client.post("/jobs", json=body), 422)
    _nothing_created(sessionmaker, queue)


@pytest.fixture
def tight(settings) -> Settings:
    """Service limits far below ncengine's caps (as a deployment would set with NCS_MAX_*)."""
    return settings.model_copy(update={"max_sweep_runs": 6, "max_epochs": 20, "max_width": 16,
                                       "max_total_epochs": 50, "max_ufm_steps": 100})


@pytest.fixture
def tight_client(tight, queue):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.deps import get_queue

    app = create_app(tight)
    app.dependency_overrides[get_queue] = lambda: queue
    with TestClient(app, raise_server_exceptions=False) as c:
        c.sessionmaker = app.state.sessionmaker
        yield c
    app.state.engine.dispose()


@pytest.mark.parametrize("body, field, setting", [
    ({"base": BASE, "grid": {"optim.lr": [0.01, 0.02, 0.03, 0.04]}, "seeds": [0, 1]}, "grid", "max_sweep_runs"),
    ({"base": {**BASE, "schedule": {"epochs": 21}}}, "base.schedule.epochs", "max_epochs"),
    ({"base": BASE, "grid": {"schedule.epochs": [5, 21]}}, "grid.schedule.epochs", "max_epochs"),
    ({"base": {**BASE, "model": {"depth": 2, "width": 17}}}, "base.model.width", "max_width"),
    ({"base": BASE, "grid": {"model.width": [8, 32]}}, "grid.model.width", "max_width"),
    # 3 runs x 20 epochs = 60 run-epochs > 50, each run within max_epochs
    ({"base": {**BASE, "schedule": {"epochs": 20}}, "seeds": [0, 1, 2]}, "grid", "max_total_epochs"),
])
def test_configurable_limits_refuse_sweeps(tight_client, tight, queue, body, field, setting):
    problem = assert_problem(tight_client.post("/sweeps", json=body), 422, field)
    assert problem["type"] == "urn:ncs:problem:limit-exceeded"
    assert problem["setting"] == setting and problem["limit"] == getattr(tight, setting)
    _nothing_created(tight_client.sessionmaker, queue)


def test_configurable_limits_refuse_jobs(tight_client, queue):
    r = tight_client.post("/jobs", json={"kind": "train", "config": {**BASE, "schedule": {"epochs": 21}}})
    assert assert_problem(r, 422, "config.schedule.epochs")["setting"] == "max_epochs"
    r = tight_client.post("/jobs", json={"kind": "ufm", "config": {
        "num_classes": 3, "dim": 4, "samples_per_class": 2, "weight_decay": 1e-3, "steps": 101, "seed": 0}})
    assert assert_problem(r, 422, "config.steps")["setting"] == "max_ufm_steps"
    _nothing_created(tight_client.sessionmaker, queue)


def test_within_the_limits_is_accepted(tight_client, queue):
    """At the limits exactly: 6 runs of 8 epochs (48 <= 50 run-epochs), width 16."""
    body = {"base": {**BASE, "model": {"depth": 2, "width": 16}, "schedule": {"epochs": 8}},
            "grid": {"optim.lr": [0.01, 0.02, 0.03]}, "seeds": [0, 1]}
    r = tight_client.post("/sweeps", json=body)
    assert r.status_code == 202, r.text
    assert r.json()["runs"] == 6


def test_limits_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("NCS_MAX_SWEEP_RUNS", "7")
    monkeypatch.setenv("NCS_MAX_EPOCHS", "9")
    s = Settings(_env_file=None)
    assert (s.max_sweep_runs, s.max_epochs) == (7, 9)
