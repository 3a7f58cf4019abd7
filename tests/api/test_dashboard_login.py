"""The dashboard's browser login (/ui/login, /ui/logout): a key checked like a Bearer key is kept in an
HttpOnly cookie that authorises GET/HEAD only; pages without a valid key redirect to the login page, the JSON
API keeps answering 401 problem+json; ``next`` never leads off-site."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.auth import SESSION_COOKIE
from api.deps import get_queue
from db import keys as dbkeys
from tests.api.conftest import assert_problem, bearer as _bearer
from tests.api.fakework import run_job

BASE = {"data": {"name": "teacher", "n": 60}, "model": {"depth": 2, "width": 8}, "schedule": {"epochs": 3},
        "measure": {"every": 1}}
JOB = {"kind": "train", "config": BASE}


def _login(client, token: str, **extra: str):
    return client.post("/ui/login", data={"api_key": token, **extra}, follow_redirects=False)


def _login_redirect(resp) -> str:
    """The ``next`` of a 303 to the login page."""
    assert resp.status_code == 303, resp.text
    where = urlsplit(resp.headers["location"])
    assert where.path == "/ui/login" and not where.netloc
    return parse_qs(where.query)["next"][0]


def test_login_sets_the_cookie_and_the_index_lists_only_that_keys_jobs(keys, client):
    alice, bob = keys["alice"][1], keys["bob"][1]
    mine = client.post("/jobs", json=JOB, headers=_bearer(alice)).json()["id"]
    theirs = client.post("/jobs", json=JOB, headers=_bearer(bob)).json()["id"]
    sweep = client.post("/sweeps", json={"base": BASE, "seeds": [0]}, headers=_bearer(bob)).json()["id"]

    form = client.get("/ui/login")
    assert form.status_code == 200 and 'name="api_key"' in form.text and 'action="/ui/login"' in form.text

    resp = _login(client, alice)
    assert resp.status_code == 303 and resp.headers["location"] == "/"
    cookie = resp.headers["set-cookie"]
    attrs = {a.strip().split("=")[0].lower() for a in cookie.split(";")}
    assert cookie.startswith(f"{SESSION_COOKIE}={alice};")
    assert {"httponly", "path", "samesite", "max-age"} <= attrs and "secure" not in attrs  # http here
    assert "samesite=strict" in cookie.lower() and "path=/;" in cookie.lower() + ";"
    assert 0 < int(cookie.lower().split("max-age=")[1].split(";")[0]) <= 12 * 3600

    page = client.get("/", follow_redirects=False)
    assert page.status_code == 200, page.text
    assert f"/ui/jobs/{mine}" in page.text
    assert theirs not in page.text and sweep not in page.text
    assert 'action="/ui/logout"' in page.text  # "log out" in the header
    assert client.get(f"/ui/jobs/{mine}", follow_redirects=False).status_code == 200
    other = client.get(f"/ui/jobs/{theirs}", follow_redirects=False)  # scoped like the API: 404 (an HTML page)
    assert other.status_code == 404 and other.headers["content-type"].startswith("text/html")
    assert theirs in other.text and 'href="/"' in other.text


def test_a_bearer_header_wins_over_the_cookie(keys, client):
    alice, bob = keys["alice"][1], keys["bob"][1]
    theirs = client.post("/jobs", json=JOB, headers=_bearer(bob)).json()["id"]
    assert _login(client, alice).status_code == 303
    assert client.get(f"/jobs/{theirs}").status_code == 404  # the cookie: alice
    assert client.get(f"/jobs/{theirs}", headers=_bearer(bob)).status_code == 200
    assert_problem(client.get("/jobs", headers=_bearer("ncs_wrong")), 401, "Authorization")  # no fallback
    page = client.get("/", headers=_bearer(bob), follow_redirects=False)
    assert theirs in page.text and 'action="/ui/logout"' not in page.text  # not logged in via the cookie


@pytest.mark.parametrize("token", ["ncs_not-a-real-key-0000000000000000000000000", "something", ""])
def test_a_wrong_key_is_401_and_sets_no_cookie(keys, client, token):
    resp = _login(client, token)
    assert resp.status_code == 401 and resp.headers["content-type"].startswith("text/html")
    assert "set-cookie" not in resp.headers and SESSION_COOKIE not in client.cookies
    assert 'id="login-error"' in resp.text and 'name="api_key"' in resp.text
    assert token not in resp.text or not token  # the key is not echoed back


def test_the_cookie_authorises_reads_but_never_writes(keys, client, sessionmaker):
    alice = keys["alice"][1]
    job = client.post("/jobs", json=JOB, headers=_bearer(alice)).json()["id"]
    run_job(sessionmaker, job)
    theirs = client.post("/jobs", json=JOB, headers=_bearer(keys["bob"][1])).json()["id"]
    run_job(sessionmaker, theirs)
    assert _login(client, alice).status_code == 303

    png = client.get(f"/jobs/{job}/figures/training_curves.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert_problem(client.get(f"/jobs/{theirs}/figures/training_curves.png"), 404)
    assert client.get("/jobs").status_code == 200

    assert_problem(client.post("/sweeps", json={"base": BASE, "seeds": [0]}), 401, "Authorization")
    assert_problem(client.post("/jobs", json=JOB), 401, "Authorization")
    assert_problem(client.post(f"/jobs/{job}/cancel"), 401, "Authorization")
    made = client.post("/sweeps", json={"base": BASE, "seeds": [0]}, headers=_bearer(alice))
    assert made.status_code == 202, made.text


def test_pages_without_a_valid_key_redirect_to_the_login_page(keys, client, sessionmaker):
    alice = keys["alice"][1]
    job = client.post("/jobs", json=JOB, headers=_bearer(alice)).json()["id"]
    assert _login_redirect(client.get("/", follow_redirects=False)) == "/"  # no cookie at all
    assert _login_redirect(client.get(f"/ui/jobs/{job}?x=1", follow_redirects=False)) == f"/ui/jobs/{job}?x=1"

    assert _login(client, alice).status_code == 303
    assert client.get("/", follow_redirects=False).status_code == 200
    with sessionmaker() as s:
        dbkeys.revoke_key(s, keys["alice"][0])
    assert _login_redirect(client.get("/", follow_redirects=False)) == "/"  # the revoked key's cookie
    assert _login_redirect(client.get(f"/ui/jobs/{job}", follow_redirects=False)) == f"/ui/jobs/{job}"
    body = assert_problem(client.get("/jobs"), 401, "Authorization")  # the API: still problem+json
    assert "revoked" in body["detail"]
    assert_problem(client.get(f"/jobs/{job}/figures/training_curves.png"), 401)
    assert _login(client, alice).status_code == 401  # and it cannot log in again


def test_login_goes_back_to_next_and_logout_clears_the_cookie(keys, client):
    alice = keys["alice"][1]
    job = client.post("/jobs", json=JOB, headers=_bearer(alice)).json()["id"]
    target = f"/ui/jobs/{job}"
    form = client.get("/ui/login", params={"next": target})
    assert f'name="next" value="{target}"' in form.text
    resp = _login(client, alice, next=target)
    assert resp.status_code == 303 and resp.headers["location"] == target
    assert client.get(target, follow_redirects=False).status_code == 200

    out = client.post("/ui/logout", follow_redirects=False)
    assert out.status_code == 303 and out.headers["location"] == "/ui/login"
    cleared = out.headers["set-cookie"]
    assert cleared.startswith(f'{SESSION_COOKIE}="";') and "max-age=0" in cleared.lower()
    assert SESSION_COOKIE not in client.cookies
    assert _login_redirect(client.get(target, follow_redirects=False)) == target


@pytest.mark.parametrize("bad", ["//evil.example", "https://evil.example", "//evil.example/ui/jobs",
                                 "/\\evil.example", "/\t/evil.example", "evil.example", "javascript:alert(1)",
                                 "http:/evil.example", ""])
def test_next_off_site_is_ignored(keys, client, bad):
    resp = _login(client, keys["alice"][1], next=bad)
    assert resp.status_code == 303 and resp.headers["location"] == "/"
    form = client.get("/ui/login", params={"next": bad})
    assert 'name="next" value="/"' in form.text


def test_no_login_is_needed_where_no_key_is_required(client, settings, queue):
    """Auto mode on loopback with no key: the pages are open and the login page says so (a stale cookie,
    checked like any key that is sent, leads there and is cleared there); with auth off the same, even when
    keys exist."""
    client.cookies.set(SESSION_COOKIE, "ncs_stale")
    assert _login_redirect(client.get("/", follow_redirects=False)) == "/"
    form = client.get("/ui/login")
    assert form.status_code == 200 and 'id="no-login"' in form.text and 'name="api_key"' not in form.text
    assert form.headers["set-cookie"].startswith(f'{SESSION_COOKIE}="";')  # cleared
    client.cookies.clear()  # (the test client's jar does not match the cleared cookie to the one set by hand)
    page = client.get("/", follow_redirects=False)
    assert page.status_code == 200 and 'action="/ui/logout"' not in page.text
    assert client.post("/ui/login", data={"api_key": "x"}, follow_redirects=False).status_code == 200

    with client.app.state.sessionmaker() as s:
        _, token = dbkeys.create_key(s, name="alice")
    app = create_app(settings.model_copy(update={"auth": "off"}))
    app.dependency_overrides[get_queue] = lambda: queue
    with TestClient(app, raise_server_exceptions=False) as off:
        assert 'id="no-login"' in off.get("/ui/login").text
        assert off.get("/", follow_redirects=False).status_code == 200
        off.cookies.set(SESSION_COOKIE, "ncs_stale")
        assert off.get("/", follow_redirects=False).status_code == 200  # off: the cookie is not even read
    app.state.engine.dispose()
