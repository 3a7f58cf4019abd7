"""The OpenAPI document points to documents that exist in the repository (docs/metrics.md), never DESIGN.md."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_openapi_refers_to_docs_that_exist(client):
    text = client.get("/openapi.json").text
    assert "DESIGN.md" not in text
    measure = client.get("/openapi.json").json()["paths"]["/measure"]["post"]["description"]
    assert "docs/metrics.md" in measure
    for doc in ("docs/metrics.md", "docs/bounds.md"):
        if doc in text:
            assert (ROOT / doc).is_file(), doc
