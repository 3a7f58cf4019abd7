"""API keys (issue 7): Bearer auth, per-key ownership (another key gets 404, an admin sees all), revocation,
hashed storage, the `ncservice keys` CLI, and the refusal to start open on a non-loopback address."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from api.auth import AuthConfigError, is_loopback
from api.deps import get_queue
from db import jobs as dbjobs
from db import keys as dbkeys
from db.models import ApiKey, Artifact, Job, Sweep
from tests.api.conftest import assert_problem, bearer as _bearer

SWEEP = {"base": {"data": {"name": "teacher", "n": 60}, "model": {"depth": 2, "width": 8},
                  "schedule": {"epochs": 3}}, "seeds": [0, 1]}
JOB = {"kind": "train", "config": SWEEP["base"]}


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _app_client(settings, queue, **update):
    app = create_app(settings.model_copy(update=update))
    app.dependency_overrides[get_queue] = lambda: queue
    return app, TestClient(app, raise_server_exceptions=False)


# ------------------------------------------------------------------------------------------------- basics
@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("192.168.0.7", False), ("example.org", False),
])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_tokens_are_stored_hashed(keys, sessionmaker, api_db_url):
    with sessionmaker() as s:
        rows = {k.name: k for k in s.scalars(select(ApiKey))}
    for name, (key_id, token) in keys.items():
        assert rows[name].token_hash == hashlib.sha256(token.encode()).hexdigest()
        assert len(token) >= 40 and token.startswith("ncs_")
    raw = Path(api_db_url.removeprefix("sqlite:///")).read_bytes()
    for _, token in keys.values():
        assert token.encode() not in raw and token[10:].encode() not in raw  # only hashes and a short prefix


def test_no_keys_on_loopback_is_open_and_health_stays_public(client):
    assert client.get("/jobs").status_code == 200  # auto mode, loopback, no key exists yet
    assert client.get("/health").status_code == 200


def test_once_a_key_exists_requests_need_one(keys, client):
    body = assert_problem(client.get("/jobs"), 401, "Authorization")
    assert "Bearer" in body["detail"]
    r = client.get("/jobs")
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert client.get("/health").status_code == 200 and client.get("/openapi.json").status_code == 200
    assert client.get("/jobs", headers=_bearer(keys["alice"][1])).status_code == 200


@pytest.mark.parametrize("header", ["Bearer ncs_not-a-real-key-0000000000000000000000000",
                                    "Bearer something", "Basic YWxpY2U6c2VjcmV0", "Bearer", "ncs_abc"])
def test_wrong_credentials_are_401(keys, client, header):
    assert_problem(client.get("/jobs", headers={"Authorization": header}), 401, "Authorization")


def test_a_wrong_key_is_401_even_when_auth_is_not_required(client):
    """No key exists (open on loopback), yet a key that is sent must be valid: never silently anonymous."""
    assert_problem(client.get("/jobs", headers=_bearer("ncs_bogus")), 401, "Authorization")


def test_revoked_key_is_refused_at_once(keys, client, sessionmaker):
    token = keys["alice"][1]
    assert client.get("/jobs", headers=_bearer(token)).status_code == 200
    with sessionmaker() as s:
        first = dbkeys.revoke_key(s, keys["alice"][0]).revoked_at
        again = dbkeys.revoke_key(s, keys["alice"][0]).revoked_at  # idempotent
    assert first == again
    assert_problem(client.get("/jobs", headers=_bearer(token)), 401, "Authorization")
    assert client.get("/jobs", headers=_bearer(keys["bob"][1])).status_code == 200


# ---------------------------------------------------------------------------------------------- ownership
def test_rows_belong_to_their_key_other_keys_get_404_admin_sees_all(keys, client, sessionmaker):
    alice, bob, root = (_bearer(keys[n][1]) for n in ("alice", "bob", "root"))
    alice_id = keys["alice"][0]
    sweep = client.post("/sweeps", json=SWEEP, headers=alice)
    assert sweep.status_code == 202, sweep.text
    sweep_id = sweep.json()["id"]
    job_id = client.post("/jobs", json=JOB, headers=alice).json()["id"]
    rng = np.random.default_rng(0)
    files = {"features": ("f.npy", _npy(rng.normal(size=(30, 3)))), "labels": ("y.npy", _npy(np.arange(30) % 3))}
    measure_id = client.post("/measure?async=true", files=files, headers=alice).json()["id"]

    with sessionmaker() as s:  # owner = the key's id, on every row the key created
        assert s.get(Sweep, sweep_id).owner == alice_id
        assert {j.owner for j in s.scalars(select(Job))} == {alice_id}
        arts = list(s.scalars(select(Artifact).where(Artifact.job_id == measure_id)))
        assert arts and {a.owner for a in arts} == {alice_id}

    paths = [f"/sweeps/{sweep_id}", f"/sweeps/{sweep_id}/results", f"/jobs/{job_id}", f"/jobs/{job_id}/metrics",
             f"/jobs/{job_id}/bounds", f"/jobs/{measure_id}"]
    for path in paths:
        assert client.get(path, headers=alice).status_code == 200, path
        assert client.get(path, headers=root).status_code == 200, path
        assert_problem(client.get(path, headers=bob), 404)
    assert_problem(client.post(f"/jobs/{job_id}/cancel", headers=bob), 404)

    def ids(path, headers):
        return {item["id"] for item in client.get(path, headers=headers).json()["items"]}

    all_jobs = ids("/jobs?limit=100", alice)
    assert job_id in all_jobs and measure_id in all_jobs
    assert ids("/jobs?limit=100", bob) == set() and ids("/sweeps", bob) == set()
    assert ids("/jobs?limit=100", root) == all_jobs and ids("/sweeps", root) == {sweep_id}
    # the admin can act on another key's job; the owner is unchanged
    assert client.post(f"/jobs/{job_id}/cancel", headers=root).status_code == 200
    with sessionmaker() as s:
        assert dbjobs.get_job(s, job_id).owner == alice_id


def test_idempotency_keys_are_per_owner(keys, client):
    """The same Idempotency-Key from two keys makes two jobs (a key cannot replay or probe another's)."""
    h = {"Idempotency-Key": "same-key"}
    a = client.post("/jobs", json=JOB, headers={**h, **_bearer(keys["alice"][1])})
    b = client.post("/jobs", json=JOB, headers={**h, **_bearer(keys["bob"][1])})
    assert a.status_code == b.status_code == 202
    assert a.json()["id"] != b.json()["id"]


# ------------------------------------------------------------------------------------------------ startup
def test_refuses_to_start_on_a_public_address_without_keys(settings, queue):
    app, client = _app_client(settings, queue, host="0.0.0.0")
    with pytest.raises(AuthConfigError, match="no API key exists"):
        with client:
            pass
    app.state.engine.dispose()


def test_refuses_auth_off_on_a_public_address_even_with_keys(keys, settings, queue):
    app, client = _app_client(settings, queue, host="0.0.0.0", auth="off")
    with pytest.raises(AuthConfigError, match="NCS_AUTH=off is only allowed on a loopback"):
        with client:
            pass
    app.state.engine.dispose()


def test_starts_on_a_public_address_with_a_key_and_requires_it(keys, settings, queue):
    app, client = _app_client(settings, queue, host="0.0.0.0")
    with client:
        assert_problem(client.get("/jobs"), 401, "Authorization")
        assert client.get("/jobs", headers=_bearer(keys["bob"][1])).status_code == 200
    app.state.engine.dispose()


def test_auth_off_on_loopback_ignores_keys(keys, settings, queue):
    app, client = _app_client(settings, queue, auth="off")
    with client:
        assert client.get("/jobs").status_code == 200
    app.state.engine.dispose()


def test_auth_on_requires_a_key_even_on_loopback_without_keys(settings, queue):
    app, client = _app_client(settings, queue, auth="on")
    with client:
        assert_problem(client.get("/jobs"), 401, "Authorization")
    app.state.engine.dispose()


# ---------------------------------------------------------------------------------------------------- CLI
def test_keys_cli_create_list_revoke(tmp_path, monkeypatch, queue):
    from typer.testing import CliRunner

    from ncservice.cli import app as cli
    from ncservice.settings import Settings, get_settings

    monkeypatch.setenv("NCS_DATA_DIR", str(tmp_path / "cli-data"))
    monkeypatch.delenv("NCS_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        made = runner.invoke(cli, ["keys", "create", "carol", "--json"])
        assert made.exit_code == 0, made.output
        carol = json.loads(made.output.strip().splitlines()[-1])
        made = runner.invoke(cli, ["keys", "create", "ops", "--admin", "--json"])
        ops = json.loads(made.output.strip().splitlines()[-1])
        assert (carol["admin"], ops["admin"]) == (False, True)
        listed = json.loads(runner.invoke(cli, ["keys", "list", "--json"]).output.strip().splitlines()[-1])
        assert {r["id"] for r in listed} == {carol["id"], ops["id"]}
        assert all(r["revoked_at"] is None for r in listed)
        assert carol["token"] not in json.dumps(listed)

        settings = Settings(_env_file=None, data_dir=tmp_path / "cli-data")
        app, client = _app_client(settings, queue)
        with client:
            assert client.get("/jobs", headers=_bearer(carol["token"])).status_code == 200
            revoked = runner.invoke(cli, ["keys", "revoke", carol["id"]])
            assert revoked.exit_code == 0 and "revoked" in revoked.output
            assert_problem(client.get("/jobs", headers=_bearer(carol["token"])), 401, "Authorization")
            assert client.get("/jobs", headers=_bearer(ops["token"])).status_code == 200
        app.state.engine.dispose()
        assert runner.invoke(cli, ["keys", "revoke", "no-such-key"]).exit_code == 2
    finally:
        get_settings.cache_clear()


def test_key_lookups_end_their_transaction(keys, sessionmaker):
    """has_active_keys and authenticate commit: the API asks them in one threadpool hop and queries jobs in
    another, and a connection held between the two can starve the pool under concurrent polling (every thread
    blocked on checkout while the requests that hold the connections wait for a thread)."""
    with sessionmaker() as s:
        assert dbkeys.has_active_keys(s) is True
        assert not s.in_transaction()
        assert dbkeys.authenticate(s, keys["alice"][1]).id == keys["alice"][0]
        assert not s.in_transaction()
        assert dbkeys.authenticate(s, "ncs_unknown") is None
        assert not s.in_transaction()
