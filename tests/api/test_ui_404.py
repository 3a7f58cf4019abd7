"""Unknown ids under /ui/jobs/... and /ui/sweeps/... answer a small HTML page (status 404, extends base.html,
names what was not found, links to /), not problem+json; a missing key still redirects to the login page."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from tests.api.conftest import assert_problem, bearer

MISSING = "0" * 32
JOB = {"kind": "train", "config": {"data": {"name": "teacher", "n": 60}, "model": {"depth": 2, "width": 8},
                                   "schedule": {"epochs": 3}, "measure": {"every": 1}}}


def _assert_html_404(resp, entity: str, ident: str) -> None:
    assert resp.status_code == 404, resp.text
    assert resp.headers["content-type"].startswith("text/html")
    text = resp.text
    assert text.lstrip().lower().startswith("<!doctype html>") and '<a href="/">NC service</a>' in text  # base
    assert 'id="not-found"' in text and f"No {entity} <code>{ident}</code>" in text
    assert 'href="/">Back to the dashboard' in text


@pytest.mark.parametrize("path, entity", [("/ui/jobs/{id}", "job"), ("/ui/sweeps/{id}", "sweep")])
@pytest.mark.parametrize("ident", [MISSING, "nope", "%3Cscript%3E"])
def test_unknown_ids_get_an_html_404(client, path, entity, ident):
    _assert_html_404(client.get(path.format(id=ident)), entity, "&lt;script&gt;" if "%3C" in ident else ident)


def test_head_of_an_unknown_page_is_404_too(client):
    resp = client.head(f"/ui/jobs/{MISSING}")
    assert resp.status_code == 404 and resp.headers["content-type"].startswith("text/html")


def test_the_json_api_keeps_problem_json(client):
    assert_problem(client.get(f"/jobs/{MISSING}"), 404)
    assert_problem(client.get(f"/sweeps/{MISSING}"), 404)


def test_another_keys_job_is_an_html_404_and_no_key_still_redirects(keys, client):
    alice, bob = keys["alice"][1], keys["bob"][1]
    theirs = client.post("/jobs", json=JOB, headers=bearer(bob)).json()["id"]
    _assert_html_404(client.get(f"/ui/jobs/{theirs}", headers=bearer(alice)), "job", theirs)
    for path in (f"/ui/jobs/{MISSING}", f"/ui/sweeps/{MISSING}"):
        resp = client.get(path, follow_redirects=False)  # keys exist, none sent: the login page first
        assert resp.status_code == 303 and urlsplit(resp.headers["location"]).path == "/ui/login"
