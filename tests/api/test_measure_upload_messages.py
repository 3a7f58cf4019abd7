"""What POST /measure says about misplaced bundles and refused ``.pt`` pickles: a multi-array ``.npz`` /
``.safetensors`` sent as ``features`` without ``labels`` points to the ``bundle`` part; a ``.pt`` holding pickled
Python objects is refused with our own message (never torch's advice to use ``weights_only=False``)."""

from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.numpy import save as st_save

from tests.api.conftest import assert_problem
from tests.api.test_hostile import MarkerPayload

PT_REFUSED = ("refused: the .pt file holds Python objects other than tensors/containers (only "
              "torch.load(weights_only=True) is used; pickled code is never run)")


def _arrays(n_per=5, C=3, d=4):
    y = np.repeat(np.arange(C), n_per)
    H = np.random.default_rng(0).normal(size=(len(y), d))
    return H, y


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.mark.parametrize("name, blob", [
    ("bundle.npz", lambda H, y: _npz(features=H, labels=y)),
    ("bundle.safetensors", lambda H, y: st_save({"features": H, "labels": y})),
])
def test_a_bundle_sent_as_features_points_to_the_bundle_part(client, name, blob):
    H, y = _arrays()
    r = client.post("/measure", files={"features": (name, blob(H, y))})
    body = assert_problem(r, 422, "labels")
    assert "the file part 'labels' is required" in body["detail"]
    assert "`bundle` part" in body["detail"] and "several arrays" in body["detail"], body["detail"]
    # ... and sent as advised, it is measured
    ok = client.post("/measure", files={"bundle": (name, blob(H, y))})
    assert ok.status_code == 200, ok.text


def test_a_one_array_npz_without_labels_gets_the_plain_message(client):
    H, _ = _arrays()
    body = assert_problem(client.post("/measure", files={"features": ("f.npz", _npz(features=H))}), 422, "labels")
    assert body["detail"] == "the file part 'labels' is required"


def test_a_garbage_npz_without_labels_still_answers_the_missing_part(client):
    body = assert_problem(client.post("/measure", files={"features": ("f.npz", b"PK\x03\x04 not a zip")}), 422,
                          "labels")
    assert "bundle" not in body["detail"]


def _post_pt(client, blob: bytes):
    _, y = _arrays()
    buf = io.BytesIO()
    np.save(buf, y)
    return client.post("/measure", files={"features": ("f.pt", blob), "labels": ("labels.npy", buf.getvalue())})


class _Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def _torch_saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("make", [
    lambda marker: _torch_saved({"features": MarkerPayload(marker)}),
    lambda marker: _torch_saved({"features": np.zeros((15, 4))}),  # a numpy array is a pickled object too
    lambda marker: _torch_saved(_Evil()),
    lambda marker: pickle.dumps(MarkerPayload(marker)),  # a raw pickle, not a torch.save archive
], ids=["object", "numpy", "reduce", "raw-pickle"])
def test_a_pt_with_pickled_objects_gets_our_message(client, tmp_path, make):
    marker = tmp_path / "marker"
    body = assert_problem(_post_pt(client, make(marker)), 422, "features")
    assert body["detail"].startswith(f"features: {PT_REFUSED}"), body["detail"]
    assert "weights_only=False" not in body["detail"] and "weights_only` set to `False`" not in body["detail"]
    assert "Re-running" not in body["detail"] and "\x1b" not in body["detail"]
    assert not marker.exists()


@pytest.mark.parametrize("blob", [b"hello world garbage", b"", _torch_saved({"features": torch.zeros(3)})[:300]],
                         ids=["garbage", "empty", "truncated"])
def test_a_broken_pt_names_the_field_without_torch_advice(client, blob):
    body = assert_problem(_post_pt(client, blob), 422, "features")
    assert ".pt file" in body["detail"]
    assert "weights_only=False" not in body["detail"] and "False" not in body["detail"]


def test_a_pt_bundle_with_a_pickle_names_the_bundle(client, tmp_path):
    marker = tmp_path / "marker"
    r = client.post("/measure", files={"bundle": ("b.pt", _torch_saved({"features": MarkerPayload(marker)}))})
    body = assert_problem(r, 422, "bundle")
    assert PT_REFUSED in body["detail"] and not marker.exists()
