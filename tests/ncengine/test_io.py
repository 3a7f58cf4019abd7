"""Tests for ncengine.io: every format, and the guards an upload endpoint relies on."""

from __future__ import annotations

import io
import json
import struct
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ncengine.errors import InputError
from ncengine.io import load_array, load_bundle


class NotATensor:  # pickled by torch.save; weights_only loading must refuse it
    def __init__(self):
        self.x = 1


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    return {"features": rng.normal(size=(6, 3)).astype(np.float32), "labels": np.array([0, 1, 2, 0, 1, 2]),
            "weights": rng.normal(size=(3, 3)), "bias": rng.normal(size=3)}


def test_npy_is_memory_mapped_and_exact(tmp_path, arrays):
    p = tmp_path / "f.npy"
    np.save(p, arrays["features"])
    got = load_array(p, field="features")
    assert isinstance(got, np.memmap) and not got.flags.writeable
    np.testing.assert_array_equal(got, arrays["features"])
    with open(p, "rb") as f:  # a file object works too
        np.testing.assert_array_equal(load_array(f, field="features"), arrays["features"])


def test_npy_object_dtype_and_size_limit_refused(tmp_path):
    p = tmp_path / "o.npy"
    np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError) as ei:
        load_array(p, field="labels")
    assert ei.value.field == "labels" and "object" in str(ei.value)
    q = tmp_path / "big.npy"
    np.save(q, np.zeros((100, 10)))
    with pytest.raises(InputError, match="exceeds the limit"):
        load_array(q, field="features", max_bytes=7999)
    assert load_array(q, field="features", max_bytes=8000).shape == (100, 10)


def test_npz_bundle_and_single_member(tmp_path, arrays):
    p = tmp_path / "b.npz"
    np.savez_compressed(p, **arrays, extra=np.ones(2))
    got = load_bundle(p)
    assert sorted(got) == ["bias", "features", "labels", "weights"]
    for k, v in arrays.items():
        np.testing.assert_array_equal(got[k], v)
    np.testing.assert_array_equal(load_array(p, field="labels"), arrays["labels"])
    with pytest.raises(InputError) as ei:
        load_array(p, field="test_labels")
    assert ei.value.field == "test_labels"
    q = tmp_path / "nolabels.npz"
    np.savez(q, features=arrays["features"])
    with pytest.raises(InputError) as ei:
        load_bundle(q)
    assert ei.value.field == "labels"


def test_npz_zip_bomb_refused_before_decompressing(tmp_path):
    p = tmp_path / "bomb.npz"
    np.savez_compressed(p, features=np.zeros((4000, 1000)))  # 32 MB of zeros, compresses to ~30 KB
    assert p.stat().st_size < 200_000
    with pytest.raises(InputError, match="exceeds the limit"):
        load_bundle(p, max_bytes=1_000_000, require=("features",))


def test_npz_member_with_lying_header_refused(tmp_path):
    # a valid .npy header that declares 4e9 float64 elements (32 GB) but ships 32 bytes of data
    header = {"descr": "<f8", "fortran_order": False, "shape": (4_000_000_000,)}
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, header)
    out.write(np.zeros(4).tobytes())
    p = tmp_path / "liar.npz"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("features.npy", out.getvalue())
    with pytest.raises(InputError) as ei:
        load_array(p, field="features")
    assert ei.value.field == "features" and "declares" in str(ei.value)


def test_safetensors_bfloat16_and_header_limit(tmp_path, arrays):
    p = tmp_path / "b.safetensors"
    feats = torch.from_numpy(arrays["features"]).to(torch.bfloat16)
    save_file({"features": feats, "labels": torch.from_numpy(arrays["labels"])}, p)
    got = load_bundle(p)
    assert got["features"].dtype == np.float32
    np.testing.assert_array_equal(got["features"], feats.to(torch.float32).numpy())  # exact widening
    np.testing.assert_array_equal(load_array(p, field="labels"), arrays["labels"])
    huge = tmp_path / "h.safetensors"
    huge.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(InputError, match="header"):
        load_array(huge, field="features")
    with pytest.raises(InputError, match="exceeds the limit"):
        load_bundle(p, max_bytes=10)


def test_pt_weights_only(tmp_path, arrays):
    p = tmp_path / "b.pt"
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}, p)
    got = load_bundle(p)
    np.testing.assert_array_equal(got["weights"], arrays["weights"])
    t = tmp_path / "t.pt"
    torch.save(torch.from_numpy(arrays["features"]), t)
    np.testing.assert_array_equal(load_array(t, field="features"), arrays["features"])
    evil = tmp_path / "evil.pt"
    torch.save({"features": NotATensor()}, evil)
    with pytest.raises(InputError) as ei:
        load_array(evil, field="features")
    assert "weights_only" in str(ei.value)


def test_json_lists_and_objects(tmp_path, arrays):
    p = tmp_path / "f.json"
    p.write_text(json.dumps(arrays["features"].tolist()))
    np.testing.assert_allclose(load_array(p, field="features"), arrays["features"], rtol=1e-7)
    q = tmp_path / "b.json"
    q.write_text(json.dumps({k: np.asarray(v).tolist() for k, v in arrays.items()}))
    got = load_bundle(q)
    np.testing.assert_array_equal(got["labels"], arrays["labels"])
    r = tmp_path / "ragged.json"
    r.write_text("[[1, 2], [3]]")
    with pytest.raises(InputError) as ei:
        load_array(r, field="features")
    assert ei.value.field == "features"
    s = tmp_path / "strings.json"
    s.write_text('["a", "b"]')
    with pytest.raises(InputError):
        load_array(s, field="labels")


def test_unsupported_suffix(tmp_path):
    p = tmp_path / "x.pkl"
    p.write_bytes(b"\x80\x04")
    with pytest.raises(InputError) as ei:
        load_array(p, field="weights")
    assert ei.value.field == "weights" and ".pkl" in str(ei.value)


def test_missing_file_names_the_field(tmp_path):
    for load in (lambda p: load_array(p, field="weights"), lambda p: load_bundle(p, field="weights")):
        with pytest.raises(InputError) as ei:
            load(tmp_path / "absent.npz")
        assert ei.value.field == "weights" and "no such file" in str(ei.value) and "absent.npz" in str(ei.value)
