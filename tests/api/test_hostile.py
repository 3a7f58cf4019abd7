"""Hostile uploads to POST /measure: pickles never executed, bombs never decompressed, limits enforced while
the body streams in, and every refusal a 422/413 problem+json naming the field (issue 7, "Hostile input")."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ncengine.errors import InputError
from ncengine.io import load_array
from tests.api.conftest import assert_problem


class MarkerPayload:
    """Unpickling this calls ``open(marker, "w")``: the marker file appears iff the pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _labels(n: int = 60, C: int = 3) -> tuple[str, bytes, str]:
    buf = io.BytesIO()
    np.save(buf, np.arange(n) % C)
    return ("labels.npy", buf.getvalue(), "application/octet-stream")


def _npy(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, **kw)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------- pickles
def test_pickle_payload_is_live(tmp_path):
    """Control: the payload really executes when unpickled without weights_only (so the refusals below prove
    something)."""
    marker = tmp_path / "control-marker"
    blob = io.BytesIO()
    torch.save({"features": MarkerPayload(marker)}, blob)
    blob.seek(0)
    torch.load(blob, weights_only=False)
    assert marker.exists()


def test_pt_with_pickled_object_is_refused_without_executing(client, tmp_path):
    marker = tmp_path / "pt-marker"
    blob = io.BytesIO()
    torch.save({"features": MarkerPayload(marker)}, blob)
    r = client.post("/measure", files={"features": ("f.pt", blob.getvalue()), "labels": _labels()})
    body = assert_problem(r, 422, "features")
    assert "weights_only" in body["detail"]
    assert not marker.exists()


def test_npy_with_object_dtype_is_refused_without_executing(client, tmp_path):
    marker = tmp_path / "npy-marker"
    payload = _npy(np.array([MarkerPayload(marker)] * 3, dtype=object), allow_pickle=True)
    r = client.post("/measure", files={"features": ("f.npy", payload), "labels": _labels()})
    body = assert_problem(r, 422, "features")
    assert "object" in body["detail"]
    assert not marker.exists()


def test_npz_member_with_object_dtype_is_refused(client, tmp_path):
    marker = tmp_path / "npz-marker"
    buf = io.BytesIO()
    np.savez(buf, features=np.array([MarkerPayload(marker)] * 3, dtype=object), labels=np.arange(3))
    r = client.post("/measure", files={"bundle": ("b.npz", buf.getvalue())})
    assert_problem(r, 422, "features")
    assert not marker.exists()


def test_pt_of_plain_tensors_is_accepted(client):
    """weights_only loading still accepts what torch.save writes for tensors (the refusal is not blanket)."""
    rng = np.random.default_rng(0)
    H = rng.normal(size=(60, 4))
    blob = io.BytesIO()
    torch.save({"features": torch.from_numpy(H)}, blob)
    r = client.post("/measure", files={"features": ("f.pt", blob.getvalue()), "labels": _labels()})
    assert r.status_code == 200, r.text
    # NC1 trace ratio from its definition, Tr(Sigma_W)/Tr(Sigma_B), in plain numpy
    y = np.arange(60) % 3
    mu = np.stack([H[y == c].mean(0) for c in range(3)])
    sw = sum(((H[y == c] - mu[c]) ** 2).sum() for c in range(3)) / 60
    sb = ((mu - mu.mean(0)) ** 2).sum() / 3
    assert r.json()["nc1_trace_ratio"] == pytest.approx(sw / sb, rel=1e-9)


# ------------------------------------------------------------------------------------------- bombs / headers
def test_npz_zip_bomb_is_refused_before_decompressing(client, settings):
    """A 64 MB member (zeros) compresses to ~64 kB: far below the upload limit, far above the decoded limit.
    It is refused from the headers, and the process never allocates anything near the decoded size."""
    decoded = 8 * 1024 * 1024  # float64 elements -> 64 MiB
    buf = io.BytesIO()
    np.savez_compressed(buf, features=np.zeros(decoded), labels=np.zeros(decoded, dtype=np.int64))
    blob = buf.getvalue()
    assert len(blob) < settings.max_upload_bytes < 8 * decoded
    tracemalloc.start()
    try:
        r = client.post("/measure", files={"bundle": ("bomb.npz", blob)})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    body = assert_problem(r, 422)
    assert body["field"] in ("features", "labels") and "exceeds the limit" in body["detail"]
    assert peak < 16 * 1024 * 1024, peak  # the 64 MiB member was never inflated
    r = client.post("/measure", files={"features": ("f.npz", blob), "labels": _labels()})
    assert_problem(r, 422, "features")


