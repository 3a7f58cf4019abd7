"""Mistakes of a new user on the ``ncservice`` command line: each is one ``error: ...`` line on stderr that names
the argument or file and what was expected, exit code 2, never a traceback (typer's CliRunner; the client
commands against the real API app, as in ``test_cli_client``)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from ncservice.cli import app as cli
from tests.api.fakework import run_job

BASE = {"data": {"name": "teacher", "n": 100}, "model": {"depth": 2, "width": 8}, "schedule": {"epochs": 3},
        "measure": {"every": 1}}


def assert_usage_error(res, *fragments: str) -> str:
    """Exit 2, one ``error:`` line on stderr holding every fragment, no traceback; returns that line."""
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, res.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    assert "Traceback" not in res.output
    return errors[0]


@pytest.fixture
def arrays(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 5)
    np.save(tmp_path / "f.npy", rng.normal(size=(15, 4)) + 3 * np.eye(3, 4)[y])
    np.save(tmp_path / "l.npy", y)
    return tmp_path


def _submit_preset(invoke) -> str:
    res = invoke("submit", "--preset", "thesis-fig3.1", "--scale", "small")
    assert res.exit_code == 0, res.output
    return res.stdout.split()[-1]


# ------------------------------------------------------------------------------------------ 1. --out paths
def test_results_out_in_a_missing_folder_or_on_a_folder(invoke, tmp_path):
    sid = _submit_preset(invoke)
    missing = tmp_path / "nonexistent" / "dir" / "r.csv"
    assert_usage_error(invoke("results", sid, "--out", str(missing)), f"--out {missing}",
                       "No such file or directory")
    assert_usage_error(invoke("results", sid, "--out", str(tmp_path)), f"--out {tmp_path}", "Is a directory")
    ok = invoke("results", sid, "--out", str(tmp_path / "r.csv"))
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "r.csv").read_text() == invoke("results", sid).stdout


def test_reproduce_out_under_a_file_fails_before_submitting(invoke, http, tmp_path):
    (tmp_path / "notadir").write_text("a file")
    out = tmp_path / "notadir" / "sub"
    res = invoke("reproduce", "thesis-fig3.1", "--scale", "small", "--out", str(out), "--no-progress")
    assert_usage_error(res, f"--out {out}", "Not a directory")
    assert http.get("/sweeps").json()["items"] == []  # nothing was submitted


def test_reproduce_out_not_writable_fails_before_submitting(invoke, http, tmp_path, monkeypatch):
    """The write check of OUT (as any user, root included: the refusal is simulated)."""
    import tempfile

    def refuse(*args, dir=None, **kwargs):  # noqa: A002
        raise PermissionError(13, "Permission denied", str(dir))

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    res = invoke("reproduce", "thesis-fig3.1", "--out", str(tmp_path / "out"), "--no-progress")
    assert_usage_error(res, f"--out {tmp_path / 'out'}: Permission denied")
    assert http.get("/sweeps").json()["items"] == []


def test_reproduce_out_write_check_leaves_no_file(tmp_path):
    from ncservice.reproduce import OutputError, prepare_out

    prepare_out(tmp_path / "a" / "b")
    assert list((tmp_path / "a" / "b").iterdir()) == []
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError) as info:
        prepare_out(tmp_path / "f")
    assert isinstance(info.value, OSError) and info.value.strerror


# ------------------------------------------------------------------------------------------ 2. --device
def test_measure_device_not_a_device(arrays):
    for bad in ("banana", "cuda:x", ""):
        res = CliRunner().invoke(cli, ["measure", str(arrays / "f.npy"), str(arrays / "l.npy"), "--device", bad])
        assert_usage_error(res, "--device", "expected cpu, cuda, cuda:N or auto")
    res = CliRunner().invoke(cli, ["measure", str(arrays / "f.npy"), str(arrays / "l.npy"), "--device", "meta"])
    assert_usage_error(res, "--device 'meta'", "not supported", "expected cpu, cuda, cuda:N or auto")


def test_measure_cuda_without_cuda(arrays, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for dev in ("cuda", "cuda:0"):
        res = CliRunner().invoke(cli, ["measure", str(arrays / "f.npy"), str(arrays / "l.npy"), "--device", dev])
        assert_usage_error(res, f"--device {dev!r}", "CUDA is not available")
    auto = CliRunner().invoke(cli, ["measure", str(arrays / "f.npy"), str(arrays / "l.npy"), "--device", "auto",
                                    "--json"])
    assert auto.exit_code == 0, auto.output
    cpu = CliRunner().invoke(cli, ["measure", str(arrays / "f.npy"), str(arrays / "l.npy"), "--device", "cpu",
                                   "--json"])
    assert cpu.exit_code == 0 and json.loads(cpu.stdout)["nc1"] == json.loads(auto.stdout)["nc1"]


def test_measure_cuda_index_out_of_range(arrays, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    res = CliRunner().invoke(cli, ["measure", str(arrays / "f.npy"), str(arrays / "l.npy"), "--device", "cuda:3"])
    assert_usage_error(res, "--device 'cuda:3'", "no such GPU")


# ------------------------------------------------------------------------------------------ 3. binary SPEC
def test_submit_a_binary_spec_names_the_file(invoke, http, arrays):
    path = arrays / "f.npy"
    res = invoke("submit", str(path))
    line = assert_usage_error(res, f"SPEC {path}: not a YAML/JSON text file (")
    assert "codec" in line
    (arrays / "zeros.bin").write_bytes(b"\x00" * 16)  # decodes as UTF-8, still not text
    assert_usage_error(invoke("submit", str(arrays / "zeros.bin")), "not a YAML/JSON text file")
    (arrays / "list.yaml").write_text("- 1\n- 2\n")
    assert_usage_error(invoke("submit", str(arrays / "list.yaml")), f"SPEC {arrays / 'list.yaml'}", "mapping")
    assert http.get("/sweeps").json()["items"] == []


# ------------------------------------------------------------------------------------------ 4. directories
def test_measure_directory_arguments(arrays):
    f, y = str(arrays / "f.npy"), str(arrays / "l.npy")
    d = str(arrays)
    assert_usage_error(CliRunner().invoke(cli, ["measure", d, y]), f"FEATURES {d}: is a directory, expected a file")
    assert_usage_error(CliRunner().invoke(cli, ["measure", d]), f"FEATURES {d}: is a directory")
    assert_usage_error(CliRunner().invoke(cli, ["measure", f, d]), f"LABELS {d}: is a directory")
    assert_usage_error(CliRunner().invoke(cli, ["measure", f, y, "--weights", d]), f"--weights {d}: is a directory")


# ------------------------------------------------------------------------------------------ 5. results of a job
def test_results_of_a_job_id(invoke, http):
    sid = _submit_preset(invoke)
    job_id = http.get(f"/sweeps/{sid}").json()["jobs"][0]["id"]
    assert_usage_error(invoke("results", job_id),
                       f"{job_id} is a job, not a sweep; results are per sweep (use: ncservice status {job_id})")
    unknown = invoke("results", "f" * 32)  # neither: the service's 404 as before
    assert_usage_error(unknown, "404")
    assert "is a job" not in unknown.stderr


# ------------------------------------------------------------------------------------------ 6. keys
@pytest.fixture
def keys_env(tmp_path, monkeypatch):
    from ncservice.settings import get_settings

    monkeypatch.setenv("NCS_DATA_DIR", str(tmp_path / "keys-data"))
    monkeypatch.delenv("NCS_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    yield tmp_path / "keys-data"
    get_settings.cache_clear()


def test_keys_say_which_database(keys_env):
    runner = CliRunner()
    db = (keys_env / "ncs.db").resolve()
    made = runner.invoke(cli, ["keys", "create", "alice", "--json"])
    assert made.exit_code == 0, made.output
    assert f"database: sqlite:///{db} (new:" in made.stderr
    assert json.loads(made.stdout)["name"] == "alice"
    listed = runner.invoke(cli, ["keys", "list"])
    assert listed.exit_code == 0 and f"database: sqlite:///{db}" in listed.stderr and "(new:" not in listed.stderr
    revoked = runner.invoke(cli, ["keys", "revoke", json.loads(made.stdout)["id"]])
    assert revoked.exit_code == 0 and f"database: sqlite:///{db}" in revoked.stderr


def test_keys_create_refuses_an_empty_name(keys_env):
    for name in ("", "   ", "\t"):
        res = CliRunner().invoke(cli, ["keys", "create", name])
        assert_usage_error(res, "error: NAME: must not be empty")
    assert not keys_env.exists()  # refused before any database was made


def test_keys_create_warns_about_a_duplicate_name(keys_env):
    runner = CliRunner()
    first = runner.invoke(cli, ["keys", "create", "bob", "--json"])
    assert first.exit_code == 0 and "warning" not in first.stderr
    second = runner.invoke(cli, ["keys", "create", "bob", "--json"])
    assert second.exit_code == 0, second.output
    assert "warning: 1 key(s) named 'bob' already exist" in second.stderr
    assert json.loads(first.stdout)["id"] in second.stderr
    assert json.loads(second.stdout)["id"] != json.loads(first.stdout)["id"]


def test_keys_mask_the_database_password(monkeypatch):
    from ncservice.keys_cli import database_label
    from ncservice.settings import get_settings

    label = database_label("postgresql+psycopg://ncs:s3cret@db.example:5432/ncs")
    assert "s3cret" not in label and label == "postgresql+psycopg://ncs:***@db.example:5432/ncs"
    monkeypatch.setenv("NCS_DATABASE_URL", "postgresql+psycopg://ncs:s3cret@127.0.0.1:1/ncs")  # nothing listens
    get_settings.cache_clear()
    try:
        res = CliRunner().invoke(cli, ["keys", "list"])
    finally:
        get_settings.cache_clear()
    assert_usage_error(res, "database postgresql+psycopg://ncs:***@127.0.0.1:1/ncs")
    assert "s3cret" not in res.output


# ------------------------------------------------------------------------------------------ 7. watch label
def test_watch_a_job_names_it_once(invoke, http, sessionmaker):
    sid = _submit_preset(invoke)
    job_id = http.get(f"/sweeps/{sid}").json()["jobs"][0]["id"]
    out = invoke("watch", job_id, sleep=lambda s: run_job(sessionmaker, job_id, epochs=2))
    assert out.exit_code == 0, out.output
    short = job_id[:8]
    assert f"job {short} job {short}" not in out.output
    assert re.search(rf"^job {short}\s+succeeded", out.output, re.MULTILINE), out.output  # the bar
    assert f"job {job_id} succeeded" in out.stdout


# ------------------------------------------------------------------------------------------ 8. idempotent replay
def test_resubmit_with_the_same_idempotency_key_prints_the_current_status(invoke, http, sessionmaker, tmp_path):
    import yaml

    first = invoke("submit", "--preset", "thesis-fig3.3", "--scale", "small", "--idempotency-key", "k1")
    assert first.exit_code == 0, first.output
    sid = first.stdout.split()[-1]
    assert f"sweep {sid} queued" in first.stderr
    for job in http.get(f"/sweeps/{sid}").json()["jobs"]:
        run_job(sessionmaker, job["id"], epochs=2)
    again = invoke("submit", "--preset", "thesis-fig3.3", "--scale", "small", "--idempotency-key", "k1")
    assert again.exit_code == 0, again.output
    assert again.stdout.split()[-1] == sid
    assert f"sweep {sid} succeeded" in again.stderr and "queued" not in again.stderr

    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"kind": "train", "config": BASE}))
    made = invoke("submit", str(spec), "--idempotency-key", "k2")
    job_id = made.stdout.split()[-1]
    assert f"job {job_id} queued" in made.stderr
    run_job(sessionmaker, job_id, epochs=2)
    replay = invoke("submit", str(spec), "--idempotency-key", "k2")
    assert replay.exit_code == 0 and replay.stdout.split()[-1] == job_id
    assert f"job {job_id} succeeded" in replay.stderr
