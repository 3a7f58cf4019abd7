"""Streaming multipart: running size limit without Content-Length, sha256 while streaming, malformed bodies."""

from __future__ import annotations

import hashlib

import numpy as np

from db import jobs as dbjobs
from tests.api.conftest import assert_problem

BOUNDARY = "XyZzYboundary"


def _part(name: str, filename: str | None, payload: bytes) -> bytes:
    disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + payload + b"\r\n"


def _body(*parts: bytes, close: bool = True) -> bytes:
    return b"".join(parts) + (f"--{BOUNDARY}--\r\n".encode() if close else b"")


def _npy(arr) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


HEADERS = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


def test_running_limit_without_content_length_is_413(client, settings):
    chunk = b"\0" * 65536
    sent = []

    def gen():  # chunked transfer encoding: no Content-Length, the limit must be enforced while streaming
        yield f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="features"; filename="f.npy"\r\n\r\n'.encode()
        for _ in range(settings.max_upload_bytes // len(chunk) + 50):
            sent.append(len(chunk))
            yield chunk

    r = client.post("/measure", content=gen(), headers=HEADERS)
    assert_problem(r, 413, "body")
    assert not any(settings.upload_dir.glob("*/*"))  # partial files are removed


def test_sha256_and_size_recorded_while_streaming(client, sessionmaker):
    rng = np.random.default_rng(0)
    feats, labels = _npy(rng.normal(size=(30, 3))), _npy(np.arange(30) % 3)
    body = _body(_part("features", "../../etc/passwd.npy", feats), _part("labels", "y.NPY", labels))
    r = client.post("/measure?async=true", content=body, headers=HEADERS)
    assert r.status_code == 202, r.text
    with sessionmaker() as s:
        arts = {a.name: a for a in dbjobs.list_artifacts(s, job_id=r.json()["id"])}
    # client file names never become paths: <field><suffix> inside the request's folder
    assert set(arts) == {"features.npy", "labels.npy"}
    assert arts["features.npy"].sha256 == hashlib.sha256(feats).hexdigest()
    assert arts["labels.npy"].bytes == len(labels)
    assert "etc" not in arts["features.npy"].path


def test_malformed_multipart(client, settings):
    assert_problem(client.post("/measure", content=b"x", headers={"content-type": "multipart/form-data"}),
                   400, "body")
    truncated = _body(_part("features", "f.npy", b"\x93NUMPY" + b"\0" * 100), close=False)[:-2]
    assert_problem(client.post("/measure", content=truncated, headers=HEADERS), 400, "body")
    twice = _body(_part("labels", "a.npy", b"1"), _part("labels", "b.npy", b"2"))
    assert_problem(client.post("/measure", content=twice, headers=HEADERS), 422, "labels")
    text_for_file = _body(_part("features", None, b"1,2,3"))
    assert_problem(client.post("/measure", content=text_for_file, headers=HEADERS), 422, "features")
    huge_field = _body(_part("options", None, b"{" + b" " * (70 * 1024) + b"}"))
    assert_problem(client.post("/measure", content=huge_field, headers=HEADERS), 413, "options")
    assert not any(settings.upload_dir.glob("*/*"))