def _lying_zip(member: bytes, declared: int) -> bytes:
    """A zip whose single member ``features.npy`` declares ``declared`` uncompressed bytes (it holds more)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("features.npy", member)
    raw = bytearray(buf.getvalue())
    real = struct.pack("<I", len(member))
    fake = struct.pack("<I", declared)
    # uncompressed size sits at offset 22 of the local header and 24 of the central directory entry
    lh = raw.find(b"PK\x03\x04")
    cd = raw.find(b"PK\x01\x02")
    assert raw[lh + 22:lh + 26] == real and raw[cd + 24:cd + 28] == real
    raw[lh + 22:lh + 26] = fake
    raw[cd + 24:cd + 28] = fake
    return bytes(raw)


def test_npz_member_lying_about_its_size_is_refused(client):
    """The member's header says 1 kB, its .npy header says (N,) float64 of 8 MB: the inconsistency is refused
    and never more than the declared bytes are inflated."""
    member = _npy(np.zeros(1_000_000))
    r = client.post("/measure", files={"features": ("f.npz", _lying_zip(member, 1024)), "labels": _labels()})
    assert_problem(r, 422, "features")


def test_safetensors_with_huge_header_is_refused(client):
    huge = struct.pack("<Q", 1 << 40) + b"{}"
    r = client.post("/measure", files={"features": ("f.safetensors", huge), "labels": _labels()})
    body = assert_problem(r, 422, "features")
    assert "header" in body["detail"]


def test_safetensors_header_claiming_a_huge_tensor_is_refused(client):
    header = json.dumps({"features": {"dtype": "F64", "shape": [1_000_000, 1_000_000],
                                      "data_offsets": [0, 8]}}).encode()
    blob = struct.pack("<Q", len(header)) + header + b"\0" * 8
    r = client.post("/measure", files={"features": ("f.safetensors", blob), "labels": _labels()})
    body = assert_problem(r, 422, "features")
    assert "exceeds the limit" in body["detail"]


def test_npy_header_claiming_a_huge_array_is_refused(client):
    header = _npy(np.zeros((2, 2)))  # rewrite the shape in the header, keep 32 bytes of data
    lying = header.replace(b"(2, 2)", b"(10**9,)".replace(b"10**9", b"1000000000"))
    r = client.post("/measure", files={"features": ("f.npy", lying), "labels": _labels()})
    assert_problem(r, 422, "features")


@pytest.mark.parametrize("raw", [
    b"\x93NUMPY\x02\x00garbage",             # version 2 header with a lying length (was an AttributeError)
    b"\x93NUMPY\x03\x00\x05\x00\x00\x00hello",  # version 3 header that is not a dict literal
    b"\x93NUMPY\x09\x00xx",                 # unknown version
    b"\x93NUMPY\x01\x00\x10\x00{'descr': }     ",  # unparsable 1.0 header
    b"",
], ids=["v2-lying-length", "v3-garbage", "v9", "v1-garbage", "empty"])
def test_garbage_npy_headers_are_input_errors(raw, client):
    with pytest.raises(InputError) as info:
        load_array(io.BytesIO(raw), field="features", suffix=".npy")
    assert info.value.field == "features"
    r = client.post("/measure", files={"features": ("f.npy", raw), "labels": _labels()})
    assert_problem(r, 422, "features")


def test_npy_versions_2_and_3_still_load():
    A = np.arange(12.0).reshape(3, 4)
    for version in ((2, 0), (3, 0)):
        buf = io.BytesIO()
        np.lib.format.write_array(buf, A, version=version)
        buf.seek(0)
        np.testing.assert_array_equal(load_array(buf, field="features", suffix=".npy"), A)


# ------------------------------------------------------------------------------- wrong dtype / shape / NaN
@pytest.mark.parametrize("name, files, field", [
    ("string features", {"features": ("f.npy", _npy(np.array([["a", "b"]] * 60)))}, "features"),
    ("complex features", {"features": ("f.npy", _npy(np.ones((60, 2), dtype=np.complex128)))}, "features"),
    ("structured features", {"features": ("f.npy", _npy(np.zeros(60, dtype=[("a", "f8"), ("b", "f8")])))},
     "features"),
    ("1-d features", {"features": ("f.npy", _npy(np.ones(60)))}, "features"),
    ("inf features", {"features": ("f.npy", _npy(np.full((60, 2), np.inf)))}, "features"),
    ("nan weights", {"features": ("f.npy", _npy(np.ones((60, 2)))),
                     "weights": ("w.npy", _npy(np.full((3, 2), np.nan)))}, "weights"),
    ("negative labels", {"features": ("f.npy", _npy(np.ones((60, 2)))),
                         "labels": ("y.npy", _npy(np.arange(60) % 3 - 1))}, "labels"),
])
def test_wrong_dtype_shape_nan_name_the_field(client, queue, name, files, field):
    files = {"labels": _labels(), **files}
    body = assert_problem(client.post("/measure", files=files), 422, field)
    assert body["detail"]
    assert queue.sent == []


# ------------------------------------------------------------------------------------ streaming size limit
def _asgi_post(app, path: str, headers: dict[str, str], chunks, on_chunk) -> tuple[int, dict, bytes]:
    """Drive the ASGI app directly with a body that arrives chunk by chunk (the TestClient would buffer it);
    ``on_chunk()`` runs before each chunk is handed over, i.e. after the app processed the previous one."""
    status: dict = {}
    body = bytearray()
    it = iter(chunks)
    consumed = [0]

    async def receive():
        on_chunk()
        try:
            chunk = next(it)
        except StopIteration:
            return {"type": "http.request", "body": b"", "more_body": False}
        consumed[0] += 1
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message):
        if message["type"] == "http.response.start":
            status["status"] = message["status"]
            status["headers"] = {k.decode(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            body.extend(message.get("body", b""))

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000), "app": app}
    asyncio.run(app(scope, receive, send))
    status["consumed"] = consumed[0]
    return status["status"], status, bytes(body)


def test_size_limit_is_enforced_while_streaming_never_written_past(app, settings):
    boundary = "bNdRy"
    limit = settings.max_upload_bytes
    chunk = b"\1" * 65536
    n_chunks = 3 * limit // len(chunk)  # a 6 MB body against a 2 MB limit, with no Content-Length

    def chunks():
        yield (f'--{boundary}\r\nContent-Disposition: form-data; name="features"; filename="f.npy"\r\n'
               "Content-Type: application/octet-stream\r\n\r\n").encode()
        for _ in range(n_chunks):
            yield chunk

    largest = [0]

    def on_chunk():
        for f in settings.upload_dir.glob("*/*"):
            largest[0] = max(largest[0], f.stat().st_size)

    status, meta, raw = _asgi_post(app, "/measure", {"content-type": f"multipart/form-data; boundary={boundary}"},
                                   chunks(), on_chunk)
    assert status == 413, raw
    assert meta["headers"]["content-type"].startswith("application/problem+json")
    problem = json.loads(raw)
    assert problem["field"] == "body" and problem["max_bytes"] == limit
    assert 0 < largest[0] <= limit  # it was streaming to disk, and never past the limit
    assert meta["consumed"] <= limit // len(chunk) + 2  # it stopped reading right after the limit
    assert not any(settings.upload_dir.glob("*/*"))  # and the partial file is gone


def test_declared_content_length_over_the_limit_is_413_before_reading(app, settings):
    seen = []

    def on_chunk():
        seen.append(1)

    status, meta, raw = _asgi_post(
        app, "/measure", {"content-type": "multipart/form-data; boundary=x",
                          "content-length": str(settings.max_upload_bytes + 1)}, [b"--x\r\n"], on_chunk)
    assert status == 413 and json.loads(raw)["field"] == "body"
    assert seen == []  # not one byte of the body was read
