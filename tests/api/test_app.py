"""The app factory: OpenAPI (tags, summaries, an example per endpoint) and the import graph."""

from __future__ import annotations

import json
import subprocess
import sys


def test_openapi_documents_every_endpoint(client):
    spec = client.get("/openapi.json").json()
    wanted = {("post", "/sweeps"), ("get", "/sweeps/{sweep_id}"), ("get", "/sweeps/{sweep_id}/results"),
              ("post", "/jobs"), ("get", "/jobs"), ("get", "/jobs/{job_id}"), ("get", "/jobs/{job_id}/metrics"),
              ("post", "/jobs/{job_id}/cancel"), ("post", "/sweeps/{sweep_id}/cancel"), ("post", "/measure"),
              ("get", "/health"), ("get", "/ready")}
    ops = {(m, p): op for p, item in spec["paths"].items() for m, op in item.items()}
    assert wanted <= set(ops)
    for key, op in ops.items():
        assert op.get("tags") and op.get("summary"), key
    text = json.dumps(spec)
    assert "application/problem+json" in text
    body = ops[("post", "/measure")]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    for key in [("post", "/sweeps"), ("post", "/jobs"), ("post", "/measure"), ("get", "/jobs/{job_id}")]:
        assert '"example' in json.dumps(ops[key]) or '"examples' in json.dumps(spec["components"]), key


def test_api_never_imports_worker_and_builds_nothing_at_import():
    code = ("import sys; import api.app, api.routers.measure, api.routers.jobs, api.routers.sweeps; "
            "bad = [m for m in sys.modules if m == 'worker' or m.startswith('worker.')]; "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == ""


def test_head_answers_every_get_route_without_a_body(client):
    for path in ("/health", "/jobs", "/openapi.json", "/"):
        got, head = client.get(path), client.head(path)
        assert head.status_code == got.status_code == 200 and head.content == b""
        assert head.headers["content-type"] == got.headers["content-type"]
        assert head.headers["content-length"] == str(len(got.content))
    missing = client.head("/jobs/nope")
    assert missing.status_code == 404 and missing.content == b""
    assert missing.headers["content-type"].startswith("application/problem+json")
    assert client.head("/no/such/route").status_code == 404
