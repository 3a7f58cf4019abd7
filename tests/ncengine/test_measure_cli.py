"""The ``ncservice measure`` command: files in, metrics out (JSON equal to ncengine.metrics.measure)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from ncengine.metrics import measure
from ncservice.cli import app


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    y = np.concatenate([np.arange(3), rng.integers(0, 3, 57)])
    H = (rng.normal(size=(60, 4)) + 3 * rng.normal(size=(3, 4))[y]).astype(np.float32)
    W, b = rng.normal(size=(3, 4)), rng.normal(size=3)
    for name, arr in dict(f=H, l=y, w=W, b=b).items():
        np.save(tmp_path / f"{name}.npy", arr)
    np.savez(tmp_path / "bundle.npz", features=H, labels=y, weights=W, bias=b)
    return tmp_path, H, y, W, b


def test_measure_json_equals_library(files):
    d, H, y, W, b = files
    res = CliRunner().invoke(app, ["measure", str(d / "f.npy"), str(d / "l.npy"), "--weights", str(d / "w.npy"),
                                   "--bias", str(d / "b.npy"), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    want = measure(H, y, W, b).to_dict()
    assert got == json.loads(json.dumps(want))
    bundle = CliRunner().invoke(app, ["measure", str(d / "bundle.npz"), "--json"])
    assert bundle.exit_code == 0 and json.loads(bundle.stdout)["nc1"] == want["nc1"]


def test_measure_table_and_input_error(files):
    d, *_ = files
    res = CliRunner().invoke(app, ["measure", str(d / "f.npy"), str(d / "l.npy")])
    assert res.exit_code == 0 and "nc1" in res.stdout
    bad = CliRunner().invoke(app, ["measure", str(d / "f.npy"), str(d / "f.npy")])
    assert bad.exit_code == 2 and "labels" in bad.output
    missing = CliRunner().invoke(app, ["measure", str(d / "f.npy"), str(d / "absent.npy")])
    assert missing.exit_code == 2 and "labels: no such file" in missing.output and "Traceback" not in missing.output
