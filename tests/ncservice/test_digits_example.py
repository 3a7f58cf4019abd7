"""examples/digits_features.py: the network reaches 100% training accuracy (checked from the returned arrays),
the comparison flags differences, and the whole script against the real API served over HTTP (uvicorn in a
thread, SQLite) equals in-process ``measure``."""

from __future__ import annotations

import importlib.util
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("digits_features", ROOT / "examples" / "digits_features.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(example):
    return example.train_digits(seed=0, extra_epochs=5)


def test_train_digits_reaches_100_percent(trained):
    from sklearn.datasets import load_digits

    H, y, W, b = trained["features"], trained["labels"], trained["weights"], trained["bias"]
    assert H.shape == (1797, 128) and H.dtype == np.float32 and W.shape == (10, 128) and b.shape == (10,)
    assert np.array_equal(y, load_digits().target)
    # accuracy recomputed from the returned arrays, in float64, independently of the training loop
    pred = np.argmax(H.astype(np.float64) @ W.T.astype(np.float64) + b, axis=1)
    assert (pred == y).all()
    assert (H >= 0).all()  # post-ReLU penultimate features
    assert trained["train_accuracy"] == 1.0 and trained["epochs"] == trained["epochs_to_100"] + 5


def test_compare_flags_differences(example):
    want = {"a": 1.0, "b": [0.5, -2.0], "c": {"d": 3, "e": None, "f": True}, "z": 0.0}
    assert example.compare(want, want) == (0.0, 0.0, [])
    got = {"a": 1.0 + 1e-12, "b": [0.5, -2.0], "c": {"d": 3, "e": None, "f": True}, "z": 1e-13}
    max_abs, max_rel, bad = example.compare(got, want)
    assert bad == [] and max_abs == pytest.approx(1e-12, rel=1e-3) and max_rel == pytest.approx(1.0)
    got = {"a": 1.0 + 1e-6, "b": [0.5], "c": {"d": 3, "e": 0.0, "f": False}}
    _, _, bad = example.compare(got, want)
    assert sorted(bad) == sorted([".z: missing on one side", "a: 1.000001 != 1.0", "b: length 1 != 2",
                                  "c.e: 0.0 != None", "c.f: False != True"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def http_service(api_db_url, tmp_path):
    """The real API app over real HTTP (uvicorn in a thread) on a fresh SQLite database."""
    import uvicorn

    from api.app import create_app
    from ncservice.settings import Settings

    settings = Settings(_env_file=None, data_dir=tmp_path / "data", database_url=api_db_url,
                        measure_sync_max_elements=1_000_000, max_upload_bytes=20_000_000)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_script_against_the_service_equals_in_process_measure(example, http_service, tmp_path, capsys):
    import json

    from ncengine.metrics import measure

    out = tmp_path / "out"
    rc = example.main(["--url", http_service, "--out", str(out), "--seed", "1", "--extra-epochs", "5"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "max abs difference" in text and "equal at rtol=1e-09" in text and "bounds (Theorem 2.3.1)" in text
    for name in ("features.npy", "labels.npy", "weights.npy", "bias.npy", "digits_features.safetensors"):
        assert (out / name).is_file()
    # the service's answer against measure() on the arrays read back from the .safetensors file
    from safetensors.numpy import load_file

    arrays = load_file(str(out / "digits_features.safetensors"))
    want = json.loads(json.dumps(measure(arrays["features"], arrays["labels"], arrays["weights"],
                                         arrays["bias"]).to_dict()))
    remote = json.loads((out / "measure_service.json").read_text())
    assert example.compare(remote, want)[2] == []
    assert remote["classifier_accuracy"] == 1.0 and remote["bounds"]["num_classes"] == 10
    assert remote["loss"] >= remote["min_loss_m"]
    # an unreachable service is exit status 2
    assert example.main(["--url", f"http://127.0.0.1:{_free_port()}", "--out", str(out)]) == 2
