"""Every error is RFC 9457 problem+json with a field; the catch-all 500 leaks nothing."""

from __future__ import annotations

from fastapi import HTTPException

from db.errors import InvalidCursor, NotFound
from ncengine.errors import InputError
from tests.api.conftest import assert_problem


def test_unknown_route_and_method(client):
    body = assert_problem(client.get("/no/such/route"), 404)
    assert body["instance"] == "/no/such/route"
    assert_problem(client.delete("/jobs"), 405)


def test_handlers_map_each_error(app, client):
    secret = "postgresql://admin:hunter2@db/prod"

    @app.get("/_boom")
    def boom():
        raise RuntimeError(secret)

    @app.get("/_input")
    def bad_input():
        raise InputError("weights", "has shape (3, 5)", expected="(3, 4)")

    @app.get("/_http")
    def teapot():
        raise HTTPException(418, "short and stout")

    @app.get("/_nf")
    def nf():
        raise NotFound("artifact", "abc")

    @app.get("/_cursor")
    def cursor():
        raise InvalidCursor("zzz")

    r = client.get("/_boom")
    body = assert_problem(r, 500)
    assert secret not in r.text and "RuntimeError" not in r.text and "Traceback" not in r.text
    body = assert_problem(client.get("/_input"), 422, "weights")
    assert body["expected"] == "(3, 4)" and "has shape (3, 5)" in body["detail"]
    assert assert_problem(client.get("/_http"), 418)["detail"] == "short and stout"
    assert assert_problem(client.get("/_nf"), 404, "id")["entity"] == "artifact"
    assert_problem(client.get("/_cursor"), 422, "cursor")


def test_query_validation_names_the_parameter(client):
    body = assert_problem(client.get("/jobs", params={"limit": "many"}), 422, "query.limit")
    assert body["errors"][0]["field"] == "query.limit"


def test_json_body_sent_as_another_media_type_is_415(client):
    for ctype, body in (("application/x-www-form-urlencoded", "base=1"), ("text/plain", "{}")):
        r = client.post("/sweeps", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 415 and r.headers["content-type"].startswith("application/problem+json")
        p = r.json()
        assert p["field"] == "body" and "application/json" in p["detail"] and ctype in p["detail"]
    # JSON (also as +json) that fails validation stays a 422 naming the field
    r = client.post("/sweeps", content=b'{"seeds": "x"}', headers={"Content-Type": "application/vnd.ncs+json"})
    assert r.status_code == 422 and r.json()["field"] == "seeds"
